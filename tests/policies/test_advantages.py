"""Advantage estimators against plain-Python reference loops and hand-computed numbers.

Batches are right padded (mask zeros at the end) and mix sequences of different lengths (early EOS). Padded
positions hold garbage rewards / values on purpose: they must not leak into any result.
"""

from __future__ import annotations

import math
import random

import pytest
import torch

from policies.advantages import (
    ADVANTAGES,
    NEEDS_CRITIC,
    AdvantageParams,
    discounted_returns,
    gae,
    grpo,
    masked_mean,
    reinforce,
    rloo,
    whiten,
)

TOL = 1e-6
GARBAGE = 9.0  # written into padded positions; must never show up in a result


# ----------------------------------------------------------------------------- helpers


def t(rows: list[list[float]]) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float64)


def assert_close(actual: torch.Tensor, expected: list[list[float]] | list[float] | float, tol: float = TOL) -> None:
    got = actual.tolist()
    if isinstance(expected, float | int):
        assert got == pytest.approx(expected, abs=tol)
        return
    assert len(got) == len(expected)
    for g_row, e_row in zip(got, expected):
        assert g_row == pytest.approx(e_row, abs=tol), (got, expected)


def lengths(mask: list[list[float]]) -> list[int]:
    """Number of response tokens per row; asserts the mask is right padded (ones, then zeros)."""
    out = []
    for row in mask:
        n = int(sum(row))
        assert row == [1.0] * n + [0.0] * (len(row) - n), "reference loops expect right padding"
        out.append(n)
    return out


def zeros_like(rows: list[list[float]]) -> list[list[float]]:
    return [[0.0] * len(r) for r in rows]


def padded_batch(seed: int, batch: int, width: int, *, min_len: int = 1) -> tuple[list, list, list]:
    """rewards, values, mask in plain lists: random lengths in [min_len, width], garbage in the padding."""
    rng = random.Random(seed)
    rewards, values, mask = [], [], []
    for _ in range(batch):
        n = rng.randint(min_len, width)
        rewards.append([rng.uniform(-1, 1) for _ in range(n)] + [GARBAGE] * (width - n))
        values.append([rng.uniform(-1, 1) for _ in range(n)] + [-GARBAGE] * (width - n))
        mask.append([1.0] * n + [0.0] * (width - n))
    return rewards, values, mask


# Hand-made, right padded, early EOS: lengths 4, 2, 3, 1 in one batch of width 4.
HAND_REWARDS = [
    [0.0, 0.5, -0.25, 1.0],
    [0.3, 1.0, GARBAGE, GARBAGE],
    [-1.0, 0.0, 2.0, GARBAGE],
    [0.7, GARBAGE, GARBAGE, GARBAGE],
]
HAND_VALUES = [
    [0.1, 0.2, 0.3, 0.4],
    [-0.5, 0.25, GARBAGE, GARBAGE],
    [0.0, 1.5, -0.75, GARBAGE],
    [0.6, GARBAGE, GARBAGE, GARBAGE],
]
HAND_MASK = [
    [1.0, 1.0, 1.0, 1.0],
    [1.0, 1.0, 0.0, 0.0],
    [1.0, 1.0, 1.0, 0.0],
    [1.0, 0.0, 0.0, 0.0],
]


# ----------------------------------------------------------------------------- reference loops (pure Python)


def ref_discounted_returns(rewards, mask, gamma):
    out = zeros_like(rewards)
    for b, n in enumerate(lengths(mask)):
        running = 0.0
        for i in range(n - 1, -1, -1):
            running = rewards[b][i] + gamma * running
            out[b][i] = running
    return out


def ref_gae(rewards, values, mask, gamma, lam):
    adv, ret = zeros_like(rewards), zeros_like(rewards)
    for b, n in enumerate(lengths(mask)):
        last = 0.0
        for i in range(n - 1, -1, -1):
            next_value = values[b][i + 1] if i + 1 < n else 0.0  # the episode ends after the last token
            delta = rewards[b][i] + gamma * next_value - values[b][i]
            last = delta + gamma * lam * last
            adv[b][i] = last
            ret[b][i] = last + values[b][i]
    return adv, ret


def ref_scores(rewards, mask):
    return [sum(rewards[b][i] for i in range(n)) for b, n in enumerate(lengths(mask))]


