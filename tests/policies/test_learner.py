"""The Transformer RLModule and the RLlib Learner: one-pass log-probs, real updates, exact checkpoints."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from cluster.checkpoint import latest_checkpoint, read_state, save_checkpoint
from cluster.trainer import build_batch
from policies.columns import (
    ADVANTAGES, ATTENTION_MASK, ENTROPY, INPUT_IDS, LOGP, POSITION_IDS, RESPONSE_MASK,
    RETURNS, VALUES,
)
from policies.config import AlgorithmConfig, PolicyConfig
from policies.learner import MODULE_ID, build_learner_group
from policies.models import load_causal_lm, save_tiny_policy
from tests.conftest import REVERSE_ALPHABET, TINY

PAD = 0


def ragged_rollouts(rng: np.random.Generator, n: int = 8, P: int = 6, R: int = 5, vocab: int = 11) -> dict:
    """Prompts of different lengths (left-padded) and responses of different lengths (right-padded)."""
    prompt_len = rng.integers(2, P + 1, size=n)
    resp_len = rng.integers(1, R + 1, size=n)
    prompts = np.full((n, P), PAD, np.int64)
    responses = np.full((n, R), PAD, np.int64)
    for i in range(n):
        prompts[i, P - prompt_len[i]:] = rng.integers(2, vocab, size=prompt_len[i])
        responses[i, : resp_len[i]] = rng.integers(1, vocab, size=resp_len[i])
    return {
        "prompt_ids": prompts, "prompt_length": prompt_len, "response_ids": responses, "response_length": resp_len,
        "rewards": rng.random((n, R)).astype(np.float32) * (np.arange(R) < resp_len[:, None]),
        "sampling_logp": np.zeros((n, R), np.float32),
    }


def per_prefix_logp(lm: torch.nn.Module, rollouts: dict) -> np.ndarray:
    """The slow reference: each response token scored by its own forward pass over the unpadded prefix."""
    n, R = rollouts["response_ids"].shape
    P = rollouts["prompt_ids"].shape[1]
    out = np.zeros((n, R), np.float32)
    for i in range(n):
        prompt = rollouts["prompt_ids"][i, P - rollouts["prompt_length"][i]:].tolist()
        response = rollouts["response_ids"][i].tolist()
        for t in range(rollouts["response_length"][i]):
            ids = torch.tensor([prompt + response[:t]])
            with torch.no_grad():
                logits = lm(input_ids=ids).logits[0, -1].float()
            out[i, t] = torch.log_softmax(logits, -1)[response[t]].item()
    return out


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt2"])
def test_one_forward_pass_matches_per_prefix_recomputation(arch: str, tmp_path: Path) -> None:
    model_dir = save_tiny_policy(tmp_path / arch, REVERSE_ALPHABET, seed=1, arch=arch, **TINY)
    group = build_learner_group(AlgorithmConfig(), PolicyConfig(arch=arch), str(model_dir), 0, 0)
    rollouts = ragged_rollouts(np.random.default_rng(0))
    batch = build_batch(rollouts)
    module = group._learner.module[MODULE_ID]
    with torch.no_grad():
        out = module.forward_train({k: torch.from_numpy(v) for k, v in batch.items()})
    mask = batch[RESPONSE_MASK] > 0
    expected = per_prefix_logp(load_causal_lm(model_dir).eval(), rollouts)
    np.testing.assert_allclose(out[LOGP].numpy()[mask], expected[mask], atol=2e-5)
    assert out[LOGP].shape == out[ENTROPY].shape == out[VALUES].shape == mask.shape
    assert (out[ENTROPY].numpy()[mask] > 0).all() and (out[ENTROPY].numpy()[mask] <= np.log(11) + 1e-5).all()
    group.shutdown()


def _train_batch(group, rollouts: dict) -> dict:
    batch = build_batch(rollouts)
    rows, stats = list(group.foreach_learner(lambda learner: learner.rollout_stats(
        {k: batch[k] for k in (INPUT_IDS, ATTENTION_MASK, POSITION_IDS, RESPONSE_MASK)}, 4)))[0].get()
    assert sorted(rows) == list(range(len(rows)))
    batch.update(stats)
    mask = batch[RESPONSE_MASK]
    batch[ADVANTAGES] = (np.random.default_rng(1).standard_normal(mask.shape) * mask).astype(np.float32)
    batch[RETURNS] = (np.ones_like(mask) * mask).astype(np.float32)
    return batch


def _update(group, batch: dict) -> dict:
    from ray.rllib.policy.sample_batch import MultiAgentBatch, SampleBatch

    mab = MultiAgentBatch({MODULE_ID: SampleBatch(dict(batch))}, env_steps=len(batch[RESPONSE_MASK]))
    return group.update(batch=mab, num_epochs=2, minibatch_size=4, shuffle_batch_per_epoch=True)[0][MODULE_ID]


def test_update_changes_parameters_and_fits_the_critic(tiny_model_dir: Path) -> None:
    group = build_learner_group(AlgorithmConfig(lr=1e-3), PolicyConfig(), str(tiny_model_dir), 0, 0)
    batch = _train_batch(group, ragged_rollouts(np.random.default_rng(2)))
    before = group.get_weights()[MODULE_ID]
    first = _update(group, batch)
    after = group.get_weights()[MODULE_ID]
    changed = [k for k in before if not np.array_equal(before[k], after[k])]
    assert len(changed) == len(before), "every parameter (LM and value head) moves after one update"
    for key in ("policy_loss", "value_loss", "entropy", "approx_kl", "clipfrac"):
        assert np.isfinite(float(first[key])), key
    # Value clipping at 0.2 around the old values (0: the head starts at zero) bounds the pessimistic loss below by
    # 0.5 * (1 - 0.2)^2 = 0.32 however far the critic moves towards the return 1; it gets there and stays.
    losses = [float(_update(group, batch)["value_loss"]) for _ in range(10)]
    assert min(losses) >= 0.32 - 1e-5 and losses[-1] == pytest.approx(0.32, abs=0.01)
    group.shutdown()

    # Without clipping the critic regresses towards the constant return 1 on the same batch.
    free = build_learner_group(AlgorithmConfig(lr=1e-3, value_clip=None), PolicyConfig(), str(tiny_model_dir), 0, 0)
    first = _update(free, batch)
    for _ in range(10):
        last = _update(free, batch)
    assert float(last["value_loss"]) < 0.5 * float(first["value_loss"])
    free.shutdown()


def test_checkpoint_restores_weights_and_optimizer_exactly(tiny_model_dir: Path, tmp_path: Path) -> None:
    algo = AlgorithmConfig(lr=1e-3)
    group = build_learner_group(algo, PolicyConfig(), str(tiny_model_dir), 0, 0)
    batch = _train_batch(group, ragged_rollouts(np.random.default_rng(3)))
    _update(group, batch)
    saved = save_checkpoint(tmp_path / "ckpts", 7, group, {"weights_version": 8}, keep=2)
    assert latest_checkpoint(tmp_path / "ckpts") == saved and read_state(saved)["iteration"] == 7
    assert not list((tmp_path / "ckpts").glob(".tmp-*")), "no temporary folder is left behind"

    fresh = build_learner_group(algo, PolicyConfig(), str(tiny_model_dir), 0, 0)
    fresh.restore_from_path(str((saved / "learner").resolve()))
    for k, v in group.get_weights()[MODULE_ID].items():
        np.testing.assert_array_equal(fresh.get_weights()[MODULE_ID][k], v)
    opt_a = group._learner.get_optimizer(MODULE_ID).state_dict()
    opt_b = fresh._learner.get_optimizer(MODULE_ID).state_dict()
    assert opt_a["state"].keys() == opt_b["state"].keys() and opt_a["state"]
    for k in opt_a["state"]:
        for name in ("exp_avg", "exp_avg_sq", "step"):
            torch.testing.assert_close(opt_b["state"][k][name], opt_a["state"][k][name], rtol=0, atol=0)
    # The same next update from both: the restored learner continues exactly where the first stopped.
    np.random.seed(0)
    _update(group, batch)
    np.random.seed(0)
    _update(fresh, batch)
    for k, v in group.get_weights()[MODULE_ID].items():
        np.testing.assert_allclose(fresh.get_weights()[MODULE_ID][k], v, atol=1e-7)
    # Older checkpoints beyond `keep` are pruned.
    for it in (8, 9):
        save_checkpoint(tmp_path / "ckpts", it, group, {"weights_version": it + 1}, keep=2)
    assert sorted(p.name for p in (tmp_path / "ckpts").glob("iter_*")) == ["iter_000008", "iter_000009"]
    group.shutdown()
    fresh.shutdown()


def test_gradients_are_clipped_by_their_global_norm_and_non_finite_ones_zeroed(tiny_model_dir: Path, caplog) -> None:
    from policies.learner import GRAD_NORM_KEY

    group = build_learner_group(AlgorithmConfig(grad_clip=1.0), PolicyConfig(), str(tiny_model_dir), 0, 0)
    learner = group._learner
    assert learner.get_optimizer(MODULE_ID).defaults["foreach"] is True  # each op over all parameters at once
    config = learner.config.get_config_for_module(MODULE_ID)
    a, b = torch.tensor([3.0, 4.0]), torch.tensor([[12.0]])  # global L2 norm 13
    out = learner.postprocess_gradients_for_module(module_id=MODULE_ID, config=config,
                                                   module_gradients_dict={"a": a, "b": b})
    scale = 1.0 / (13.0 + 1e-6)
    torch.testing.assert_close(out["a"], torch.tensor([3.0, 4.0]) * scale)
    torch.testing.assert_close(out["b"], torch.tensor([[12.0]]) * scale)
    assert learner.metrics.peek((MODULE_ID, GRAD_NORM_KEY)) == pytest.approx(13.0)
    small = {"a": torch.tensor([0.3, 0.4])}  # norm 0.5 < 1: left as it is
    learner.postprocess_gradients_for_module(module_id=MODULE_ID, config=config, module_gradients_dict=small)
    torch.testing.assert_close(small["a"], torch.tensor([0.3, 0.4]))

    # A non-finite gradient anywhere: every gradient of the step is zero (RLlib's outcome), with a warning; a fresh
    # Adam then leaves the weights exactly as they were.
    batch = _train_batch(group, ragged_rollouts(np.random.default_rng(4)))
    batch[ADVANTAGES] = np.full_like(batch[ADVANTAGES], np.nan)
    before = group.get_weights()[MODULE_ID]
    with caplog.at_level("WARNING", logger="policies.learner"):
        _update(group, batch)
    assert "nan/inf" in caplog.text
    after = group.get_weights()[MODULE_ID]
    for k, v in before.items():
        np.testing.assert_array_equal(after[k], v)
    group.shutdown()
