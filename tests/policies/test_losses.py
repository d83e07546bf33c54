"""Policy objectives, the value loss, aggregation and KL estimators against hand numbers and plain-Python loops.

Batches are right padded and mix sequence lengths (early EOS); padded positions carry garbage that must not leak.
"""

from __future__ import annotations

import math
import random

import pytest
import torch

from policies.losses import KL_ESTIMATORS, OBJECTIVES, aggregate, ppo_clip, value_loss, vanilla_pg

TOL = 1e-6
GARBAGE = 9.0


# ----------------------------------------------------------------------------- helpers


def t(rows) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float64)


def approx(x: float) -> object:
    return pytest.approx(x, abs=TOL)


def ref_aggregate(x, mask, how):
    """Plain-Python token_mean / seq_mean over the masked entries."""
    if how == "token_mean":
        num = sum(v for row, mrow in zip(x, mask) for v, m in zip(row, mrow) if m)
        den = sum(1 for mrow in mask for m in mrow if m)
        return num / max(den, 1)
    per_seq = []
    for row, mrow in zip(x, mask):
        n = sum(1 for m in mrow if m)
        if n:
            per_seq.append(sum(v for v, m in zip(row, mrow) if m) / n)
    return sum(per_seq) / len(per_seq) if per_seq else 0.0


def elementwise(fn, *rows_lists):
    return [[fn(*vals) for vals in zip(*rows)] for rows in zip(*rows_lists)]


def ref_ppo_terms(logp, old_logp, adv, clip):
    def term(lp, olp, a):
        ratio = math.exp(lp - olp)
        clipped_ratio = min(max(ratio, 1.0 - clip), 1.0 + clip)
        return -min(ratio * a, clipped_ratio * a)

    return elementwise(term, logp, old_logp, adv)


def ref_k3_old_new(logp, old_logp):
    return elementwise(lambda lp, olp: (math.exp(lp - olp) - 1.0) - (lp - olp), logp, old_logp)


def random_batch(seed: int, batch: int, width: int):
    """logp, old_logp, advantages, mask as lists; random lengths (right padded), garbage in the padding."""
    rng = random.Random(seed)
    logp, old, adv, mask = [], [], [], []
    for _ in range(batch):
        n = rng.randint(1, width)
        pad = width - n
        o = [rng.uniform(-3.0, -0.1) for _ in range(n)]
        old.append(o + [GARBAGE] * pad)
        logp.append([v + rng.uniform(-0.6, 0.6) for v in o] + [-GARBAGE] * pad)  # ratios in ~[0.55, 1.8]
        adv.append([rng.uniform(-2.0, 2.0) for _ in range(n)] + [GARBAGE] * pad)
        mask.append([1.0] * n + [0.0] * pad)
    return logp, old, adv, mask


# ----------------------------------------------------------------------------- registries


def test_registries_hold_the_documented_names() -> None:
    assert {"ppo_clip", "vanilla_pg"} <= set(OBJECTIVES)
    assert OBJECTIVES["ppo_clip"] is ppo_clip and OBJECTIVES["vanilla_pg"] is vanilla_pg
    assert {"k1", "k2", "k3"} <= set(KL_ESTIMATORS)


# ----------------------------------------------------------------------------- aggregate


def test_aggregate_token_mean_vs_seq_mean_by_hand() -> None:
    # row 0: four tokens of 1; row 1: one token of 5 then padding (garbage 9).
    #   token_mean = (1 + 1 + 1 + 1 + 5) / 5 = 1.8    (every token weighs the same)
    #   seq_mean   = (mean(1,1,1,1) + mean(5)) / 2 = (1 + 5) / 2 = 3.0   (every sequence does)
    x = t([[1.0, 1.0, 1.0, 1.0], [5.0, GARBAGE, GARBAGE, GARBAGE]])
    mask = t([[1, 1, 1, 1], [1, 0, 0, 0]])
    assert aggregate(x, mask, "token_mean").item() == approx(1.8)
    assert aggregate(x, mask, "seq_mean").item() == approx(3.0)