def ref_grpo(rewards, mask, group_size, eps):
    s = ref_scores(rewards, mask)
    adv, ret = zeros_like(rewards), zeros_like(rewards)
    for start in range(0, len(s), group_size):
        grp = s[start : start + group_size]
        mean = sum(grp) / len(grp)
        std = math.sqrt(sum((x - mean) ** 2 for x in grp) / (len(grp) - 1))  # unbiased
        for j, x in enumerate(grp):
            b = start + j
            for i in range(lengths([mask[b]])[0]):
                adv[b][i] = (x - mean) / (std + eps)
                ret[b][i] = x
    return adv, ret


def ref_rloo(rewards, mask, group_size):
    s = ref_scores(rewards, mask)
    adv, ret = zeros_like(rewards), zeros_like(rewards)
    for start in range(0, len(s), group_size):
        for j in range(group_size):
            b = start + j
            others = [s[start + k] for k in range(group_size) if k != j]
            baseline = sum(others) / len(others)
            for i in range(lengths([mask[b]])[0]):
                adv[b][i] = s[b] - baseline
                ret[b][i] = s[b]
    return adv, ret


def ref_reinforce(rewards, mask, gamma):
    ret = ref_discounted_returns(rewards, mask, gamma)
    ns = lengths(mask)
    width = len(mask[0])
    baseline = []
    for i in range(width):
        live = [ret[b][i] for b in range(len(ns)) if i < ns[b]]
        baseline.append(sum(live) / len(live) if live else 0.0)
    adv = zeros_like(rewards)
    for b, n in enumerate(ns):
        for i in range(n):
            adv[b][i] = ret[b][i] - baseline[i]
    return adv, ret


def ref_masked_mean_all(x, mask):
    num = sum(x[b][i] for b in range(len(x)) for i in range(len(x[b])) if mask[b][i])
    den = sum(mask[b][i] for b in range(len(x)) for i in range(len(x[b])))
    return num / max(den, 1.0)


def ref_whiten(x, mask, eps):
    mean = ref_masked_mean_all(x, mask)
    var = ref_masked_mean_all([[(v - mean) ** 2 for v in row] for row in x], mask)
    return [[(v - mean) / math.sqrt(var + eps) if m else 0.0 for v, m in zip(row, mrow)] for row, mrow in zip(x, mask)]


# ----------------------------------------------------------------------------- registry


def test_registry_holds_the_documented_estimators() -> None:
    assert {"gae", "grpo", "rloo", "reinforce"} <= set(ADVANTAGES)
    assert ADVANTAGES["gae"] is gae and ADVANTAGES["grpo"] is grpo
    assert ADVANTAGES["rloo"] is rloo and ADVANTAGES["reinforce"] is reinforce
    assert NEEDS_CRITIC == {"gae"}


# ----------------------------------------------------------------------------- discounted returns


def test_discounted_returns_by_hand() -> None:
    # gamma = 0.5; row 0 = rewards [1, 0, 2]: G2 = 2, G1 = 0 + 0.5*2 = 1, G0 = 1 + 0.5*1 = 1.5
    # row 1 ends after one token (rewards [4], garbage after): G0 = 4, padding 0
    out = discounted_returns(t([[1.0, 0.0, 2.0], [4.0, GARBAGE, GARBAGE]]), t([[1, 1, 1], [1, 0, 0]]), 0.5)
    assert_close(out, [[1.5, 1.0, 2.0], [4.0, 0.0, 0.0]])


@pytest.mark.parametrize("gamma", [1.0, 0.9, 0.5, 0.0])
def test_discounted_returns_match_reference(gamma: float) -> None:
    for rewards, _, mask in [(HAND_REWARDS, None, HAND_MASK), padded_batch(1, 6, 7)]:
        out = discounted_returns(t(rewards), t(mask), gamma)
        assert_close(out, ref_discounted_returns(rewards, mask, gamma))


# ----------------------------------------------------------------------------- GAE


def test_gae_by_hand_gamma_one() -> None:
    # gamma = 1, lam = 0.95, rewards [0, 0, 1], values [0.5, 0.6, 0.7], no bootstrap after the last token:
    #   t=2: delta = 1 + 0   - 0.7 = 0.3            A2 = 0.3
    #   t=1: delta = 0 + 0.7 - 0.6 = 0.1            A1 = 0.1 + 0.95 * 0.3   = 0.385
    #   t=0: delta = 0 + 0.6 - 0.5 = 0.1            A0 = 0.1 + 0.95 * 0.385 = 0.46575
    # returns = A + V = [0.96575, 0.985, 1.0]
    p = AdvantageParams(gamma=1.0, lam=0.95)
    adv, ret = gae(t([[0.0, 0.0, 1.0]]), t([[0.5, 0.6, 0.7]]), t([[1, 1, 1]]), p)
    assert_close(adv, [[0.46575, 0.385, 0.3]])
    assert_close(ret, [[0.96575, 0.985, 1.0]])


