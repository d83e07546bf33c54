"""Evaluation on held-out problems: greedy accuracy and reward, and pass@k, by the vLLM rollout actors.

During training (``eval.every``), :class:`Evaluator` runs before the first update and every ``every`` iterations;
``tokengym eval RUN_DIR|MODEL_DIR`` does the same for a run's final weights or any model directory and writes
``eval.json``. The problems are fixed for a run: a generated task draws them from the seed stream
``EVAL_SEED + seed``, which no training rollout uses; a file task uses its held-out rows (``Task.heldout``).
"""

from __future__ import annotations


import contextlib
import json
import os
import tempfile
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from cluster.config import ConfigError, EvalConfig, ExperimentConfig, load_config
from textenv import EnvConfig, TaskSample, make_env

# Training's environment seeds (cluster.trainer.iteration_seed, then cluster.rollout.actor_seed) are below 2**64
# for any experiment seed below 2**32, so evaluation's seeds (from 2**64 up) are a stream training never draws from.
EVAL_SEED = 2**64
EVAL_FILE = "eval.json"
CORRECT = 1.0 - 1e-9  # a response is right when the task's verifier scores it 1


def heldout_problems(env_cfg: EnvConfig, seed: int, n: int) -> list[TaskSample]:
    """The evaluation problems of a run seeded ``seed``: the same every call, none drawn by training."""
    plain = replace(env_cfg, chat_template=False, system_prompt=None)  # the task alone; no tokenizer
    task = make_env(plain, disable_env_checker=True).unwrapped.task.heldout()
    if task.num_problems is not None:  # a fixed held-out set: each problem once
        n = min(n, task.num_problems)
    rng = np.random.default_rng(EVAL_SEED + seed)
    return [task.sample(rng) for _ in range(n)]


def eval_metrics(results: dict[str, np.ndarray], k: int) -> dict[str, float]:
    """``eval/`` metrics from the actors' per-problem results (greedy scores and returns, k sampled scores each)."""
    return {
        "eval/accuracy": float((results["greedy_score"] >= CORRECT).mean()),
        "eval/reward": float(results["greedy_return"].mean()),
        "eval/score": float(results["greedy_score"].mean()),
        "eval/pass@k": float((results["sampled_score"] >= CORRECT).any(axis=1).mean()),
        "eval/k": k,
        "eval/prompts": len(results["greedy_score"]),
        "eval/response_length": float(results["greedy_length"].mean()),
    }


class Evaluator:
    """A run's held-out problems, and their evaluation on a :class:`cluster.rollout.RolloutGroup`."""

    def __init__(self, env_cfg: EnvConfig, cfg: EvalConfig, seed: int) -> None:
        self.cfg = cfg
        self.problems = heldout_problems(env_cfg, seed, cfg.num_prompts)
        self.sampling_seed = seed * 1_000_003  # the same k seeds per problem at every evaluation of the run

    def run(self, rollouts: Any, version: int) -> tuple[dict[str, float], list[dict[str, Any]]]:
        """Metrics (plus ``timing/eval_s``) and every problem's greedy response: prompt, response, answer, score."""
        start = time.perf_counter()
        results = rollouts.evaluate(self.problems, self.cfg.k, self.cfg.temperature, self.sampling_seed, version)
        metrics = eval_metrics(results, self.cfg.k)
        metrics["timing/eval_s"] = time.perf_counter() - start
        examples = [{"prompt": p, "response": r, "answer": a, "score": float(s)}
                    for (p, r, a), s in zip(results["examples"], results["greedy_score"])]
        return metrics, examples


