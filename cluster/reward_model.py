"""A reward model as a reward: a local Hugging Face sequence-classification model scores finished responses.

:class:`RewardModelScorer` holds the model in its own Ray actor (started by :class:`RewardModelServer`, placed with
``reward_model.num_gpus`` like any other model) and scores texts in batches. :class:`RewardModelReward` is the
batched reward the environments see (``score_batch``, see ``textenv.rewards``): each rollout actor scores all its
finished responses with one call, and ``reward_model.weight`` x the score is added to the last token's reward.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cluster.config import RewardModelConfig
from cluster.files import ship
from cluster.supervision import DEFAULT_TIMEOUT_S, ActorLostError, ActorTimeoutError, Supervisor, first_line
from textenv import RewardContext

if TYPE_CHECKING:
    from cluster.placement import Placement


def scorer_name(path: str | Path) -> str:
    """How errors name the reward model (its scorer actor, and the reward in reward errors): ``reward model 'PATH'``."""
    return f"reward model {str(path)!r}"


def check_model_dir(path: str | Path) -> Path:
    """``path`` as a Path; a one-line error naming ``reward_model.path`` when it is not a local HF model directory."""
    if not (Path(path) / "config.json").is_file():
        raise FileNotFoundError(
            f"reward_model.path {str(path)!r} is not a local Hugging Face model directory (no config.json)"
        )
    return Path(path)


def resolve_label(model_config: Any, label: int | str, path: str | Path) -> int | None:
    """The output index whose probability is the score, or None for a regression head (one output)."""
    if model_config.num_labels == 1:
        return None
    if getattr(model_config, "problem_type", None) == "regression":
        raise ValueError(f"reward_model.path {str(path)!r} has a regression head with {model_config.num_labels} "
                         "outputs; only a single-output regression head (num_labels: 1) gives a reward")
    names = {str(name): int(i) for i, name in model_config.id2label.items()}
    if isinstance(label, str):
        if label not in names:
            raise ValueError(
                f"reward_model.label {label!r} is not a label of {str(path)!r}; its labels: {sorted(names)}"
            )
        return names[label]
    if not 0 <= label < model_config.num_labels:
        raise ValueError(f"reward_model.label {label} is out of range for {str(path)!r}, which has "
                         f"{model_config.num_labels} labels ({sorted(names, key=names.get)})")
    return label


class RewardModelScorer:
    """A Ray actor (wrapped with ``ray.remote`` by :class:`RewardModelServer`) scoring texts with a local HF
    sequence-classification model: the probability of class ``label``, or a regression head's raw output.

    ``path`` (``reward_model.path``) names the model in messages; the files are read from ``files`` (the server
    passes the directory it shipped: :class:`cluster.files.ShippedPath`), or from ``path`` itself when not given.
    """

    def __init__(
        self, path: str, label: int | str, batch_size: int, dtype: str = "float32", device: str = "cpu",
        files: str | os.PathLike[str] | None = None,
    ) -> None:
        import torch
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        self.path = path
        self.model_dir = check_model_dir(os.fspath(files) if files is not None else path)  # this node's copy
        self.batch_size, self.device = batch_size, torch.device(device)
        self.tokenizer = AutoTokenizer.from_pretrained(self.model_dir)
        self.tokenizer.truncation_side = "left"  # an over-long text keeps its end: the response
        self.model = AutoModelForSequenceClassification.from_pretrained(self.model_dir, dtype=getattr(torch, dtype))
        self.model.to(self.device).eval()
        config = self.model.config
        self.label = resolve_label(config, label, self.path)
        self.multi_label = getattr(config, "problem_type", None) == "multi_label_classification"
        if config.pad_token_id is None:  # the model finds each row's last token by the pad id; batches need one
            pad = self.tokenizer.pad_token_id
            config.pad_token_id = pad if pad is not None else self.tokenizer.eos_token_id
        self.pad_token_id = int(config.pad_token_id)
        self.max_length = getattr(config, "max_position_embeddings", None)
        self.calls = self.texts = 0
        self.seconds = 0.0

    def __repr__(self) -> str:  # how Ray's errors and log prefixes name this actor
        return "reward model"

    def ready(self) -> dict[str, Any]:
        return {"path": self.path, "model_dir": str(self.model_dir), "num_labels": self.model.config.num_labels,
                "label": self.label, "device": str(self.device)}

    def score(self, texts: list[str]) -> list[float]:
        """One score per text, computed ``batch_size`` texts at a time."""
        import torch

        start = time.perf_counter()
        scores: list[float] = []
        for i in range(0, len(texts), self.batch_size):
            chunk = texts[i : i + self.batch_size]
            ids = self.tokenizer(chunk, truncation=self.max_length is not None, max_length=self.max_length)["input_ids"]
            width = max(len(row) for row in ids)
            input_ids = torch.full((len(ids), width), self.pad_token_id, dtype=torch.long)  # (B, T), right-padded
            mask = torch.zeros_like(input_ids)
            for row, seq in enumerate(ids):
                input_ids[row, : len(seq)] = torch.tensor(seq)
                mask[row, : len(seq)] = 1
            with torch.inference_mode():
                logits = self.model(input_ids=input_ids.to(self.device), attention_mask=mask.to(self.device)).logits
            logits = logits.float()  # (B, num_labels)
            if self.label is None:
                out = logits[:, 0]
            elif self.multi_label:
                out = torch.sigmoid(logits)[:, self.label]
            else:
                out = torch.softmax(logits, dim=-1)[:, self.label]
            scores.extend(out.cpu().tolist())
        self.calls, self.texts = self.calls + 1, self.texts + len(texts)
        self.seconds += time.perf_counter() - start
        return scores

    def stats(self) -> dict[str, Any]:
        """How often ``score`` was called, how many texts it scored, and the seconds it took."""
        return {"calls": self.calls, "texts": self.texts, "seconds": self.seconds}


class RewardModelReward:
    """The batched reward (``score_batch``) that calls a :class:`RewardModelScorer` actor once per batch.

    The text scored is ``template`` filled with the sample's ``prompt`` (and ``answer``) and the ``response``; the
    reward is ``weight`` x the model's score. ``name`` is how errors name it (``reward model 'PATH'``). It runs
    inside the rollout actors: a call that outlasts ``timeout_s`` raises :class:`ActorTimeoutError`, and a scorer
    lost mid-call :class:`ActorLostError`, which tells the rollout group to wait for the scorer's restart and redo
    the rollout; an exception the scorer raises comes back as itself.
    """

    def __init__(
        self, scorer: Any, template: str = "{prompt}{response}", weight: float = 1.0, path: str = "",
        timeout_s: float = DEFAULT_TIMEOUT_S,
    ) -> None:
        self.scorer, self.template, self.weight, self.timeout_s = scorer, template, weight, timeout_s
        self.name = scorer_name(path)

    def text(self, ctx: RewardContext) -> str:
        return self.template.format(prompt=ctx.sample.prompt, answer=ctx.sample.answer, response=ctx.response_text)

    def score_batch(self, ctxs: list[RewardContext]) -> list[float]:
        import ray

        ref = self.scorer.score.remote([self.text(c) for c in ctxs])
        try:
            scores = ray.get(ref, timeout=self.timeout_s)
        except ray.exceptions.GetTimeoutError:
            raise ActorTimeoutError(
                f"{self.name} did not finish score within {self.timeout_s:g} s (cluster.actor_timeout_s)"
            ) from None
        except ray.exceptions.RayTaskError as err:
            # The scorer's own exception, so that the reward error reads "reward model ... raised ValueError: ...";
            # Ray's wrapper (the scorer's traceback) stays chained to it for the run's error.log.
            raise err.cause from err
        except ray.exceptions.RayActorError as err:
            raise ActorLostError(f"{self.name} was lost during score: {first_line(err)}") from None
        return [self.weight * s for s in scores]

    def wait_restarted(self, supervisor: Supervisor) -> None:
        """Wait for Ray to restart the scorer after it was lost (it holds no state the run changes)."""
        supervisor.wait_restarted(self.scorer, self.name)


class RewardModelServer:
    """The reward-model scorer started as its own Ray actor (in its bundle of the run's ``placement`` group, when
    given), and the reward that the rollout actors call.

    The model directory is shipped to the scorer's node through Ray (:mod:`cluster.files`, kept under
    ``node_storage``): ``reward_model.path`` need only exist where this server is built.
    """

    def __init__(
        self, cfg: RewardModelConfig, supervisor: Supervisor | None = None, placement: Placement | None = None,
        node_storage: str | None = None,
    ) -> None:
        import ray

        if cfg.path is None:
            raise ValueError("reward_model.path is not set; there is no reward model to start")
        self.supervisor = supervisor if supervisor is not None else Supervisor()
        device = "cuda" if cfg.num_gpus > 0 else "cpu"
        actor_cls = ray.remote(num_cpus=1, num_gpus=cfg.num_gpus, **self.supervisor.actor_options())(RewardModelScorer)
        self.files = ship(check_model_dir(cfg.path), node_storage)  # kept: a restarted scorer copies from it again
        options = placement.reward_model_options() if placement is not None else {}
        self.actor = actor_cls.options(**options).remote(cfg.path, cfg.label, cfg.batch_size, cfg.dtype, device,
                                                         self.files)
        name = scorer_name(cfg.path)
        self.info = self.supervisor.get(self.actor.ready.remote(), name, "start-up")
        self.reward = RewardModelReward(self.actor, cfg.template, cfg.weight, path=cfg.path,
                                        timeout_s=self.supervisor.timeout_s)

    def stats(self) -> dict[str, Any]:
        return self.supervisor.get(self.actor.stats.remote(), self.reward.name, "stats")

    def shutdown(self) -> None:
        import ray

        ray.kill(self.actor)
