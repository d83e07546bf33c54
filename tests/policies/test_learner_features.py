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
    ADVANTAGES, ATTENTION_MASK, INPUT_IDS, OLD_LOGP, POSITION_IDS, REF_LOGP, RESPONSE_MASK, RETURNS,
)
from policies.config import AlgorithmConfig, PolicyConfig
from policies.learner import MODULE_ID, build_learner_group, group_rollout_stats

from test_learner import ragged_rollouts  # noqa: E402  (same folder)


def prepared_batch(group, seed: int = 0, n: int = 8) -> dict:
    batch = build_batch(ragged_rollouts(np.random.default_rng(seed), n=n))
    stats = group_rollout_stats(group, batch, 64)
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


def test_separate_critic_has_its_own_transformer(tiny_model_dir: Path) -> None:
    policy = PolicyConfig(critic="separate")
    group = build_learner_group(AlgorithmConfig(lr=1e-3), policy, str(tiny_model_dir), 0, 0)
    module = group._learner.module[MODULE_ID]
    assert module.critic_body is not None and module.critic_body is not module.hf_model.base_model
    batch = prepared_batch(group)
    with torch.no_grad():
        t = {k: torch.from_numpy(v) for k, v in batch.items()}
        body = module.critic_body(input_ids=t[INPUT_IDS], attention_mask=t[ATTENTION_MASK],
                                  position_ids=t[POSITION_IDS]).last_hidden_state[:, -6:-1]
        expected = module.value_head(body).squeeze(-1)
        torch.testing.assert_close(module.forward_train(t)["vf_preds"], expected)
    before = group.get_weights()[MODULE_ID]
    one_step(group, batch)
    one_step(group, batch)  # the value head starts at zero, so the critic's trunk gets gradient from step 2
    after = group.get_weights()[MODULE_ID]
    critic_keys = [k for k in before if k.startswith("critic_body.")]
    assert critic_keys and any(not np.array_equal(before[k], after[k]) for k in critic_keys)
    from policies.learner import hf_weights
    from policies.models import weight_names

    pushed = hf_weights(after, policy, weight_names(tiny_model_dir))
    assert not any("critic" in k or "value_head" in k for k in pushed)  # vLLM gets the policy only
    group.shutdown()


def test_bf16_autocast_runs_the_same_update_approximately(tiny_model_dir: Path) -> None:
    fp32 = build_learner_group(AlgorithmConfig(), PolicyConfig(), str(tiny_model_dir), 0, 0)
    bf16 = build_learner_group(AlgorithmConfig(bf16="on"), PolicyConfig(), str(tiny_model_dir), 0, 0)
    assert bf16._learner._autocast_enabled() and not fp32._learner._autocast_enabled()  # auto: GPU only
    batch = prepared_batch(fp32)
    with bf16._learner._autocast(), torch.no_grad():
        low = bf16._learner.module[MODULE_ID].forward_train({k: torch.from_numpy(v) for k, v in batch.items()})
    mask = batch[RESPONSE_MASK] > 0
    assert low["action_logp"].dtype == torch.float32  # log-softmax is taken in float32 on bf16 logits
    np.testing.assert_allclose(low["action_logp"].numpy()[mask], batch[OLD_LOGP][mask], atol=0.1)
    s32, s16 = one_step(fp32, batch), one_step(bf16, batch)
    assert float(s16["policy_loss"]) == pytest.approx(float(s32["policy_loss"]), abs=0.02)
    fp32.shutdown()
    bf16.shutdown()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_learner_uses_bf16_autocast(tiny_model_dir: Path) -> None:
    group = build_learner_group(AlgorithmConfig(), PolicyConfig(), str(tiny_model_dir), 0, 1)
    assert group._learner._autocast_enabled()
    one_step(group, prepared_batch(group))
    group.shutdown()


def test_bf16_rollout_stats_use_the_update_autocast(tiny_model_dir: Path) -> None:
    """Old log-probs under the same bf16 autocast as the update: the first minibatch's PPO ratio is exactly 1."""
    group = build_learner_group(AlgorithmConfig(bf16="on", kl_coef=0.1), PolicyConfig(), str(tiny_model_dir), 0, 0)
    batch = prepared_batch(group)
    mask = batch[RESPONSE_MASK] > 0
    with group._learner._autocast(), torch.no_grad():
        low = group._learner.module[MODULE_ID].forward_train({k: torch.from_numpy(v) for k, v in batch.items()})
    np.testing.assert_array_equal(low["action_logp"].numpy()[mask], batch[OLD_LOGP][mask])
    np.testing.assert_array_equal(batch[REF_LOGP][mask], batch[OLD_LOGP][mask])  # the reference is autocast alike
    stats = one_step(group, batch)
    assert float(stats["approx_kl"]) == 0.0 and float(stats["clipfrac"]) == 0.0
    group.shutdown()