# ---------------------------------------------------------------------------------------------- tokengym eval
@contextlib.contextmanager
def engines(cfg: ExperimentConfig, model_dir: Path) -> Iterator[Any]:
    """Rollout actors (and the reward model, if any) serving ``model_dir`` with ``cfg``'s environment; Ray is started
    for them and stopped afterwards unless it was running already. The engines hold weights version 0. They are
    placed as a run's are (``cluster/placement.py``: the same bundles, without the learners').
    """
    import ray

    from cluster.files import ship, ship_task_files
    from cluster.placement import Placement, plan_placement
    from cluster.reward_model import RewardModelServer
    from cluster.rollout import RolloutGroup
    from cluster.run import check_before_ray, init_ray
    from cluster.trainer import engine_options, supervisor_for
    from policies.models import load_tokenizer
    from textenv import HFTokenizerAdapter

    check_before_ray(cfg)
    env = make_env(cfg.env, tokenizer=HFTokenizerAdapter(load_tokenizer(model_dir))).unwrapped
    started_ray = not ray.is_initialized()
    init_ray(cfg)
    supervisor = supervisor_for(cfg)
    storage = cfg.cluster.node_storage  # the actors read copies shipped to their nodes (cluster/files.py)
    placement = Placement(plan_placement(cfg, learners=False), cfg.cluster.actor_timeout_s, name="tokengym:eval")
    reward_model = group = None
    try:
        reward_model = (RewardModelServer(cfg.reward_model, supervisor, placement, storage)
                        if cfg.reward_model.path is not None else None)
        group = RolloutGroup(
            cfg.rollout.num_actors, ship_task_files(cfg.env, storage),
            # The directory holds whole weights (an export merges LoRA): no adapters to serve, whatever
            # rollout.lora_weights says.
            replace(engine_options(cfg, ship(model_dir, storage), env.max_prompt_tokens, env.max_response_tokens),
                    lora_rank=0),
            cfg.rollout.num_gpus_per_actor, batch_reward=reward_model.reward if reward_model is not None else None,
            num_cpus_per_actor=cfg.rollout.num_cpus_per_actor, supervisor=supervisor, placement=placement,
        )
        yield group
    finally:
        if group is not None:
            group.shutdown()
        if reward_model is not None:
            reward_model.shutdown()
        placement.remove()
        if started_ray:
            ray.shutdown()


def evaluate_model(cfg: ExperimentConfig, model_dir: Path) -> tuple[dict[str, float], list[dict[str, Any]]]:
    """Evaluate the model in ``model_dir`` on ``cfg``'s environment with ``cfg.eval`` (starts and stops Ray)."""
    try:
        evaluator = Evaluator(cfg.env, cfg.eval, cfg.seed)
    except ValueError as err:
        raise ConfigError(f"env: {err}") from None
    with engines(cfg, model_dir) as group:
        return evaluator.run(group, version=0)  # the engines hold the directory's weights: version 0


@contextlib.contextmanager
def quiet(cfg: ExperimentConfig, target: Path) -> Iterator[None]:
    """What Ray and vLLM print goes to ``console.log`` (unless ``tracking.verbose``), and a failure is one line with
    its traceback in ``error.log``: in the run directory, or for a model directory (maybe a read-only cache) in
    ``$TMPDIR/tokengym``."""
    from cluster.console import failures_logged, quiet_console

    log_dir = target if (target / "config.yaml").is_file() else Path(tempfile.gettempdir()) / "tokengym"
    log_dir.mkdir(parents=True, exist_ok=True)
    with quiet_console(log_dir, cfg.tracking.verbose), failures_logged(log_dir, passthrough=(ConfigError,)):
        yield


@contextlib.contextmanager
def target_model(
    target: Path | str, overrides: list[str], config: str | None = None, env_id: str | None = None,
) -> Iterator[tuple[ExperimentConfig, Path, Path]]:
    """``(cfg, model_dir, target)`` for a run directory (its config.yaml; its latest checkpoint exported to a
    temporary HF directory), a model directory (``config``, default configs/default.yaml), or a pulled model's name.
    ``env_id`` replaces the environment; ``overrides`` are section.key=value."""
    if not Path(target).exists():  # the name of a pulled model, e.g. smollm2-135m-instruct
        from cluster.pull import resolve_model_dir

        target = resolve_model_dir("target", str(target))
    target = Path(target)
    extra = ([f"env={json.dumps({'id': env_id})}"] if env_id else []) + list(overrides)
    if (target / "config.yaml").is_file():
        if config is not None:
            raise ConfigError(f"--config is for a model directory; the run directory {str(target)!r} brings its own "
                              "config.yaml (change it with section.key=value overrides)")
        from cluster.export import export_policy

        cfg = load_config(target / "config.yaml", extra)
        with tempfile.TemporaryDirectory() as tmp:
            yield cfg, export_policy(target, Path(tmp) / "policy"), target  # the latest checkpoint as a HF dir
    elif (target / "config.json").is_file():
        yield load_config(config, extra + [f"policy.model_path={target}"]), target, target
    else:
        raise ConfigError(f"{str(target)!r} is neither a run directory (config.yaml) nor a Hugging Face model "
                          "directory (config.json)")