def test_gae_by_hand_discounted_with_padding() -> None:
    # gamma = 0.9, lam = 0.8, row 0 has 2 tokens then padding (garbage value 9 must not be bootstrapped from):
    #   t=1: delta = 1 + 0.9*0   - 0.4 = 0.6                    A1 = 0.6
    #   t=0: delta = 0 + 0.9*0.4 - 0.2 = 0.16                   A0 = 0.16 + 0.9*0.8*0.6 = 0.592
    #   returns = [0.592 + 0.2, 0.6 + 0.4, 0] = [0.792, 1.0, 0]
    # row 1 is a single token: A0 = 0.5 - 1.0 = -0.5, return 0.5
    p = AdvantageParams(gamma=0.9, lam=0.8)
    rewards = t([[0.0, 1.0, GARBAGE], [0.5, GARBAGE, GARBAGE]])
    values = t([[0.2, 0.4, GARBAGE], [1.0, GARBAGE, GARBAGE]])
    adv, ret = gae(rewards, values, t([[1, 1, 0], [1, 0, 0]]), p)
    assert_close(adv, [[0.592, 0.6, 0.0], [-0.5, 0.0, 0.0]])
    assert_close(ret, [[0.792, 1.0, 0.0], [0.5, 0.0, 0.0]])


@pytest.mark.parametrize("gamma,lam", [(1.0, 1.0), (1.0, 0.95), (0.99, 0.95), (0.9, 0.5), (0.5, 0.0)])
def test_gae_matches_reference(gamma: float, lam: float) -> None:
    p = AdvantageParams(gamma=gamma, lam=lam)
    for rewards, values, mask in [(HAND_REWARDS, HAND_VALUES, HAND_MASK), padded_batch(2, 8, 6)]:
        adv, ret = gae(t(rewards), t(values), t(mask), p)
        ref_adv, ref_ret = ref_gae(rewards, values, mask, gamma, lam)
        assert_close(adv, ref_adv)
        assert_close(ret, ref_ret)


def test_gae_masked_positions_are_zero() -> None:
    adv, ret = gae(t(HAND_REWARDS), t(HAND_VALUES), t(HAND_MASK), AdvantageParams(gamma=0.9, lam=0.7))
    pad = t(HAND_MASK) == 0
    assert bool(pad.any())
    assert adv[pad].abs().max().item() == 0.0 and ret[pad].abs().max().item() == 0.0


def test_gae_lam_one_gives_discounted_return_minus_value() -> None:
    # With lam = 1 the advantage telescopes to G_t - V_t.
    rewards, values, mask = padded_batch(3, 5, 6)
    adv, ret = gae(t(rewards), t(values), t(mask), AdvantageParams(gamma=0.9, lam=1.0))
    g = ref_discounted_returns(rewards, mask, 0.9)
    assert_close(ret, g)
    assert_close(adv, [[(g[b][i] - values[b][i]) * mask[b][i] for i in range(6)] for b in range(5)])


# ----------------------------------------------------------------------------- GRPO


def test_grpo_by_hand() -> None:
    # One group of 4, outcome reward on the last token; lengths 3, 1, 2, 3 (right padded).
    # scores s = [1, 0, 0, 1]: mean 0.5, unbiased var = 4 * 0.25 / 3 = 1/3, std = 1/sqrt(3)
    # with eps = 0: A = +-0.5 * sqrt(3) = +-0.8660254037844386 on every response token
    rewards = t([[0.0, 0.0, 1.0], [0.0, GARBAGE, GARBAGE], [0.0, 0.0, GARBAGE], [0.0, 0.0, 1.0]])
    mask = t([[1, 1, 1], [1, 0, 0], [1, 1, 0], [1, 1, 1]])
    a = 0.8660254037844386
    adv, ret = grpo(rewards, torch.zeros_like(rewards), mask, AdvantageParams(group_size=4, eps=0.0))
    assert_close(adv, [[a, a, a], [-a, 0.0, 0.0], [-a, -a, 0.0], [a, a, a]])
    assert_close(ret, [[1.0, 1.0, 1.0], [0.0, 0.0, 0.0], [0.0, 0.0, 0.0], [1.0, 1.0, 1.0]])
    # the default eps = 1e-6 sits in the denominator: A = 0.5 / (1/sqrt(3) + 1e-6)
    adv, _ = grpo(rewards, torch.zeros_like(rewards), mask, AdvantageParams(group_size=4, eps=1e-6))
    assert adv[0, 0].item() == pytest.approx(0.5 / (1 / math.sqrt(3) + 1e-6), abs=1e-12)