def test_aggregate_seq_mean_skips_empty_rows_and_all_empty_is_zero() -> None:
    # an all-padding row does not count as a sequence: seq_mean = (1 + 5) / 2, not (1 + 5 + 0) / 3
    x = t([[1.0, 1.0], [5.0, GARBAGE], [GARBAGE, GARBAGE]])
    mask = t([[1, 1], [1, 0], [0, 0]])
    assert aggregate(x, mask, "seq_mean").item() == approx(3.0)
    assert aggregate(x, mask, "token_mean").item() == approx(7 / 3)
    empty = torch.zeros_like(mask)
    assert aggregate(x, empty, "seq_mean").item() == 0.0
    assert aggregate(x, empty, "token_mean").item() == 0.0


def test_aggregate_matches_reference() -> None:
    _, _, x, mask = random_batch(0, 7, 6)
    for how in ("token_mean", "seq_mean"):
        assert aggregate(t(x), t(mask), how).item() == approx(ref_aggregate(x, mask, how))


def test_aggregate_rejects_unknown_mode() -> None:
    with pytest.raises(ValueError):
        aggregate(torch.ones(2, 2), torch.ones(2, 2), "sum")  # type: ignore[arg-type]


# ----------------------------------------------------------------------------- PPO clip


# clip = 0.2 -> the ratio is clipped to [0.8, 1.2]. Per token (ratio, A) -> -min(r*A, clip(r)*A):
#   t1 (1.1, +2)  inside       : min(2.2, 2.2)   = 2.2  -> -2.2
#   t2 (1.5, +1)  above, A > 0 : min(1.5, 1.2)   = 1.2  -> -1.2   (clipped branch)
#   t3 (1.5, -1)  above, A < 0 : min(-1.5, -1.2) = -1.5 ->  1.5   (unclipped branch)
#   t4 (0.5, +1)  below, A > 0 : min(0.5, 0.8)   = 0.5  -> -0.5   (unclipped branch)
#   t5 (0.5, -1)  below, A < 0 : min(-0.5, -0.8) = -0.8 ->  0.8   (clipped branch)
#   t6 (0.9, -2)  inside       : min(-1.8, -1.8) = -1.8 ->  1.8
# Row 0 = t1..t4, row 1 = t5, t6 then two padded tokens (early EOS).
#   token_mean = (-2.2 - 1.2 + 1.5 - 0.5 + 0.8 + 1.8) / 6 = 0.2 / 6 = 0.0333...
#   seq_mean   = ((-2.2 - 1.2 + 1.5 - 0.5) / 4 + (0.8 + 1.8) / 2) / 2 = (-0.6 + 1.3) / 2 = 0.35
#   clipfrac   = |r - 1| > 0.2 on t2..t5 = 4 / 6
#   approx_kl  = mean of (r - 1) - log r over the six tokens
HAND_RATIOS = [[1.1, 1.5, 1.5, 0.5], [0.5, 0.9, 3.0, 3.0]]
HAND_ADV = [[2.0, 1.0, -1.0, 1.0], [-1.0, -2.0, GARBAGE, GARBAGE]]
HAND_MASK = [[1, 1, 1, 1], [1, 1, 0, 0]]
HAND_OLD = [[-1.0, -0.5, -2.0, -0.25], [-1.5, -0.75, -1.0, -1.0]]


def hand_logps() -> tuple[torch.Tensor, torch.Tensor]:
    old = t(HAND_OLD)
    return old + torch.log(t(HAND_RATIOS)), old


def test_ppo_clip_by_hand() -> None:
    logp, old = hand_logps()
    loss, stats = ppo_clip(logp, old, t(HAND_ADV), t(HAND_MASK), 0.2, "token_mean")
    assert loss.item() == approx(0.2 / 6)
    loss_seq, _ = ppo_clip(logp, old, t(HAND_ADV), t(HAND_MASK), 0.2, "seq_mean")
    assert loss_seq.item() == approx(0.35)
    assert stats["clipfrac"].item() == approx(4 / 6)
    ratios = [1.1, 1.5, 1.5, 0.5, 0.5, 0.9]
    assert stats["approx_kl"].item() == approx(sum(r - 1 - math.log(r) for r in ratios) / 6)
    # written out: t1 0.1 - log 1.1 = 0.0046898; t2, t3 0.5 - log 1.5 = 0.0945349 each;
    # t4, t5 -0.5 - log 0.5 = 0.1931472 each; t6 -0.1 - log 0.9 = 0.0053605 -> sum 0.5854145 / 6
    assert stats["approx_kl"].item() == approx(0.0975690801261772)