def evaluate_path(
    target: Path, overrides: list[str], config: str | None = None, env_id: str | None = None, n: int | None = None,
    out: Path | None = None,
) -> Path:
    """``tokengym eval``: a run directory (its config, its latest checkpoint's weights) or a model directory (with
    ``config``, default configs/default.yaml, and ``env_id``); writes the metrics to ``out`` (default
    ``target/eval.json``) and returns that path."""
    extra = list(overrides) + ([f"eval.num_prompts={n}"] if n is not None else [])
    with target_model(target, extra, config, env_id) as (cfg, model_dir, target), quiet(cfg, target):
        metrics, examples = evaluate_model(cfg, model_dir)
    out = Path(out) if out is not None else target / EVAL_FILE
    report = {**metrics, "target": str(target), "env": asdict(cfg.env), "eval": asdict(cfg.eval), "seed": cfg.seed,
              "examples": examples}
    tmp = out.with_name(f".{out.name}.tmp")
    tmp.write_text(json.dumps(report, indent=1) + "\n")
    os.replace(tmp, out)
    return out


# ---------------------------------------------------------------------------------------------- tokengym sample
def sample_path(
    target: Path, overrides: list[str], config: str | None = None, env_id: str | None = None, n: int = 8,
    prompts: list[str] | None = None, greedy: bool = False,
) -> list[dict[str, Any]]:
    """``tokengym sample``: the policy's responses to ``n`` held-out problems (or to the given ``prompts``, which have
    no reference answer), sampled at the config's ``rollout.temperature`` (seeded by the run's seed) or greedily."""
    with target_model(target, list(overrides), config, env_id) as (cfg, model_dir, target), quiet(cfg, target):
        problems = ([TaskSample(p, "") for p in prompts] if prompts
                    else heldout_problems(cfg.env, cfg.seed, n))
        temperature = 0.0 if greedy else cfg.rollout.temperature
        with engines(cfg, model_dir) as group:
            rows = group.respond(problems, temperature, seed=cfg.seed * 1_000_003 + 7, version=0)
    for row in rows:
        if not row["answer"]:  # a prompt of the user's: the verifier has nothing to compare with
            row["score"] = row["return"] = None
    return rows


def format_samples(rows: list[dict[str, Any]], width: int = 100) -> str:
    """Rows of prompt / response / answer / reward as a readable text table (long texts wrapped, not cut)."""
    import textwrap

    def line(label: str, text: str, lead: str = "    ") -> str:  # long texts wrapped under their first line
        head = f"{lead}{label + ':':10s}"
        return textwrap.fill(repr(text)[1:-1], width, initial_indent=head, subsequent_indent=" " * len(head),
                             drop_whitespace=False, break_on_hyphens=False) if text else head

    out = []
    for i, row in enumerate(rows, 1):
        reward = "n/a (no answer)" if row["return"] is None else f"{row['return']:.3f} (score {row['score']:.3f})"
        out.append(line("prompt", row["prompt"], lead=f"[{i}] "))
        out.append(line("response", row["response"]))
        if row["answer"]:
            out.append(line("answer", row["answer"]))
        out.append(f"    {'reward:':10s}{reward}")
    rewards = [row["return"] for row in rows if row["return"] is not None]
    if rewards:
        out.append(f"mean reward {sum(rewards) / len(rewards):.3f} over {len(rewards)} problems; "
                   f"{sum(r['score'] >= CORRECT for r in rows if r['score'] is not None)} right")
    return "\n".join(out)