@pytest.mark.parametrize("eps", [1e-6, 0.1])
def test_grpo_matches_reference(eps: float) -> None:
    rewards, values, mask = padded_batch(4, 12, 5)  # 3 groups of 4, lengths vary
    adv, ret = grpo(t(rewards), t(values), t(mask), AdvantageParams(group_size=4, eps=eps))
    ref_adv, ref_ret = ref_grpo(rewards, mask, 4, eps)
    assert_close(adv, ref_adv)
    assert_close(ret, ref_ret)


def test_grpo_identical_group_gives_zero_advantages() -> None:
    # group 0: every sequence scores 1 (different lengths) -> std 0 -> A = 0 / (0 + eps) = 0, not NaN
    rewards = t([[1.0, GARBAGE], [0.5, 0.5], [0.25, 0.75], [1.0, GARBAGE],
                 [1.0, 0.0], [0.0, GARBAGE], [2.0, 1.0], [0.0, 0.0]])  # fmt: skip
    mask = t([[1, 0], [1, 1], [1, 1], [1, 0], [1, 1], [1, 0], [1, 1], [1, 1]])
    adv, ret = grpo(rewards, torch.zeros_like(rewards), mask, AdvantageParams(group_size=4))
    assert bool(torch.isfinite(adv).all())
    assert adv[:4].abs().max().item() == 0.0
    assert adv[4:].abs().max().item() > 0.1  # the other group is normalised as usual
    assert_close(adv, ref_grpo(rewards.tolist(), mask.tolist(), 4, 1e-6)[0])


@pytest.mark.parametrize("fn", [grpo, rloo])
def test_batch_not_divisible_by_group_size_raises(fn) -> None:
    rewards = torch.ones(6, 3, dtype=torch.float64)
    with pytest.raises(ValueError):
        fn(rewards, torch.zeros_like(rewards), torch.ones_like(rewards), AdvantageParams(group_size=4))


# ----------------------------------------------------------------------------- RLOO


def test_rloo_by_hand() -> None:
    # group of 3 with scores [1, 2, 6] (row 0 ends early, row 2 splits its reward over two tokens):
    #   baseline_0 = (2 + 6) / 2 = 4   -> A = 1 - 4   = -3
    #   baseline_1 = (1 + 6) / 2 = 3.5 -> A = 2 - 3.5 = -1.5
    #   baseline_2 = (1 + 2) / 2 = 1.5 -> A = 6 - 1.5 =  4.5
    rewards = t([[1.0, GARBAGE], [0.0, 2.0], [5.0, 1.0]])
    mask = t([[1, 0], [1, 1], [1, 1]])
    adv, ret = rloo(rewards, torch.zeros_like(rewards), mask, AdvantageParams(group_size=3))
    assert_close(adv, [[-3.0, 0.0], [-1.5, -1.5], [4.5, 4.5]])
    assert_close(ret, [[1.0, 0.0], [2.0, 2.0], [6.0, 6.0]])


@pytest.mark.parametrize("k", [2, 4])
def test_rloo_matches_reference(k: int) -> None:
    rewards, values, mask = padded_batch(5, 3 * k, 5)
    adv, ret = rloo(t(rewards), t(values), t(mask), AdvantageParams(group_size=k))
    ref_adv, ref_ret = ref_rloo(rewards, mask, k)
    assert_close(adv, ref_adv)
    assert_close(ret, ref_ret)
    # the leave-one-out advantages of a group sum to zero
    scores = adv[:, 0].view(-1, k).sum(dim=1)
    assert scores.abs().max().item() < TOL


def test_rloo_group_size_one_raises() -> None:
    rewards = torch.ones(3, 2, dtype=torch.float64)
    with pytest.raises(ValueError):
        rloo(rewards, torch.zeros_like(rewards), torch.ones_like(rewards), AdvantageParams(group_size=1))


# ----------------------------------------------------------------------------- REINFORCE