def test_ppo_clip_at_ratio_one_is_minus_mean_advantage() -> None:
    logp = t([[-1.0, -2.0, GARBAGE], [-0.5, -0.1, -0.3]])
    adv = t([[1.0, -3.0, GARBAGE], [0.5, 2.0, 0.5]])
    mask = t([[1, 1, 0], [1, 1, 1]])
    loss, stats = ppo_clip(logp, logp.clone(), adv, mask, 0.2, "token_mean")
    assert loss.item() == approx(-(1.0 - 3.0 + 0.5 + 2.0 + 0.5) / 5)
    assert stats["clipfrac"].item() == 0.0 and stats["approx_kl"].item() == approx(0.0)


@pytest.mark.parametrize("clip", [0.1, 0.2, 0.3])
@pytest.mark.parametrize("agg", ["token_mean", "seq_mean"])
def test_ppo_clip_matches_reference(clip: float, agg: str) -> None:
    logp, old, adv, mask = random_batch(1, 9, 7)
    loss, stats = ppo_clip(t(logp), t(old), t(adv), t(mask), clip, agg)
    assert loss.item() == approx(ref_aggregate(ref_ppo_terms(logp, old, adv, clip), mask, agg))
    outside = elementwise(lambda lp, olp: float(abs(math.exp(lp - olp) - 1.0) > clip), logp, old)
    assert stats["clipfrac"].item() == approx(ref_aggregate(outside, mask, "token_mean"))
    assert stats["approx_kl"].item() == approx(ref_aggregate(ref_k3_old_new(logp, old), mask, "token_mean"))


def test_ppo_clip_gradient_is_zero_where_the_clipped_branch_is_active() -> None:
    # d loss / d logp_t = -r_t * A_t / N on tokens where the unclipped branch is taken (token_mean, N = 6),
    # and exactly 0 where the clipped branch is taken (t2: r > 1 + eps with A > 0; t5: r < 1 - eps with A < 0)
    # and on padding.
    logp, old = hand_logps()
    logp = logp.clone().requires_grad_(True)
    loss, _ = ppo_clip(logp, old, t(HAND_ADV), t(HAND_MASK), 0.2, "token_mean")
    loss.backward()
    grad = logp.grad.tolist()
    assert grad[0][1] == 0.0  # t2: ratio 1.5 > 1.2, A = +1 -> clipped branch, no gradient
    assert grad[1][0] == 0.0  # t5: ratio 0.5 < 0.8, A = -1 -> clipped branch, no gradient
    assert grad[1][2] == 0.0 and grad[1][3] == 0.0  # padding
    assert grad[0][0] == approx(-1.1 * 2.0 / 6)  # t1 inside
    assert grad[0][2] == approx(-1.5 * -1.0 / 6)  # t3 above the range but A < 0: still pushed down
    assert grad[0][3] == approx(-0.5 * 1.0 / 6)  # t4 below the range but A > 0: still pushed up
    assert grad[1][1] == approx(-0.9 * -2.0 / 6)  # t6 inside


def test_ppo_clip_gradient_matches_reference_on_random_batch() -> None:
    clip = 0.2
    logp, old, adv, mask = random_batch(2, 8, 6)
    lp = t(logp).requires_grad_(True)
    loss, _ = ppo_clip(lp, t(old), t(adv), t(mask), clip, "token_mean")
    loss.backward()
    n = sum(sum(r) for r in mask)
    clipped_active = 0
    for b in range(len(mask)):
        for i in range(len(mask[b])):
            g = lp.grad[b, i].item()
            if not mask[b][i]:
                assert g == 0.0
                continue
            r, a = math.exp(logp[b][i] - old[b][i]), adv[b][i]
            if (r > 1 + clip and a > 0) or (r < 1 - clip and a < 0):
                clipped_active += 1
                assert g == 0.0
            else:
                assert g == approx(-r * a / n)
    assert clipped_active > 0  # the case actually exercises the clipped branch


