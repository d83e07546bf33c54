"""Policy objectives, the value loss and KL estimators: small pure functions, registered by name.

Every function takes (B, R) tensors and a ``mask`` of response tokens; ``aggregate`` turns per-token terms into a
scalar, per token (``token_mean``: every token weighs the same) or per sequence (``seq_mean``: every sequence does).
"""

from __future__ import annotations

from typing import Callable, Literal, Protocol

import torch

Tensor = torch.Tensor
LossAgg = Literal["token_mean", "seq_mean"]


def aggregate(x: Tensor, mask: Tensor, how: LossAgg) -> Tensor:
    """Reduce per-token values (B, R) to a scalar over the masked tokens."""
    if how == "token_mean":
        return (x * mask).sum() / mask.sum().clamp(min=1)
    if how == "seq_mean":
        per_seq = (x * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1)
        return per_seq[mask.sum(dim=1) > 0].mean() if bool((mask.sum(dim=1) > 0).any()) else per_seq.sum() * 0
    raise ValueError(f"loss aggregation must be 'token_mean' or 'seq_mean'; got {how!r}")


Clip = float | tuple[float, float]  # PPO's epsilon, or (low, high) for an asymmetric range ("clip-higher")


class Objective(Protocol):
    def __call__(
        self, logp: Tensor, old_logp: Tensor, advantages: Tensor, mask: Tensor, clip: Clip, agg: LossAgg
    ) -> tuple[Tensor, dict[str, Tensor]]: ...


OBJECTIVES: dict[str, Objective] = {}


def register_objective(name: str) -> Callable[[Objective], Objective]:
    def deco(fn: Objective) -> Objective:
        OBJECTIVES[name] = fn
        return fn

    return deco


@register_objective("ppo_clip")
def ppo_clip(
    logp: Tensor, old_logp: Tensor, advantages: Tensor, mask: Tensor, clip: Clip, agg: LossAgg
) -> tuple[Tensor, dict[str, Tensor]]:
    """PPO's clipped surrogate: ``-min(rho * A, clip(rho, 1 - eps_low, 1 + eps_high) * A)``.

    ``clip`` is eps (both sides) or ``(eps_low, eps_high)``: a higher upper bound lets unlikely tokens with a
    positive advantage gain more per update, which keeps the policy from collapsing early (DAPO's "clip-higher").
    """
    low, high = clip if isinstance(clip, tuple) else (clip, clip)
    log_ratio = logp - old_logp
    ratio = torch.exp(log_ratio)
    unclipped = ratio * advantages
    clipped = torch.clamp(ratio, 1.0 - low, 1.0 + high) * advantages
    loss = aggregate(-torch.minimum(unclipped, clipped), mask, agg)
    with torch.no_grad():
        stats = {
            "clipfrac": aggregate(((ratio - 1.0 > high) | (1.0 - ratio > low)).float(), mask, "token_mean"),
            "approx_kl": aggregate((ratio - 1.0) - log_ratio, mask, "token_mean"),  # k3 of old -> new
        }
    return loss, stats


@register_objective("vanilla_pg")
def vanilla_pg(
    logp: Tensor, old_logp: Tensor, advantages: Tensor, mask: Tensor, clip: Clip, agg: LossAgg
) -> tuple[Tensor, dict[str, Tensor]]:
    """The plain policy gradient ``-logp * A`` (no ratio, no clipping; meant for one epoch per batch)."""
    loss = aggregate(-logp * advantages, mask, agg)
    with torch.no_grad():
        log_ratio = logp - old_logp
        stats = {
            "clipfrac": torch.zeros((), device=logp.device),
            "approx_kl": aggregate(torch.exp(log_ratio) - 1.0 - log_ratio, mask, "token_mean"),
        }
    return loss, stats


def value_loss(
    values: Tensor, old_values: Tensor, returns: Tensor, mask: Tensor, clip: float | None, agg: LossAgg
) -> Tensor:
    """Squared error to the returns, halved; with ``clip``, PPO's pessimistic clipped variant."""
    err = (values - returns) ** 2
    if clip is not None:
        clipped = old_values + torch.clamp(values - old_values, -clip, clip)
        err = torch.maximum(err, (clipped - returns) ** 2)
    return 0.5 * aggregate(err, mask, agg)


KL_ESTIMATORS: dict[str, Callable[[Tensor, Tensor], Tensor]] = {
    # Per-token estimators from samples x ~ pi (Schulman, 2020), with log r = log pi_ref(x) - log pi(x).
    # Their values, and the expected gradient each gives when added to the loss as it is (the samples held fixed):
    # k1 = -log r: unbiased for KL(pi || pi_ref), but its expected gradient E_pi[grad log pi] is 0, so it does
    #      nothing in the loss (config refuses it there); in the reward, the policy gradient carries it correctly.
    "k1": lambda logp, ref_logp: logp - ref_logp,
    # k2 = (log r)^2 / 2: biased (close to KL(pi || pi_ref) when the two are close), but its expected gradient
    #      E_pi[-log r grad log pi] is exactly the gradient of KL(pi || pi_ref): the reverse-KL penalty in the loss.
    "k2": lambda logp, ref_logp: 0.5 * (logp - ref_logp) ** 2,
    # k3 = r - 1 - log r: unbiased for KL(pi || pi_ref) and always >= 0, but its expected gradient
    #      E_pi[(1 - r) grad log pi] = -E_pi_ref[grad log pi] is the gradient of the forward KL(pi_ref || pi).
    "k3": lambda logp, ref_logp: torch.exp(ref_logp - logp) - (ref_logp - logp) - 1.0,
}


def behaviour_weights(
    old_logp: Tensor, sampling_logp: Tensor, mask: Tensor, mode: str, cap: float
) -> tuple[Tensor, dict[str, float]]:
    """Per-token weights that correct for samples drawn by another policy than the learner's (off-policy).

    ``w = pi_old / pi_sampling = exp(old_logp - sampling_logp)``: ``old_logp`` from the learner before the update
    (the proximal policy, PPO's ratio is taken against it), ``sampling_logp`` from the engine that drew the token
    (the behaviour policy, a few weight versions older with ``rollout.max_staleness > 0``). ``mode``:

    - ``none``: weights of 1 (the statistics still describe the mismatch);
    - ``truncated_is``: ``min(w, cap)``, truncated importance sampling (Espeholt et al., 2018; verl's TIS);
    - ``decoupled``: ``w``, and 0 where ``w > cap`` (decoupled PPO, Hilton et al., 2021, with AReaL's cap).

    The weight multiplies each token's policy term; applied to the advantages it does exactly that for ppo_clip
    (``min(r wA, clip(r) wA) = w min(r A, clip(r) A)`` for ``w >= 0``) and vanilla_pg. Returns the (B, R) weights (0
    outside ``mask``) and their statistics over the masked tokens: ``is_weight_mean`` (of ``w`` itself) and
    ``is_clipfrac`` (the share of tokens with ``w > cap``: truncated or dropped).
    """
    w = torch.exp(old_logp - sampling_logp) * mask
    over = (w > cap) & (mask > 0)
    n = mask.sum().clamp(min=1)
    stats = {"is_weight_mean": float(w.sum() / n), "is_clipfrac": float(over.sum() / n)}
    if mode == "none":
        return mask.clone(), stats
    if mode == "truncated_is":
        return torch.clamp(w, max=cap), stats
    if mode == "decoupled":
        return torch.where(over, torch.zeros_like(w), w), stats
    raise ValueError(f"algorithm.off_policy must be none, truncated_is or decoupled; got {mode!r}")