def test_reinforce_by_hand() -> None:
    # gamma = 0.5, lengths 3, 1, 2:
    #   row A rewards [1, 0, 2] -> G = [1.5, 1, 2]
    #   row B rewards [4]       -> G = [4, 0, 0]
    #   row C rewards [0, 3]    -> G = [1.5, 3, 0]
    # baseline per position over the rows still alive there:
    #   pos 0: (1.5 + 4 + 1.5) / 3 = 7/3   pos 1: (1 + 3) / 2 = 2   pos 2: 2 / 1 = 2
    # A = G - baseline: A = [1.5 - 7/3, -1, 0] = [-5/6, -1, 0], B = [5/3, 0, 0], C = [-5/6, 1, 0]
    rewards = t([[1.0, 0.0, 2.0], [4.0, GARBAGE, GARBAGE], [0.0, 3.0, GARBAGE]])
    mask = t([[1, 1, 1], [1, 0, 0], [1, 1, 0]])
    adv, ret = reinforce(rewards, torch.zeros_like(rewards), mask, AdvantageParams(gamma=0.5))
    assert_close(adv, [[-5 / 6, -1.0, 0.0], [5 / 3, 0.0, 0.0], [-5 / 6, 1.0, 0.0]])
    assert_close(ret, [[1.5, 1.0, 2.0], [4.0, 0.0, 0.0], [1.5, 3.0, 0.0]])


@pytest.mark.parametrize("gamma", [1.0, 0.9])
def test_reinforce_matches_reference(gamma: float) -> None:
    for rewards, values, mask in [(HAND_REWARDS, HAND_VALUES, HAND_MASK), padded_batch(6, 7, 6)]:
        adv, ret = reinforce(t(rewards), t(values), t(mask), AdvantageParams(gamma=gamma))
        ref_adv, ref_ret = ref_reinforce(rewards, mask, gamma)
        assert_close(adv, ref_adv)
        assert_close(ret, ref_ret)


# ----------------------------------------------------------------------------- every estimator


@pytest.mark.parametrize("name", ["gae", "grpo", "rloo", "reinforce"])
def test_every_estimator_zeroes_padding_and_keeps_shape(name: str) -> None:
    adv, ret = ADVANTAGES[name](t(HAND_REWARDS), t(HAND_VALUES), t(HAND_MASK), AdvantageParams(group_size=2))
    pad = t(HAND_MASK) == 0
    assert adv.shape == ret.shape == (4, 4)
    assert adv[pad].abs().max().item() == 0.0 and ret[pad].abs().max().item() == 0.0


# ----------------------------------------------------------------------------- masked_mean / whiten


def test_masked_mean_by_hand() -> None:
    # valid entries: row 0 -> 1, 2; row 1 -> 4. garbage 100 must be ignored.
    x = t([[1.0, 2.0, 100.0], [4.0, 100.0, 100.0]])
    mask = t([[1, 1, 0], [1, 0, 0]])
    assert_close(masked_mean(x, mask), 7 / 3)
    assert_close(masked_mean(x, mask, dim=1), [1.5, 4.0])
    assert_close(masked_mean(x, mask, dim=0), [2.5, 2.0, 0.0])  # an empty column -> 0, not NaN
    assert_close(masked_mean(x, torch.zeros_like(mask)), 0.0)


def test_masked_mean_matches_reference() -> None:
    assert_close(masked_mean(t(HAND_REWARDS), t(HAND_MASK)), ref_masked_mean_all(HAND_REWARDS, HAND_MASK))


def test_whiten_by_hand() -> None:
    # valid [1, 2, 3] (garbage 100 in the padding): mean 2, biased var 2/3 -> [-1, 0, 1] / sqrt(2/3)
    out = whiten(t([[1.0, 2.0], [3.0, 100.0]]), t([[1, 1], [1, 0]]), eps=0.0)
    s = math.sqrt(1.5)  # 1 / sqrt(2/3) = 1.224744871391589
    assert_close(out, [[-s, 0.0], [s, 0.0]])


def test_whiten_matches_reference_and_normalises() -> None:
    rewards, _, mask = padded_batch(7, 6, 8)
    x = [[3.0 * v + 5.0 for v in row] for row in rewards]
    out = whiten(t(x), t(mask))
    assert_close(out, ref_whiten(x, mask, 1e-8))
    vals = [v for row, mrow in zip(out.tolist(), mask) for v, m in zip(row, mrow) if m]
    mean = sum(vals) / len(vals)
    std = math.sqrt(sum((v - mean) ** 2 for v in vals) / len(vals))
    assert mean == pytest.approx(0.0, abs=TOL)
    assert std == pytest.approx(1.0, abs=TOL)
    assert out[t(mask) == 0].abs().max().item() == 0.0


