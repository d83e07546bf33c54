"""Real-shaped checkpoints (tied embeddings, byte-level BPE tokenizer, chat template) through vLLM and the learner."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np
import pytest

from cluster.rollout import EngineOptions, RolloutGroup
from cluster.trainer import build_batch
from policies.columns import OLD_LOGP, RESPONSE_MASK, SAMPLING_LOGP
from policies.config import AlgorithmConfig, PolicyConfig
from policies.learner import MODULE_ID, build_learner_group, group_rollout_stats, hf_weights
from policies.models import ARCHITECTURES, weight_names
from textenv import EnvConfig

pytestmark = [pytest.mark.ray, pytest.mark.vllm]
ENV = EnvConfig(id="textenv/Reverse-v0", task_kwargs={"length": 5, "letters": "abcdefgh"})


def engine(model_dir: Path, temperature: float = 1.0) -> EngineOptions:
    return EngineOptions(model_dir=str(model_dir), dtype="float32", max_model_len=11, max_num_seqs=64,
                         temperature=temperature, kv_cache_gib=1, gpu_memory_utilization=0.3, seeded_sampling=True,
                         seed=0)


def perturbed_weights(learner, scale: float = 0.05) -> dict[str, np.ndarray]:
    """The learner's weights plus noise, set on the learner and read back (tied parameters stay one tensor)."""
    state = learner.get_weights()[MODULE_ID]
    rng = np.random.default_rng(0)
    learner.set_weights({MODULE_ID: {k: (v + rng.normal(0, scale, v.shape)).astype(v.dtype) for k, v in state.items()}})
    return learner.get_weights()[MODULE_ID]


def logprob_gap(learner, rollouts: dict) -> np.ndarray:
    batch = build_batch(rollouts)
    stats = group_rollout_stats(learner, batch, 64)
    return np.abs(stats[OLD_LOGP] - batch[SAMPLING_LOGP])[batch[RESPONSE_MASK] > 0]


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_tied_checkpoint_weight_sync_and_logprobs(ray_session, real_shaped_model: Callable[[str], Path], arch: str) -> None:
    model_dir = real_shaped_model(arch)
    names = weight_names(model_dir)
    assert names.tied == {"lm_head.weight"}
    learner = build_learner_group(AlgorithmConfig(), PolicyConfig(), str(model_dir), 0, 0)
    group = RolloutGroup(1, ENV, engine(model_dir), 0)
    try:
        before = group.sample(32, 1, seed=1, version=0)
        assert logprob_gap(learner, before).max() < 1e-4
        weights = hf_weights(perturbed_weights(learner), PolicyConfig(), names)
        assert set(weights) == names.names  # GPT-2 included: HF's "transformer.h.0..." names go to vLLM as they are
        group.load_weights(weights, version=1)
        after = group.sample(32, 1, seed=1, version=1)
        assert not np.allclose(before["sampling_logp"], after["sampling_logp"])
        gap = logprob_gap(learner, after)
        assert gap.max() < 1e-4, gap.max()  # the engine runs exactly the pushed weights, tied head included

        # Names are checked both ways before the engine is touched.
        with pytest.raises(ValueError, match=r"unknown \['lm_head.weight'\]"):
            group.load_weights({**weights, "lm_head.weight": weights[sorted(weights)[0]]}, version=2)
        dropped = sorted(weights)[0]
        with pytest.raises(ValueError, match=rf"missing \['{dropped}'\]"):
            group.load_weights({k: v for k, v in weights.items() if k != dropped}, version=2)
        again = group.sample(32, 1, seed=1, version=1)  # still healthy, still the pushed weights
        np.testing.assert_array_equal(again["sampling_logp"], after["sampling_logp"])
    finally:
        group.shutdown()
        learner.shutdown()


@pytest.mark.e2e
@pytest.mark.parametrize("arch, extra", [("qwen2", []), ("gpt2", ["policy.lora_rank=4"])])
def test_train_runs_end_to_end_from_a_tied_checkpoint(
    real_shaped_model: Callable[[str], Path], tmp_path: Path, arch: str, extra: list[str]
) -> None:
    from cluster.tracking import read_metrics
    from tests.cluster.test_e2e import only_run, tokengym

    result = tokengym(
        "train", f"policy.model_path={real_shaped_model(arch)}", "iterations=3", "name=tied", "rollout.num_actors=1",
        "rollout.prompts_per_iteration=32", "algorithm.minibatch_size=32", "algorithm.num_epochs=2", *extra,
        runs=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    rows = read_metrics(only_run(tmp_path))
    assert [r["weights/version"] for r in rows] == [2, 3, 4]  # every sync reached the engine
    assert max(r["rollout/logprob_gap"] for r in rows) < 1e-4  # and the engine ran the learner's weights
