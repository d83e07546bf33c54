"""Advantage estimators, registered by name.

Each estimator takes per-token ``rewards`` (B, R), the critic's ``values`` (B, R) (zeros for critic-free
estimators), the ``mask`` (B, R) of response tokens and its config, and returns ``(advantages, returns)``, both
(B, R) and zero where ``mask`` is 0. Sequences of one prompt are consecutive rows (``group_size`` rows each).

The group estimators (``grpo``, ``rloo``) credit either whole sequences (``credit="sequence"``: every token gets its
sequence's advantage, the papers' form) or tokens (``credit="token"``: each token's reward-to-go against the same
position's reward-to-go in the other samples of its group). With a terminal-only reward and equal lengths both are
the same; with per-token rewards, token credit tells each token what it earned instead of what the sequence did.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Protocol

import torch

Tensor = torch.Tensor


@dataclass(frozen=True)
class AdvantageParams:
    gamma: float = 1.0
    lam: float = 0.95
    group_size: int = 1
    eps: float = 1e-6
    credit: str = "sequence"  # group estimators: "sequence" (one advantage per sequence) or "token" (reward-to-go)


class AdvantageFn(Protocol):
    def __call__(self, rewards: Tensor, values: Tensor, mask: Tensor, p: AdvantageParams) -> tuple[Tensor, Tensor]: ...


ADVANTAGES: dict[str, AdvantageFn] = {}
NEEDS_CRITIC: set[str] = set()


def register_advantage(name: str, *, needs_critic: bool = False) -> Callable[[AdvantageFn], AdvantageFn]:
    """Register an advantage estimator under ``name`` (``needs_critic``: it uses the value head)."""

    def deco(fn: AdvantageFn) -> AdvantageFn:
        ADVANTAGES[name] = fn
        if needs_critic:
            NEEDS_CRITIC.add(name)
        return fn

    return deco


def discounted_returns(rewards: Tensor, mask: Tensor, gamma: float) -> Tensor:
    """Reward-to-go ``G_t = r_t + gamma * G_{t'}`` over response tokens, (B, R).

    ``t'`` is the next action token: positions where ``mask`` is 0 (padding, or a multi-turn environment's reply
    between two turns) are not steps and are skipped, not discounted.
    """
    rewards = rewards * mask
    out = torch.zeros_like(rewards)
    running = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(rewards.shape[1])):
        running = torch.where(mask[:, t] > 0, rewards[:, t] + gamma * running, running)
        out[:, t] = running
    return out * mask


@register_advantage("gae", needs_critic=True)
def gae(rewards: Tensor, values: Tensor, mask: Tensor, p: AdvantageParams) -> tuple[Tensor, Tensor]:
    """Generalised advantage estimation over action tokens; the episode ends after the last one (no bootstrap).

    Positions where ``mask`` is 0 are not steps: after the end they contribute nothing, and between two turns of a
    multi-turn episode (the environment's reply) the recursion passes over them to the next action token.
    """
    rewards, values = rewards * mask, values * mask
    adv = torch.zeros_like(rewards)
    last = torch.zeros_like(rewards[:, 0])  # the advantage of the next action token
    next_value = torch.zeros_like(last)  # the value of the next action token's state
    for t in reversed(range(rewards.shape[1])):
        step = mask[:, t] > 0
        delta = rewards[:, t] + p.gamma * next_value - values[:, t]
        here = delta + p.gamma * p.lam * last
        adv[:, t] = torch.where(step, here, torch.zeros_like(here))
        last = torch.where(step, here, last)
        next_value = torch.where(step, values[:, t], next_value)
    return adv, (adv + values) * mask


def _sequence_scores(rewards: Tensor, mask: Tensor, p: AdvantageParams) -> Tensor:
    """Each sequence's total reward, grouped: (num_prompts, group_size)."""
    scores = (rewards * mask).sum(dim=1)
    if scores.shape[0] % p.group_size:
        raise ValueError(f"batch of {scores.shape[0]} sequences is not a whole number of groups of {p.group_size}")
    return scores.view(-1, p.group_size)


def _grouped_returns_to_go(rewards: Tensor, mask: Tensor, p: AdvantageParams) -> tuple[Tensor, Tensor]:
    """Each token's reward-to-go and the mask, grouped: (num_prompts, group_size, R) each."""
    B, R = rewards.shape
    if B % p.group_size:
        raise ValueError(f"batch of {B} sequences is not a whole number of groups of {p.group_size}")
    returns = discounted_returns(rewards, mask, p.gamma)
    return returns.view(-1, p.group_size, R), mask.view(-1, p.group_size, R)


def _check_credit(p: AdvantageParams) -> None:
    if p.credit not in ("sequence", "token"):
        raise ValueError(f"algorithm.credit must be 'sequence' or 'token'; got {p.credit!r}")


@register_advantage("grpo")
def grpo(rewards: Tensor, values: Tensor, mask: Tensor, p: AdvantageParams) -> tuple[Tensor, Tensor]:
    """Group-normalised: ``(g - mean(group)) / (std(group) + eps)`` (unbiased std).

    Sequence credit: ``g`` is the sequence's score, the same for every token. Token credit: ``g`` is the token's
    reward-to-go, normalised at each position over the group's members that have a token there.
    """
    _check_credit(p)
    if p.credit == "token":
        g, m = _grouped_returns_to_go(rewards, mask, p)  # (P, k, R)
        n = m.sum(dim=1, keepdim=True)  # members with a token at each position
        mean = (g * m).sum(dim=1, keepdim=True) / n.clamp(min=1)
        std = torch.sqrt((((g - mean) * m) ** 2).sum(dim=1, keepdim=True) / (n - 1).clamp(min=1))
        adv = (g - mean) / (std + p.eps) * m
        return adv.reshape(mask.shape), g.reshape(mask.shape)
    g = _sequence_scores(rewards, mask, p)
    adv = (g - g.mean(dim=1, keepdim=True)) / (g.std(dim=1, keepdim=True, unbiased=True) + p.eps)
    adv = adv.reshape(-1, 1) * mask
    return adv, g.reshape(-1, 1) * mask


@register_advantage("rloo")
def rloo(rewards: Tensor, values: Tensor, mask: Tensor, p: AdvantageParams) -> tuple[Tensor, Tensor]:
    """Leave-one-out baseline: ``g_i - mean_{j != i} g_j`` within the group.

    Sequence credit: ``g`` is the sequence's score, the same for every token. Token credit: ``g`` is the token's
    reward-to-go, against the other members that have a token at the same position (0 where none has).
    """
    _check_credit(p)
    if p.group_size < 2:
        raise ValueError("rloo needs rollout.samples_per_prompt >= 2")
    if p.credit == "token":
        g, m = _grouped_returns_to_go(rewards, mask, p)  # (P, k, R)
        others = m.sum(dim=1, keepdim=True) - m  # the other members with a token at each position
        baseline = ((g * m).sum(dim=1, keepdim=True) - g * m) / others.clamp(min=1)
        adv = torch.where(others > 0, g - baseline, torch.zeros_like(g)) * m
        return adv.reshape(mask.shape), g.reshape(mask.shape)
    g = _sequence_scores(rewards, mask, p)
    k = p.group_size
    baseline = (g.sum(dim=1, keepdim=True) - g) / (k - 1)
    adv = (g - baseline).reshape(-1, 1) * mask
    return adv, g.reshape(-1, 1) * mask


@register_advantage("reinforce")
def reinforce(rewards: Tensor, values: Tensor, mask: Tensor, p: AdvantageParams) -> tuple[Tensor, Tensor]:
    """Reward-to-go minus a baseline: the mean reward-to-go of all tokens at the same position in the batch."""
    returns = discounted_returns(rewards, mask, p.gamma)
    count = mask.sum(dim=0).clamp(min=1)
    baseline = returns.sum(dim=0) / count  # (R,)
    return (returns - baseline) * mask, returns


def masked_mean(x: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    if dim is None:
        return (x * mask).sum() / mask.sum().clamp(min=1)
    return (x * mask).sum(dim=dim) / mask.sum(dim=dim).clamp(min=1)


def whiten(x: Tensor, mask: Tensor, eps: float = 1e-8) -> Tensor:
    """Normalise ``x`` over the masked entries to mean 0 and standard deviation 1."""
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    return (x - mean) * torch.rsqrt(var + eps) * mask