# ----------------------------------------------------------------------------- vanilla PG


def test_vanilla_pg_by_hand() -> None:
    # -logp * A: row 0 = [-(-0.5)(2), -(-1)(-1), -(-2)(0.5)] = [1, -1, 1]; row 1 = [-(-0.25)(4)] = [1] + padding
    #   token_mean = (1 - 1 + 1 + 1) / 4 = 0.5 ; seq_mean = (1/3 + 1) / 2 = 2/3
    # old_logp only feeds approx_kl: ratios exp(logp - old) = [e^0.5, 1, e^-1, 1]
    logp = t([[-0.5, -1.0, -2.0], [-0.25, GARBAGE, GARBAGE]])
    old = t([[-1.0, -1.0, -1.0], [-0.25, 0.0, 0.0]])
    adv = t([[2.0, -1.0, 0.5], [4.0, GARBAGE, GARBAGE]])
    mask = t([[1, 1, 1], [1, 0, 0]])
    loss, stats = vanilla_pg(logp, old, adv, mask, 0.2, "token_mean")
    assert loss.item() == approx(0.5)
    assert vanilla_pg(logp, old, adv, mask, 0.2, "seq_mean")[0].item() == approx(2 / 3)
    assert stats["clipfrac"].item() == 0.0
    kl = ((math.exp(0.5) - 1 - 0.5) + 0.0 + (math.exp(-1) - 1 + 1) + 0.0) / 4
    assert stats["approx_kl"].item() == approx(kl)


@pytest.mark.parametrize("agg", ["token_mean", "seq_mean"])
def test_vanilla_pg_matches_reference_and_its_gradient_is_minus_advantage(agg: str) -> None:
    logp, old, adv, mask = random_batch(3, 6, 5)
    lp = t(logp).requires_grad_(True)
    loss, stats = vanilla_pg(lp, t(old), t(adv), t(mask), 0.2, agg)
    assert loss.item() == approx(ref_aggregate(elementwise(lambda x, a: -x * a, logp, adv), mask, agg))
    assert stats["approx_kl"].item() == approx(ref_aggregate(ref_k3_old_new(logp, old), mask, "token_mean"))
    if agg == "token_mean":
        loss.backward()
        n = sum(sum(r) for r in mask)
        expected = [[-a * m / n for a, m in zip(arow, mrow)] for arow, mrow in zip(adv, mask)]
        for g_row, e_row in zip(lp.grad.tolist(), expected):
            assert g_row == pytest.approx(e_row, abs=TOL)


# ----------------------------------------------------------------------------- value loss


# clip = 0.2, (value, old value, return):
#   v1 (1.0, 0.5,  0.8): err 0.2^2 = 0.04;  clipped value 0.7, (0.7 - 0.8)^2 = 0.01  -> max 0.04
#   v2 (1.0, 0.5,  1.5): err 0.5^2 = 0.25;  clipped value 0.7, (0.7 - 1.5)^2 = 0.64  -> max 0.64 (clip active)
#   v3 (0.0, 0.5, -0.5): err 0.5^2 = 0.25;  clipped value 0.3, (0.3 + 0.5)^2 = 0.64  -> max 0.64 (clip active)
#   v4 (0.6, 0.5,  0.0): err 0.6^2 = 0.36;  within the clip range, clipped value 0.6   -> 0.36
# Row 0 = v1, v2, v3; row 1 = v4 then padding.
#   unclipped token_mean = 0.5 * (0.04 + 0.25 + 0.25 + 0.36) / 4 = 0.1125
#   clipped   token_mean = 0.5 * (0.04 + 0.64 + 0.64 + 0.36) / 4 = 0.21
#   clipped   seq_mean   = 0.5 * ((0.04 + 0.64 + 0.64) / 3 + 0.36) / 2 = 0.5 * (0.44 + 0.36) / 2 = 0.2
VALUES = [[1.0, 1.0, 0.0], [0.6, GARBAGE, GARBAGE]]
OLD_VALUES = [[0.5, 0.5, 0.5], [0.5, -GARBAGE, -GARBAGE]]
RETURNS = [[0.8, 1.5, -0.5], [0.0, GARBAGE, 3.0]]
V_MASK = [[1, 1, 1], [1, 0, 0]]