def test_chunked_logp_and_entropy_equal_the_whole_vocabulary_pass(tiny_model_dir: Path) -> None:
    from policies.models import load_causal_lm
    from policies.rl_module import response_hidden, response_targets, token_logp_entropy

    lm = load_causal_lm(tiny_model_dir)
    batch = {k: torch.from_numpy(v) for k, v in build_batch(ragged_rollouts(np.random.default_rng(0), n=16)).items()}
    targets = response_targets(batch)

    def run(chunk: int | None) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
        lm.zero_grad()
        logp, entropy = token_logp_entropy(lm, response_hidden(lm.base_model, batch), targets, 1.0, chunk)
        (logp.sum() + 0.1 * entropy.sum()).backward()
        return logp.detach(), entropy.detach(), [p.grad.clone() for p in lm.parameters()]

    with torch.no_grad():  # the computation as it was: one (B, R, V) log-softmax
        logp_all = torch.log_softmax(lm.get_output_embeddings()(response_hidden(lm.base_model, batch)).float(), -1)
        before = logp_all.gather(-1, targets.unsqueeze(-1)).squeeze(-1), -(logp_all.exp() * logp_all).sum(-1)
    whole, fits, chunked = run(None), run(512), run(7)  # 16 x 5 = 80 response tokens
    for got in (whole, fits):
        assert torch.equal(got[0], before[0]) and torch.equal(got[1], before[1])
    assert all(torch.equal(a, b) for a, b in zip(whole[2], fits[2]))
    assert torch.equal(chunked[0], whole[0]) and torch.equal(chunked[1], whole[1])  # rows are independent
    for a, b in zip(chunked[2], whole[2]):  # gradients flow through the recomputed chunks
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_rollout_stats_micro_batch_by_the_token_budget(tiny_model_dir: Path) -> None:
    group = build_learner_group(AlgorithmConfig(micro_batch_tokens=44), PolicyConfig(), str(tiny_model_dir), 0, 0)
    whole = build_learner_group(AlgorithmConfig(), PolicyConfig(), str(tiny_model_dir), 0, 0)
    batch = build_batch(ragged_rollouts(np.random.default_rng(0), n=8))  # rows of 11 tokens: 4 rows per pass
    sizes: list[int] = []
    body = group._learner.module[MODULE_ID].hf_model.base_model
    hook = body.register_forward_hook(lambda mod, args, kwargs, out: sizes.append(kwargs["input_ids"].shape[0]),
                                      with_kwargs=True)
    stats = group_rollout_stats(group, batch, 64)
    hook.remove()
    assert sizes == [4, 4]
    np.testing.assert_allclose(stats[OLD_LOGP], group_rollout_stats(whole, batch, 64)[OLD_LOGP], atol=1e-6)
    group.shutdown()
    whole.shutdown()


def test_dropout_is_forced_off_for_policy_reference_and_critic(tmp_path: Path) -> None:
    """Hub GPT-2 configs ship dropout 0.1: the learner turns it off, so the first PPO ratio is exactly 1."""
    from policies.models import dropout_keys, save_bpe_policy
    from tests.conftest import REAL_SHAPED

    model_dir = save_bpe_policy(tmp_path / "gpt2", "gpt2", dropout=0.1, **REAL_SHAPED)
    policy = PolicyConfig(critic="separate")
    group = build_learner_group(AlgorithmConfig(kl_coef=0.1), policy, str(model_dir), 0, 0)
    module = group._learner.module[MODULE_ID]
    for config in (module.hf_model.config, module.critic_body.config, group._learner._ref_lm.config):
        assert dropout_keys(config) and all(getattr(config, k) == 0.0 for k in dropout_keys(config))
    batch = prepared_batch(group)
    stats = one_step(group, batch)  # rollout_stats ran in eval mode, the update in train mode
    assert float(stats["approx_kl"]) == 0.0 and float(stats["clipfrac"]) == 0.0
    group.shutdown()
