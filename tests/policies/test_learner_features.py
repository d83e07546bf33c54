"""Learner features: gradient accumulation, the learning-rate schedule, the frozen reference policy for KL."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from ray.rllib.policy.sample_batch import MultiAgentBatch, SampleBatch
from ray.rllib.utils.metrics import NUM_ENV_STEPS_SAMPLED_LIFETIME

from cluster.trainer import build_batch
from policies.columns import (
    ADVANTAGES, ATTENTION_MASK, INPUT_IDS, OLD_LOGP, OLD_VALUES, POSITION_IDS, REF_LOGP, RESPONSE_MASK, RETURNS,
)
from policies.config import AlgorithmConfig, PolicyConfig
from policies.learner import MODULE_ID, build_learner_group

from test_learner import ragged_rollouts  # noqa: E402  (same folder)


def prepared_batch(group, seed: int = 0, n: int = 8) -> dict:
    batch = build_batch(ragged_rollouts(np.random.default_rng(seed), n=n))
    inputs = {k: batch[k] for k in (INPUT_IDS, ATTENTION_MASK, POSITION_IDS, RESPONSE_MASK)}
    _, stats = list(group.foreach_learner(lambda learner: learner.rollout_stats(inputs, 64)))[0].get()
    batch.update(stats)
    mask = batch[RESPONSE_MASK]
    batch[ADVANTAGES] = (np.random.default_rng(seed + 1).standard_normal(mask.shape) * mask).astype(np.float32)
    batch[RETURNS] = (np.random.default_rng(seed + 2).random(mask.shape) * mask).astype(np.float32)
    return batch


def one_step(group, batch: dict, iteration: int = 0) -> dict:
    n = len(batch[RESPONSE_MASK])
    mab = MultiAgentBatch({MODULE_ID: SampleBatch(dict(batch))}, env_steps=n)
    return group.update(batch=mab, num_epochs=1, minibatch_size=n, shuffle_batch_per_epoch=False,
                        timesteps={NUM_ENV_STEPS_SAMPLED_LIFETIME: iteration})[0][MODULE_ID]


@pytest.mark.parametrize("agg", ["token_mean", "seq_mean"])
def test_gradient_accumulation_gives_the_same_update(tiny_model_dir: Path, agg: str) -> None:
    whole = build_learner_group(AlgorithmConfig(loss_agg=agg, grad_clip=None), PolicyConfig(), str(tiny_model_dir), 0, 0)
    batch = prepared_batch(whole)
    L = batch[INPUT_IDS].shape[1]
    split = build_learner_group(AlgorithmConfig(loss_agg=agg, grad_clip=None, micro_batch_tokens=3 * L), PolicyConfig(),
                                str(tiny_model_dir), 0, 0)
    assert len(split._learner._micro_batches({MODULE_ID: {k: torch.from_numpy(v) for k, v in batch.items()}})) == 3
    one_step(whole, batch)
    one_step(split, batch)
    # The gradients the optimizer applied (kept on the parameters until the next step) are the same.
    grads_a = {n: p.grad for n, p in whole._learner.module[MODULE_ID].named_parameters()}
    grads_b = {n: p.grad for n, p in split._learner.module[MODULE_ID].named_parameters()}
    assert grads_a.keys() == grads_b.keys() and all(g is not None for g in grads_a.values())
    for pid in grads_a:
        torch.testing.assert_close(grads_b[pid], grads_a[pid], rtol=1e-4, atol=1e-7, msg=lambda m, pid=pid: f"{pid}: {m}")
    a, b = whole.get_weights()[MODULE_ID], split.get_weights()[MODULE_ID]
    for k in a:  # and so are the weights after Adam's step (to float rounding, which Adam magnifies slightly)
        np.testing.assert_allclose(b[k], a[k], atol=5e-5, err_msg=k)
    whole.shutdown()
    split.shutdown()


def test_learning_rate_schedule_follows_the_iterations(tiny_model_dir: Path) -> None:
    algo = AlgorithmConfig(lr=1e-3, lr_schedule=[[0, 1e-3], [10, 1e-4]])
    group = build_learner_group(algo, PolicyConfig(), str(tiny_model_dir), 0, 0)
    batch = prepared_batch(group)
    optimizer = group._learner.get_optimizer(MODULE_ID)
    lrs = []
    for iteration in (0, 5, 10, 20):
        one_step(group, batch, iteration)
        lrs.append(optimizer.param_groups[0]["lr"])
    # The lr is set after each update from the iteration it was given: linear from 1e-3 at 0 to 1e-4 at 10, then flat.
    np.testing.assert_allclose(lrs, [1e-3, 5.5e-4, 1e-4, 1e-4], rtol=1e-6)
    group.shutdown()


@pytest.mark.parametrize("where", ["loss", "reward"])
def test_reference_policy_is_frozen_and_loaded_only_for_kl(tiny_model_dir: Path, where: str) -> None:
    off = build_learner_group(AlgorithmConfig(), PolicyConfig(), str(tiny_model_dir), 0, 0)
    assert off._learner._ref_lm is None
    assert REF_LOGP not in prepared_batch(off)
    off.shutdown()

    algo = AlgorithmConfig(lr=3e-3, kl_coef=0.1, kl_in=where)
    group = build_learner_group(algo, PolicyConfig(), str(tiny_model_dir), 0, 0)
    batch = prepared_batch(group)
    mask = batch[RESPONSE_MASK] > 0
    np.testing.assert_allclose(batch[REF_LOGP][mask], batch[OLD_LOGP][mask], atol=1e-6)  # same weights at the start
    ref_before = {k: v.clone() for k, v in group._learner._ref_lm.state_dict().items()}
    for _ in range(5):
        stats = one_step(group, batch)
    if where == "loss":
        assert float(stats["kl_ref"]) > 0  # the policy moved away from the reference, and the loss sees it
    else:
        assert "kl_ref" not in stats
    after = prepared_batch(group)
    assert np.abs(after[REF_LOGP] - after[OLD_LOGP])[mask].mean() > 1e-3
    for k, v in group._learner._ref_lm.state_dict().items():
        torch.testing.assert_close(v, ref_before[k], rtol=0, atol=0)  # the reference never trains
    group.shutdown()
