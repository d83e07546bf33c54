"""vLLM rollout actors: each owns one vLLM engine and one textenv environment.

An actor samples whole responses with vLLM (token ids and their sampling log-probabilities), then replays every
response through the environment token by token for the per-token rewards; a batched terminal reward (a reward
model) scores all of a call's responses at once. New policy weights arrive by
``load_weights`` with a version number; ``sample`` refuses to run with weights older than the caller expects.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from textenv import BatchRewardFn, EnvConfig, HFTokenizerAdapter, TokenEnv, make_env, replay, score_pending


class StaleWeightsError(RuntimeError):
    """A rollout was asked for with weights the actor does not hold."""


@dataclass(frozen=True)
class EngineOptions:
    """What a rollout actor's vLLM engine needs (from ``RolloutConfig`` plus the model and sequence limits)."""

    model_dir: str
    dtype: str
    max_model_len: int
    max_num_seqs: int
    temperature: float
    kv_cache_gib: int
    gpu_memory_utilization: float
    seeded_sampling: bool
    seed: int


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
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(engine.kv_cache_gib))
        from vllm import LLM, SamplingParams

        self.index, self.opts = index, engine
        self._SamplingParams = SamplingParams
        start = time.perf_counter()
        self.llm = LLM(
            model=engine.model_dir, dtype=engine.dtype, enforce_eager=True, seed=engine.seed + index,
            max_model_len=engine.max_model_len, max_num_seqs=engine.max_num_seqs,
            gpu_memory_utilization=engine.gpu_memory_utilization,
        )
        self.tokenizer = HFTokenizerAdapter(self.llm.get_tokenizer())
        self.env: TokenEnv = make_env(
            env_cfg, tokenizer=self.tokenizer, batch_reward=batch_reward, disable_env_checker=True
        ).unwrapped
        self.weights_version = 0
        self._weight_names = self._engine_weight_names(engine.model_dir)
        self.sample(4, 1, seed=0, expected_version=0)  # warm-up: the first generate call is slow
        self.startup_s = time.perf_counter() - start

    def ready(self) -> dict[str, Any]:
        return {"index": self.index, "startup_s": self.startup_s, "pid": os.getpid()}

    # ------------------------------------------------------------------------------------------- weights
    def load_weights(self, named_arrays: dict[str, np.ndarray], version: int) -> int:
        """Swap new weights (Hugging Face names -> arrays) into the running engine; returns the new version."""
        import torch

        unknown = sorted(set(named_arrays) - self._weight_names)
        if unknown:  # vLLM would fail half-way and leave the engine broken; refuse before touching it
            raise ValueError(f"weights {unknown[:3]} are not parameters of the rollout model {self.opts.model_dir}")
        tensors = [(name, torch.tensor(arr)) for name, arr in named_arrays.items()]
        self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": tensors})
        self.llm.reset_prefix_cache()
        self.weights_version = version
        return version

    @staticmethod
    def _engine_weight_names(model_dir: str) -> set[str]:
        from safetensors import safe_open

        names: set[str] = set()
        for path in sorted(os.listdir(model_dir)):
            if path.endswith(".safetensors"):
                with safe_open(os.path.join(model_dir, path), framework="np") as f:
                    names.update(f.keys())
        return names

    # ------------------------------------------------------------------------------------------- sampling
    def sample(self, num_prompts: int, samples_per_prompt: int, seed: int, expected_version: int) -> dict[str, Any]:
        """Draw ``num_prompts`` problems (seeded), sample ``samples_per_prompt`` responses each, replay them.

        Returns fixed-shape arrays (rows of one prompt are consecutive): ``prompt_ids`` (N, P) left-padded,
        ``response_ids``/``sampling_logp``/``rewards`` (N, R) right-padded, ``response_length`` (N,), ``score``
        (N,), and counters.
        """
        if self.weights_version != expected_version:
            raise StaleWeightsError(
                f"rollout actor {self.index} holds weights version {self.weights_version}, asked for {expected_version}"
            )
        from vllm.inputs import TokensPrompt

        env, pad = self.env, self.tokenizer.pad_token_id
        P, R = env.max_prompt_tokens, env.max_response_tokens
        env.reset(seed=seed)  # seeds the environment's generator; each reset below draws the next problem
        samples, prompts = [], []
        for _ in range(num_prompts):
            env.reset()
            samples.append(env.sample)
            prompts.append(env.prompt_ids)
        requests, params = [], []
        for i, ids in enumerate(prompts):
            for j in range(samples_per_prompt):
                requests.append(TokensPrompt(prompt_token_ids=ids))
                params.append(self._sampling_params(R, seed * 100_003 + i * samples_per_prompt + j))
        t0 = time.perf_counter()
        outputs = self.llm.generate(requests, params, use_tqdm=False)
        t1 = time.perf_counter()

        N = len(requests)
        out = {
            "prompt_ids": np.full((N, P), pad, np.int64), "prompt_length": np.zeros(N, np.int64),
            "response_ids": np.full((N, R), pad, np.int64), "response_length": np.zeros(N, np.int64),
            "sampling_logp": np.zeros((N, R), np.float32), "rewards": np.zeros((N, R), np.float32),
            "score": np.zeros(N, np.float32), "terminated": np.zeros(N, bool),
        }
        episodes = [replay(env, samples[n // samples_per_prompt], o.outputs[0].token_ids, defer=True)
                    for n, o in enumerate(outputs)]
        t2 = time.perf_counter()
        score_pending(env, episodes)  # one call for every batched terminal reward (a reward model); else nothing
        t3 = time.perf_counter()
        generated = reward_errors = 0
        for n, (o, ep) in enumerate(zip(outputs, episodes)):
            prompt, completion = prompts[n // samples_per_prompt], o.outputs[0]
            tokens = list(completion.token_ids)
            generated += len(tokens)
            L = ep["length"]  # the environment may end the episode before vLLM stopped
            out["prompt_ids"][n, P - len(prompt) :] = prompt
            out["prompt_length"][n] = len(prompt)
            out["response_ids"][n, :L] = tokens[:L]
            out["response_length"][n] = L
            out["sampling_logp"][n, :L] = [next(iter(lp.values())).logprob for lp in completion.logprobs[:L]]
            out["rewards"][n, :L] = ep["rewards"]
            out["score"][n] = ep["score"]
            out["terminated"][n] = ep["terminated"]
            reward_errors += ep["reward_errors"]
        out.update(
            weights_version=self.weights_version, generate_s=t1 - t0, replay_s=t2 - t1, batch_reward_s=t3 - t2,
            postprocess_s=time.perf_counter() - t1,
            generated_tokens=generated, reward_errors=reward_errors,
            examples=[(samples[0].prompt, env.tokenizer.decode(out["response_ids"][0, : out["response_length"][0]]))],
        )
        return out

    def _sampling_params(self, max_tokens: int, seed: int) -> Any:
        return self._SamplingParams(
            max_tokens=max_tokens, temperature=self.opts.temperature, logprobs=0,
            stop_token_ids=[self.tokenizer.eos_token_id], seed=seed if self.opts.seeded_sampling else None,
            detokenize=False,
        )


class RolloutGroup:
    """The rollout actors of a run, started on Ray and driven together."""

    def __init__(
        self, num_actors: int, env_cfg: EnvConfig, engine: EngineOptions, num_gpus_per_actor: float,
        batch_reward: BatchRewardFn | None = None,
    ) -> None:
        import ray

        actor_cls = ray.remote(num_cpus=1, num_gpus=num_gpus_per_actor)(VLLMRolloutActor)
        self.actors = [actor_cls.remote(i, env_cfg, engine, batch_reward) for i in range(num_actors)]
        self.info = unwrap_ray_errors(lambda: ray.get([a.ready.remote() for a in self.actors]))

    def load_weights(self, named_arrays: dict[str, np.ndarray], version: int) -> None:
        """Push the same weights to every actor (one copy in the object store) and wait for all of them."""
        import ray

        ref = ray.put(named_arrays)
        versions = unwrap_ray_errors(lambda: ray.get([a.load_weights.remote(ref, version) for a in self.actors]))
        if any(v != version for v in versions):
            raise StaleWeightsError(f"weight sync to version {version} failed: actors report {versions}")

    def sample(self, num_prompts: int, samples_per_prompt: int, seed: int, version: int) -> dict[str, Any]:
        """Split the prompts over the actors, sample everywhere at once, and merge the results in actor order."""
        import ray

        counts = [len(c) for c in np.array_split(np.arange(num_prompts), len(self.actors))]
        refs = [
            a.sample.remote(n, samples_per_prompt, seed * 1009 + i, version)
            for i, (a, n) in enumerate(zip(self.actors, counts)) if n > 0
        ]
        parts = unwrap_ray_errors(lambda: ray.get(refs))
        stale = [p["weights_version"] for p in parts if p["weights_version"] != version]
        if stale:  # defence in depth: the actors already refuse, but a batch must never mix versions
            raise StaleWeightsError(f"rollouts sampled with weights {stale}, expected version {version}")
        merged = {k: np.concatenate([p[k] for p in parts]) for k, v in parts[0].items() if isinstance(v, np.ndarray)}
        merged.update(
            weights_version=version,
            generated_tokens=sum(p["generated_tokens"] for p in parts),
            reward_errors=sum(p["reward_errors"] for p in parts),
            generate_s=max(p["generate_s"] for p in parts),
            replay_s=max(p["replay_s"] for p in parts),
            batch_reward_s=max(p["batch_reward_s"] for p in parts),
            postprocess_s=max(p["postprocess_s"] for p in parts),
            examples=[e for p in parts for e in p["examples"]],
        )
        return merged

    def shutdown(self) -> None:
        import ray

        for a in self.actors:
            ray.kill(a)
        self.actors = []


def unwrap_ray_errors(fn: Any) -> Any:
    """Run ``fn``; a task that failed inside an actor re-raises its own exception, not Ray's wrapper."""
    import ray

    try:
        return fn()
    except ray.exceptions.RayTaskError as err:
        raise err.as_instanceof_cause() from None
    except ray.exceptions.RayActorError as err:
        lines = [ln.strip() for ln in str(err).splitlines() if ln.strip()]
        cause = next((ln for ln in reversed(lines) if "Error" in ln.split(":")[0]), lines[-1] if lines else "")
        raise RuntimeError(f"a Ray actor died: {cause}") from None
