"""vLLM rollout actors on Ray: whole responses with sampling log-probs, replayed through the environment."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from cluster.rollout import EngineOptions, RolloutGroup, StaleWeightsError
from cluster.trainer import build_batch
from policies.columns import OLD_LOGP, RESPONSE_MASK, SAMPLING_LOGP
from policies.config import AlgorithmConfig, PolicyConfig
from policies.learner import MODULE_ID, build_learner_group, group_rollout_stats
from policies.models import load_tokenizer, save_tiny_policy, weight_names
from tests.conftest import REVERSE_ALPHABET, TINY
from textenv import EnvConfig

pytestmark = [pytest.mark.ray, pytest.mark.vllm]
ENV = EnvConfig(id="textenv/Reverse-v0", task_kwargs={"length": 5, "letters": "abcdefgh"})


def engine(model_dir: Path, seeded: bool = True) -> EngineOptions:
    return EngineOptions(model_dir=str(model_dir), dtype="float32", max_model_len=11, max_num_seqs=64, temperature=1.0,
                         kv_cache_gib=1, gpu_memory_utilization=0.3, seeded_sampling=seeded, seed=0)


@pytest.fixture(scope="module")
def group(ray_session, tiny_model_dir: Path):
    g = RolloutGroup(2, ENV, engine(tiny_model_dir), 0)
    yield g
    g.shutdown()


def learner_logp(model_dir: Path, rollouts: dict, weights: dict | None = None) -> tuple[np.ndarray, dict]:
    group = build_learner_group(AlgorithmConfig(), PolicyConfig(), str(model_dir), 0, 0)
    if weights is not None:
        group.set_weights({MODULE_ID: weights})
    batch = build_batch(rollouts)
    stats = group_rollout_stats(group, batch, 64)
    group.shutdown()
    return stats[OLD_LOGP], batch


def test_samples_are_replayed_for_rewards(group: RolloutGroup, tiny_model_dir: Path) -> None:
    out = group.sample(16, 2, seed=3, version=0)
    tok = load_tokenizer(tiny_model_dir)
    assert out["prompt_ids"].shape == (32, 6) and out["response_ids"].shape == (32, 5)
    assert out["weights_version"] == 0 and out["generated_tokens"] >= out["response_length"].sum()
    for n in range(32):
        prompt = tok.decode(out["prompt_ids"][n, 6 - out["prompt_length"][n]:].tolist())
        response = tok.decode(out["response_ids"][n, : out["response_length"][n]].tolist(), skip_special_tokens=True)
        answer = prompt[:-1][::-1]
        expected = sum(a == b for a, b in zip(answer, response)) / 5  # the verifier, computed independently
        assert out["score"][n] == pytest.approx(expected)
        assert out["rewards"][n].sum() == pytest.approx(expected, abs=1e-6)
        assert (out["rewards"][n, out["response_length"][n]:] == 0).all()
        if out["terminated"][n]:  # vLLM stopped on EOS and the environment terminated on it
            assert out["response_ids"][n, out["response_length"][n] - 1] == tok.eos_token_id
    # Rows of one prompt are consecutive and share the prompt.
    assert (out["prompt_ids"][0::2] == out["prompt_ids"][1::2]).all()
    assert len({tuple(p) for p in out["prompt_ids"][0::2]}) > 10


def test_sampling_is_seeded(group: RolloutGroup) -> None:
    a, b, c = (group.sample(8, 1, seed=s, version=0) for s in (5, 5, 6))
    np.testing.assert_array_equal(a["response_ids"], b["response_ids"])
    np.testing.assert_array_equal(a["sampling_logp"], b["sampling_logp"])
    assert not np.array_equal(a["prompt_ids"], c["prompt_ids"])


def test_vllm_and_learner_logprobs_agree(group: RolloutGroup, tiny_model_dir: Path) -> None:
    out = group.sample(32, 1, seed=1, version=0)
    logp, batch = learner_logp(tiny_model_dir, out)
    mask = batch[RESPONSE_MASK] > 0
    gap = np.abs(logp - batch[SAMPLING_LOGP])[mask].mean()
    assert gap < 1e-3, gap


def test_stale_weights_are_refused(group: RolloutGroup) -> None:
    with pytest.raises(StaleWeightsError, match="holds weights version 0, asked for 4"):
        group.sample(4, 1, seed=0, version=4)


def test_weight_sync_changes_the_policy_and_restores_it(group: RolloutGroup, tiny_model_dir: Path) -> None:
    learner = build_learner_group(AlgorithmConfig(), PolicyConfig(), str(tiny_model_dir), 0, 0)
    original = learner.get_weights()[MODULE_ID]
    learner.shutdown()
    hf = lambda w: {k[3:]: v for k, v in w.items() if k.startswith("lm.")}  # noqa: E731
    rng = np.random.default_rng(0)
    perturbed = {k: (v + rng.normal(0, 0.2, v.shape)).astype(v.dtype) for k, v in original.items()}

    before = group.sample(16, 1, seed=9, version=0)
    group.load_weights(hf(perturbed), version=1)
    after = group.sample(16, 1, seed=9, version=1)
    assert not np.allclose(before["sampling_logp"], after["sampling_logp"])
    logp, batch = learner_logp(tiny_model_dir, after, weights=perturbed)
    mask = batch[RESPONSE_MASK] > 0
    assert np.abs(logp - batch[SAMPLING_LOGP])[mask].mean() < 1e-3  # the engine runs exactly the pushed weights
    with pytest.raises(StaleWeightsError):
        group.sample(4, 1, seed=0, version=0)

    group.load_weights(hf(original), version=0)
    again = group.sample(16, 1, seed=9, version=0)
    np.testing.assert_array_equal(before["response_ids"], again["response_ids"])
    np.testing.assert_allclose(before["sampling_logp"], again["sampling_logp"], atol=1e-6)


def test_unknown_weight_names_are_refused_before_touching_the_engine(group: RolloutGroup) -> None:
    with pytest.raises(ValueError, match=r"unknown \[.model.no_such_layer.weight.\]"):
        group.load_weights({"model.no_such_layer.weight": np.zeros((2, 2), np.float32)}, version=0)
    group.sample(4, 1, seed=0, version=0)  # still healthy


@pytest.mark.parametrize("arch", ["qwen2", "gpt2"])
def test_logprob_gap_per_architecture(ray_session, arch: str, tmp_path: Path) -> None:
    model_dir = save_tiny_policy(tmp_path / arch, REVERSE_ALPHABET, seed=2, arch=arch, **TINY)
    g = RolloutGroup(1, ENV, engine(model_dir), 0)
    try:
        out = g.sample(32, 1, seed=1, version=0)
    finally:
        g.shutdown()
    logp, batch = learner_logp(model_dir, out)
    mask = batch[RESPONSE_MASK] > 0
    assert np.abs(logp - batch[SAMPLING_LOGP])[mask].mean() < 1e-3


def test_lora_policy_pushes_merged_weights(group: RolloutGroup, tiny_model_dir: Path) -> None:
    from ray.rllib.policy.sample_batch import MultiAgentBatch, SampleBatch

    from policies.columns import ADVANTAGES, OLD_VALUES, RETURNS
    from policies.learner import hf_weights

    policy = PolicyConfig(lora_rank=4, lora_alpha=16.0)
    learner = build_learner_group(AlgorithmConfig(lr=5e-2), policy, str(tiny_model_dir), 0, 0)
    out = group.sample(16, 1, seed=2, version=0)
    batch = build_batch(out)
    stats = group_rollout_stats(learner, batch, 64)
    batch.update(stats)
    mask = batch[RESPONSE_MASK]
    batch[ADVANTAGES] = (np.random.default_rng(0).standard_normal(mask.shape) * mask).astype(np.float32)
    batch[RETURNS], batch[OLD_VALUES] = mask.copy(), np.zeros_like(mask)
    learner.update(batch=MultiAgentBatch({MODULE_ID: SampleBatch(batch)}, env_steps=16), num_epochs=3, minibatch_size=16)

    group.load_weights(hf_weights(learner.get_weights()[MODULE_ID], policy, weight_names(tiny_model_dir)), version=1)
    try:
        after = group.sample(16, 1, seed=2, version=1)
        b2 = build_batch(after)
        s2 = group_rollout_stats(learner, b2, 64)
        m = b2[RESPONSE_MASK] > 0
        assert not np.allclose(after["sampling_logp"], out["sampling_logp"])  # the adapters changed the policy
        assert np.abs(s2[OLD_LOGP] - b2[SAMPLING_LOGP])[m].mean() < 1e-3  # and vLLM runs exactly the merged model
    finally:
        base = build_learner_group(AlgorithmConfig(), PolicyConfig(), str(tiny_model_dir), 0, 0)
        group.load_weights(hf_weights(base.get_weights()[MODULE_ID], PolicyConfig(), weight_names(tiny_model_dir)), version=0)
        base.shutdown()
        learner.shutdown()


def test_temperature_learner_evaluates_the_distribution_vllm_samples_from(ray_session, tiny_model_dir: Path) -> None:
    from dataclasses import replace

    from policies.columns import REF_LOGP

    g = RolloutGroup(1, ENV, replace(engine(tiny_model_dir), temperature=0.7), 0)
    try:
        out = g.sample(32, 1, seed=1, version=0)
    finally:
        g.shutdown()
    batch = build_batch(out)
    mask = batch[RESPONSE_MASK] > 0
    gaps = {}
    for t in (0.7, 1.0):
        learner = build_learner_group(AlgorithmConfig(kl_coef=0.1), PolicyConfig(), str(tiny_model_dir), 0, 0,
                                      temperature=t)
        stats = group_rollout_stats(learner, batch, 64)
        learner.shutdown()
        gaps[t] = np.abs(stats[OLD_LOGP] - batch[SAMPLING_LOGP])[mask].mean()
        np.testing.assert_array_equal(stats[REF_LOGP], stats[OLD_LOGP])  # the reference is tempered alike
    assert gaps[0.7] < 1e-5, gaps  # vLLM returns log softmax(logits / T), and the learner computes the same
    assert gaps[1.0] > 1e-2, gaps  # the untempered policy is another distribution