def test_value_loss_by_hand_without_clipping() -> None:
    assert value_loss(t(VALUES), t(OLD_VALUES), t(RETURNS), t(V_MASK), None, "token_mean").item() == approx(0.1125)
    # seq_mean: 0.5 * ((0.04 + 0.25 + 0.25) / 3 + 0.36) / 2 = 0.5 * (0.18 + 0.36) / 2 = 0.135
    assert value_loss(t(VALUES), t(OLD_VALUES), t(RETURNS), t(V_MASK), None, "seq_mean").item() == approx(0.135)


def test_value_loss_by_hand_with_clipping_active() -> None:
    assert value_loss(t(VALUES), t(OLD_VALUES), t(RETURNS), t(V_MASK), 0.2, "token_mean").item() == approx(0.21)
    assert value_loss(t(VALUES), t(OLD_VALUES), t(RETURNS), t(V_MASK), 0.2, "seq_mean").item() == approx(0.2)


def test_value_loss_clipping_blocks_gradient_where_clipped_term_wins() -> None:
    # v2 and v3 take the clipped (constant in v) term -> zero gradient; v1 and v4 get (v - R) / N with N = 4
    v = t(VALUES).requires_grad_(True)
    value_loss(v, t(OLD_VALUES), t(RETURNS), t(V_MASK), 0.2, "token_mean").backward()
    grad = v.grad.tolist()
    assert grad[0] == pytest.approx([(1.0 - 0.8) / 4, 0.0, 0.0], abs=TOL)
    assert grad[1] == pytest.approx([(0.6 - 0.0) / 4, 0.0, 0.0], abs=TOL)


@pytest.mark.parametrize("clip", [None, 0.05, 0.5])
@pytest.mark.parametrize("agg", ["token_mean", "seq_mean"])
def test_value_loss_matches_reference(clip: float | None, agg: str) -> None:
    values, old, returns, mask = random_batch(4, 7, 6)

    def err(v, o, r):
        e = (v - r) ** 2
        if clip is not None:
            vc = o + min(max(v - o, -clip), clip)
            e = max(e, (vc - r) ** 2)
        return e

    expected = 0.5 * ref_aggregate(elementwise(err, values, old, returns), mask, agg)
    assert value_loss(t(values), t(old), t(returns), t(mask), clip, agg).item() == approx(expected)


# ----------------------------------------------------------------------------- KL estimators


def test_kl_estimators_by_hand() -> None:
    # logp = log 0.5, ref = log 0.25: k1 = log(0.5 / 0.25) = log 2; k3 = r - 1 - log r with r = ref/pi = 0.5:
    #   k3 = 0.5 - 1 - log 0.5 = -0.5 + 0.6931471805599453 = 0.1931471805599453
    logp, ref = t([math.log(0.5)]), t([math.log(0.25)])
    assert KL_ESTIMATORS["k1"](logp, ref).item() == approx(0.6931471805599453)
    assert KL_ESTIMATORS["k3"](logp, ref).item() == approx(0.1931471805599453)
    # equal distributions: both are exactly 0
    assert KL_ESTIMATORS["k1"](logp, logp).item() == 0.0 and KL_ESTIMATORS["k3"](logp, logp).item() == 0.0


def test_k3_is_never_negative() -> None:
    gen = torch.Generator().manual_seed(0)
    logp = torch.randn(10_000, generator=gen, dtype=torch.float64) * 3
    ref = torch.randn(10_000, generator=gen, dtype=torch.float64) * 3
    k3 = KL_ESTIMATORS["k3"](logp, ref)
    assert k3.min().item() >= 0.0
    k1 = KL_ESTIMATORS["k1"](logp, ref)
    assert k1.min().item() < 0.0  # k1 alone is not: only its expectation is


# pi and pi_ref over 4 categories; the estimators take samples x ~ pi.
PI = [0.5, 0.25, 0.15, 0.1]
PI_REF = [0.2, 0.3, 0.4, 0.1]


def exact_kl(p, q) -> float:
    return sum(pi * math.log(pi / qi) for pi, qi in zip(p, q))