# ----------------------------------------------------------------------------- token credit (grpo, rloo)

TOKEN = dict(credit="token", gamma=1.0)


def test_grpo_token_credit_by_hand() -> None:
    # One group of 3, per-token rewards; reward-to-go g: [1, 0], [1, 1], [2, 1].
    # position 0: g = [1, 1, 2], mean 4/3, unbiased std 1/sqrt(3) -> A = [-1/sqrt(3), -1/sqrt(3), 2/sqrt(3)]
    # position 1: g = [0, 1, 1], mean 2/3, unbiased std 1/sqrt(3) -> A = [-2/sqrt(3), 1/sqrt(3), 1/sqrt(3)]
    rewards = t([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    mask = t([[1, 1], [1, 1], [1, 1]])
    s = 1 / math.sqrt(3)
    adv, ret = grpo(rewards, torch.zeros_like(rewards), mask, AdvantageParams(group_size=3, eps=0.0, **TOKEN))
    assert_close(adv, [[-s, -2 * s], [-s, s], [2 * s, s]])
    assert_close(ret, [[1.0, 0.0], [1.0, 1.0], [2.0, 1.0]])


def test_grpo_token_credit_counts_only_members_present_at_a_position() -> None:
    # row 1 ends after one token. position 0: g = [1, 0, 2], mean 1, std 1 -> A = [0, -1, 1];
    # position 1: only rows 0 and 2, g = [0, 1], mean 0.5, std sqrt(0.5) -> A = [-sqrt(.5), 0 (padding), sqrt(.5)]
    rewards = t([[1.0, 0.0], [0.0, GARBAGE], [1.0, 1.0]])
    mask = t([[1, 1], [1, 0], [1, 1]])
    h = math.sqrt(0.5)
    adv, _ = grpo(rewards, torch.zeros_like(rewards), mask, AdvantageParams(group_size=3, eps=0.0, **TOKEN))
    assert_close(adv, [[0.0, -h], [-1.0, 0.0], [1.0, h]])


def test_rloo_token_credit_by_hand() -> None:
    # reward-to-go as above. position 0: g = [1, 1, 2]: baselines [1.5, 1.5, 1] -> A = [-0.5, -0.5, 1];
    # position 1: g = [0, 1, 1]: baselines [1, 0.5, 0.5] -> A = [-1, 0.5, 0.5]
    rewards = t([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    mask = t([[1, 1], [1, 1], [1, 1]])
    adv, _ = rloo(rewards, torch.zeros_like(rewards), mask, AdvantageParams(group_size=3, **TOKEN))
    assert_close(adv, [[-0.5, -1.0], [-0.5, 0.5], [1.0, 0.5]])


def test_rloo_token_credit_alone_at_a_position_gets_zero() -> None:
    rewards = t([[1.0, 3.0], [0.0, GARBAGE]])  # row 0 is the only member with a second token
    mask = t([[1, 1], [1, 0]])
    adv, _ = rloo(rewards, torch.zeros_like(rewards), mask, AdvantageParams(group_size=2, **TOKEN))
    assert_close(adv, [[4.0, 0.0], [-4.0, 0.0]])


@pytest.mark.parametrize("fn", [grpo, rloo])
def test_token_credit_equals_sequence_credit_for_terminal_rewards(fn) -> None:
    # terminal-only reward and equal lengths: every token's reward-to-go is the sequence score
    gen = torch.Generator().manual_seed(0)
    rewards = torch.zeros(12, 5, dtype=torch.float64)
    rewards[:, -1] = torch.rand(12, generator=gen, dtype=torch.float64)
    mask = torch.ones_like(rewards)
    seq, _ = fn(rewards, torch.zeros_like(rewards), mask, AdvantageParams(group_size=4))
    tok, _ = fn(rewards, torch.zeros_like(rewards), mask, AdvantageParams(group_size=4, **TOKEN))
    assert_close(tok, seq.tolist())


def test_unknown_credit_raises() -> None:
    rewards = torch.ones(4, 2, dtype=torch.float64)
    with pytest.raises(ValueError, match="algorithm.credit"):
        grpo(rewards, torch.zeros_like(rewards), torch.ones_like(rewards), AdvantageParams(group_size=2, credit="x"))
