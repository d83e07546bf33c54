"""Multi-turn responses: the environment's reply tokens sit between action tokens with mask 0, and the estimators
skip them, as if the sequence held the action tokens alone."""

from __future__ import annotations

import pytest
import torch

from policies.advantages import ADVANTAGES, AdvantageParams, discounted_returns, gae


def test_gae_passes_over_reply_tokens_by_hand() -> None:
    # actions at 0 and 2, the environment's reply at 1 (value 9 and reward 0 there must not matter)
    rewards = torch.tensor([[0.0, 0.0, 1.0]])
    values = torch.tensor([[0.5, 9.0, 0.7]])
    mask = torch.tensor([[1.0, 0.0, 1.0]])
    adv, ret = gae(rewards, values, mask, AdvantageParams(gamma=1.0, lam=0.95))
    # t=2: delta = 1 - 0.7 = 0.3; t=0: delta = 0 + 0.7 - 0.5 = 0.2, adv = 0.2 + 0.95 * 0.3 = 0.485
    torch.testing.assert_close(adv, torch.tensor([[0.485, 0.0, 0.3]]))
    torch.testing.assert_close(ret, torch.tensor([[0.985, 0.0, 1.0]]))


@pytest.mark.parametrize("name", ["gae", "reinforce"])
def test_holes_equal_the_compressed_sequence(name: str) -> None:
    g = torch.Generator().manual_seed(0)
    B, R = 6, 9
    mask = (torch.rand(B, R, generator=g) > 0.35).float()
    mask[:, 0] = 1.0
    rewards, values = torch.rand(B, R, generator=g), torch.rand(B, R, generator=g)
    p = AdvantageParams(gamma=0.9, lam=0.8)
    adv, ret = ADVANTAGES[name](rewards, values, mask, p)
    for b in range(B):
        keep = mask[b] > 0
        n = int(keep.sum())
        if name == "gae":
            ca, cr = gae(rewards[b, keep][None], values[b, keep][None], torch.ones(1, n), p)
            torch.testing.assert_close(adv[b, keep], ca[0])
            torch.testing.assert_close(ret[b, keep], cr[0])
        else:
            torch.testing.assert_close(ret[b, keep], discounted_returns(rewards[b, keep][None], torch.ones(1, n), 0.9)[0])
        assert (adv[b, ~keep] == 0).all() and (ret[b, ~keep] == 0).all()