def test_k1_and_k3_expectations_are_exactly_the_kl() -> None:
    # E_pi[k1] = sum_x pi(x) log(pi(x)/ref(x)) = KL; E_pi[k3] = sum_x pi(x) (ref/pi - 1 - log(ref/pi)) = 1 - 1 + KL
    logp, ref = torch.log(t(PI)), torch.log(t(PI_REF))
    kl = exact_kl(PI, PI_REF)
    for name in ("k1", "k3"):
        assert (t(PI) * KL_ESTIMATORS[name](logp, ref)).sum().item() == approx(kl)


def test_k1_and_k3_average_to_the_true_kl_over_samples() -> None:
    gen = torch.Generator().manual_seed(1234)
    draws = torch.multinomial(t(PI), 200_000, replacement=True, generator=gen)
    logp = torch.log(t(PI))[draws]
    ref = torch.log(t(PI_REF))[draws]
    kl = exact_kl(PI, PI_REF)  # 0.5 log 2.5 + 0.25 log(5/6) + 0.15 log 0.375 + 0 = 0.2654405887868...
    assert kl == approx(0.26544058878682997)
    for name in ("k1", "k3"):
        est = KL_ESTIMATORS[name](logp, ref).mean().item()
        assert abs(est - kl) < 1e-2, (name, est, kl)


def test_k2_by_hand() -> None:
    # logp = log 0.5, ref = log 0.25: k2 = (log 2)^2 / 2 = 0.4804530139182014 / 2
    logp, ref = t([math.log(0.5)]), t([math.log(0.25)])
    assert KL_ESTIMATORS["k2"](logp, ref).item() == approx(0.2402265069591007)
    assert KL_ESTIMATORS["k2"](logp, logp).item() == 0.0


def exact_kl_gradient(p_logits: torch.Tensor, q: list[float], reverse: bool) -> torch.Tensor:
    """d/d logits of KL(pi || q) (reverse) or KL(q || pi) (forward), pi = softmax(logits), computed exactly."""
    logits = p_logits.clone().requires_grad_(True)
    logp, logq = torch.log_softmax(logits, -1), torch.log(torch.tensor(q, dtype=torch.float64))
    kl = (logp.exp() * (logp - logq)).sum() if reverse else (logq.exp() * (logq - logp)).sum()
    (grad,) = torch.autograd.grad(kl, logits)
    return grad


@pytest.mark.parametrize("name, expected", [("k1", "zero"), ("k2", "reverse"), ("k3", "forward")])
def test_expected_gradient_of_each_estimator_in_the_loss(name: str, expected: str) -> None:
    """In the loss, the samples x ~ pi are fixed: the expected gradient is sum_x pi(x) * grad k(x), pi not
    differentiated. k1 gives 0, k2 the gradient of KL(pi || ref), k3 that of KL(ref || pi)."""
    base = torch.log(torch.tensor(PI, dtype=torch.float64))
    logits = base.clone().requires_grad_(True)
    logp = torch.log_softmax(logits, -1)
    ref = torch.log(torch.tensor(PI_REF, dtype=torch.float64))
    loss = (logp.exp().detach() * KL_ESTIMATORS[name](logp, ref)).sum()
    (grad,) = torch.autograd.grad(loss, logits)
    if expected == "zero":
        torch.testing.assert_close(grad, torch.zeros_like(grad), atol=1e-12, rtol=0)
    else:
        torch.testing.assert_close(grad, exact_kl_gradient(base, PI_REF, reverse=expected == "reverse"))
        other = exact_kl_gradient(base, PI_REF, reverse=expected != "reverse")
        assert (grad - other).abs().max() > 1e-2  # the two directions differ here


def test_k1_in_the_loss_is_refused_with_the_fix() -> None:
    from policies.config import AlgorithmConfig

    with pytest.raises(ValueError, match="k1 has zero expected gradient in the loss: use k2"):
        AlgorithmConfig(kl_coef=0.1, kl_estimator="k1", kl_in="loss")
    AlgorithmConfig(kl_coef=0.1, kl_estimator="k1", kl_in="reward")  # k1 in the reward is fine
    AlgorithmConfig(kl_coef=0.1, kl_estimator="k2", kl_in="loss")


