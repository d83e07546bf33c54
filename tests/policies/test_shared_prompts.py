"""Shared prompts: each distinct prompt of a minibatch forwarded once (algorithm.share_prompts), and minibatches of
whole groups (algorithm.group_minibatches)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from cluster.config import ConfigError, load_config
from cluster.trainer import build_batch, group_epoch_order
from policies.columns import RESPONSE_MASK
from policies.models import load_causal_lm, save_tiny_policy
from policies.rl_module import response_hidden, shared_prompts, token_logp_entropy
from tests.conftest import REVERSE_ALPHABET, TINY
from tests.policies.test_learner import ragged_rollouts


def grouped_rollouts(rng: np.random.Generator, groups: int, n: int, P: int = 6, R: int = 5) -> dict:
    """``groups`` prompts of different lengths, each repeated for its ``n`` samples (consecutive rows, as the
    rollout actors return them); every response its own, of its own length."""
    base = ragged_rollouts(rng, groups * n, P, R)
    for key in ("prompt_ids", "prompt_length"):
        base[key] = np.repeat(base[key][::n], n, axis=0)
    return base


def tensors(rollouts: dict) -> dict[str, torch.Tensor]:
    return {k: torch.from_numpy(v) for k, v in build_batch(rollouts).items()}


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt2"])
def test_shared_prompt_forward_matches_one_forward_per_sequence(arch: str, tmp_path: Path) -> None:
    """Log-probs, entropies and every parameter's gradient are those of one forward pass per sequence."""
    lm = load_causal_lm(save_tiny_policy(tmp_path / arch, REVERSE_ALPHABET, seed=3, arch=arch, **TINY)).train()
    batch = tensors(grouped_rollouts(np.random.default_rng(0), groups=4, n=8))
    assert shared_prompts(batch) is not None  # 4 prompts for 32 rows: this batch takes the shared path
    targets = batch["input_ids"][:, -batch[RESPONSE_MASK].shape[1]:]
    mask = batch[RESPONSE_MASK]
    results = {}
    for share in (False, True):
        lm.zero_grad(set_to_none=True)
        hidden = response_hidden(lm.base_model, batch, share_prompts=share)
        logp, entropy = token_logp_entropy(lm, hidden, targets)
        loss = ((logp * torch.linspace(-1, 1, logp.numel()).reshape(logp.shape) + 0.1 * entropy) * mask).sum()
        loss.backward()
        grads = {name: p.grad.clone() for name, p in lm.named_parameters() if p.grad is not None}
        results[share] = (logp.detach() * mask, entropy.detach() * mask, grads)
    (logp0, ent0, grads0), (logp1, ent1, grads1) = results[False], results[True]
    torch.testing.assert_close(logp1, logp0, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ent1, ent0, rtol=1e-5, atol=1e-5)
    assert grads1.keys() == grads0.keys() and len(grads0) == len(list(lm.parameters()))
    for name in grads0:
        torch.testing.assert_close(grads1[name], grads0[name], rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("share", [False, True])
@pytest.mark.parametrize("R", [5, 1])
def test_the_last_column_is_never_forwarded(share: bool, R: int, tmp_path: Path) -> None:
    """The response tokens' hidden states are the full forward pass's columns -R-1 .. -2, computed without the last
    column (it predicts nothing): the body never sees it, and changing its token changes nothing."""
    lm = load_causal_lm(save_tiny_policy(tmp_path / "lm", REVERSE_ALPHABET, seed=3, arch="llama", **TINY)).eval()
    batch = tensors(grouped_rollouts(np.random.default_rng(0), groups=4, n=8, R=R))
    assert shared_prompts(batch) is not None  # with share_prompts, this batch takes the shared path
    widths = []
    body = lm.base_model
    hook = body.register_forward_pre_hook(lambda _, args, kwargs: widths.append(kwargs["input_ids"].shape[1]),
                                          with_kwargs=True)
    with torch.no_grad():
        hidden = response_hidden(body, batch, share_prompts=share)
    hook.remove()
    L = batch["input_ids"].shape[1]
    assert sum(widths) == L - 1  # columns 0 .. L - 2, each once: in one pass, or the prompts' and then the rest
    with torch.no_grad():
        full = body(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                    position_ids=batch["position_ids"]).last_hidden_state[:, -R - 1 : -1]
        changed = dict(batch, input_ids=batch["input_ids"].clone())
        changed["input_ids"][:, -1] = (changed["input_ids"][:, -1] + 1) % lm.config.vocab_size
        again = response_hidden(body, changed, share_prompts=share)
    assert hidden.shape == full.shape == (32, R, lm.config.hidden_size)
    torch.testing.assert_close(hidden, full, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(again, hidden, rtol=0, atol=0)


def test_shared_prompts_found_only_where_they_save_tokens() -> None:
    """The distinct prompts and each row's prompt; no sharing for one sample per prompt or too few repeats."""
    rng = np.random.default_rng(1)
    rollouts = grouped_rollouts(rng, groups=3, n=4)
    first, inverse = shared_prompts(tensors(rollouts))
    assert len(first) == 3
    prompts = rollouts["prompt_ids"]
    assert (prompts[first.numpy()][inverse.numpy()] == prompts).all()  # each row's prompt is its own
    by_group = inverse.reshape(3, 4)
    assert (by_group == by_group[:, :1]).all() and len(set(by_group[:, 0].tolist())) == 3  # one prompt per group
    assert shared_prompts(tensors(ragged_rollouts(rng, 16))) is None  # every prompt once
    pairs = grouped_rollouts(rng, groups=8, n=2, P=6, R=6)  # 8 x 6 + 16 x 6 = 144 of 192 tokens: not worth it
    assert shared_prompts(tensors(pairs)) is None


def test_group_epoch_order_keeps_groups_whole_and_shards_apart() -> None:
    np.random.seed(0)
    rows, group, epochs, shards = 48, 4, 3, 2
    order = group_epoch_order(rows, group, epochs, shards)
    assert len(order) == rows * epochs
    for k, shard in enumerate(np.split(order, shards)):  # what RLlib hands learner k: its own rows, every epoch
        mine = np.arange(rows)[k * rows // shards:(k + 1) * rows // shards]
        for epoch in np.split(shard, epochs):
            assert sorted(epoch) == list(mine)
            starts = epoch[::group]
            assert (starts % group == 0).all()  # each group starts at its first row and runs in order
            assert (epoch.reshape(-1, group) == starts[:, None] + np.arange(group)).all()
    np.random.seed(0)
    assert (group_epoch_order(rows, group, epochs, shards) == order).all()  # seeded: a run repeats
    epochs_of_shard0 = np.split(np.split(order, shards)[0], epochs)
    assert any((a != b).any() for a, b in zip(epochs_of_shard0, epochs_of_shard0[1:]))  # reshuffled per epoch


def test_group_minibatches_needs_whole_groups_per_minibatch() -> None:
    with pytest.raises(ConfigError, match="algorithm.group_minibatches=true needs groups"):
        load_config("configs/grpo.yaml", ["algorithm.group_minibatches=true", "algorithm.minibatch_size=60",
                                          "rollout.prompts_per_iteration=60"])
    with pytest.raises(ConfigError, match="rollout.samples_per_prompt >= 2"):
        load_config("configs/default.yaml", ["algorithm.group_minibatches=true"])
    assert load_config("configs/grpo.yaml", ["algorithm.group_minibatches=true"]).algorithm.group_minibatches