def test_ppo_clip_higher_by_hand() -> None:
    # ratios 1.3 and 0.7 against eps_low = 0.2, eps_high = 0.28, advantages +1 and -1:
    #   token 0: A = +1, rho = 1.3 -> min(1.3, clip(1.3, 0.8, 1.28) = 1.28) = 1.28 -> loss -1.28 (clipped)
    #   token 1: A = -1, rho = 0.7 -> min(-0.7, -clip(0.7, 0.8, 1.28) = -0.8) = -0.8  -> loss 0.8  (clipped)
    #   symmetric eps = 0.2 would give 1.2 for token 0 instead.
    import math

    from policies.losses import ppo_clip

    logp = torch.tensor([[math.log(1.3), math.log(0.7)]], dtype=torch.float64)
    old = torch.zeros_like(logp)
    adv = torch.tensor([[1.0, -1.0]], dtype=torch.float64)
    mask = torch.ones_like(logp)
    loss, stats = ppo_clip(logp, old, adv, mask, (0.2, 0.28), "token_mean")
    assert loss.item() == pytest.approx((-1.28 + 0.8) / 2, abs=1e-12)
    assert stats["clipfrac"].item() == pytest.approx(1.0)
    sym, _ = ppo_clip(logp, old, adv, mask, 0.2, "token_mean")
    assert sym.item() == pytest.approx((-1.2 + 0.8) / 2, abs=1e-12)
    # rho = 1.25 is inside (0.8, 1.28): unclipped, not counted
    _, inside = ppo_clip(torch.tensor([[math.log(1.25)]], dtype=torch.float64), torch.zeros(1, 1, dtype=torch.float64),
                         torch.ones(1, 1, dtype=torch.float64), torch.ones(1, 1, dtype=torch.float64), (0.2, 0.28), "token_mean")
    assert inside["clipfrac"].item() == 0.0


def test_behaviour_weights_by_hand() -> None:
    from policies.losses import behaviour_weights

    # w = exp(old - sampling) per token: 1, e^0.5 = 1.6487, e^1 = 2.7183 (over cap 2), e^-1 = 0.3679; last is padding.
    old = torch.tensor([[0.0, 0.5, 1.0], [-1.0, 0.0, 5.0]])
    sampling = torch.zeros(2, 3)
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0]])
    e = math.exp
    w_none, stats = behaviour_weights(old, sampling, mask, "none", 2.0)
    assert torch.equal(w_none, mask)
    assert stats["is_weight_mean"] == pytest.approx((1 + e(0.5) + e(1) + e(-1)) / 4)
    assert stats["is_clipfrac"] == pytest.approx(1 / 4)  # e^5 is padding: not counted
    w_tis, _ = behaviour_weights(old, sampling, mask, "truncated_is", 2.0)
    assert torch.allclose(w_tis, torch.tensor([[1.0, e(0.5), 2.0], [e(-1), 0.0, 0.0]]))
    w_dec, _ = behaviour_weights(old, sampling, mask, "decoupled", 2.0)
    assert torch.allclose(w_dec, torch.tensor([[1.0, e(0.5), 0.0], [e(-1), 0.0, 0.0]]))
    with pytest.raises(ValueError, match="algorithm.off_policy"):
        behaviour_weights(old, sampling, mask, "bogus", 2.0)


def test_weighting_the_advantages_weights_each_tokens_ppo_term() -> None:
    """w >= 0 per token, applied to the advantages, gives w * min(r A, clip(r) A) token by token: the decoupled
    objective, also where the clipped branch is active."""
    torch.manual_seed(0)
    logp, old = torch.randn(4, 6) * 0.3, torch.randn(4, 6) * 0.3
    adv, w, mask = torch.randn(4, 6), torch.rand(4, 6) * 2, (torch.rand(4, 6) > 0.2).float()
    loss, _ = ppo_clip(logp, old, adv * w, mask, 0.2, "token_mean")
    ratio = torch.exp(logp - old)
    per_token = -w * torch.minimum(ratio * adv, torch.clamp(ratio, 0.8, 1.2) * adv)
    assert loss.item() == pytest.approx(((per_token * mask).sum() / mask.sum()).item(), rel=1e-6)
