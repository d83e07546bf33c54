"""Advantage estimators, registered by name.

Each estimator takes per-token ``rewards`` (B, R), the critic's ``values`` (B, R) (zeros for critic-free
estimators), the ``mask`` (B, R) of response tokens and its config, and returns ``(advantages, returns)``, both
(B, R) and zero where ``mask`` is 0. Sequences of one prompt are consecutive rows (``group_size`` rows each).
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


@register_advantage("grpo")
def grpo(rewards: Tensor, values: Tensor, mask: Tensor, p: AdvantageParams) -> tuple[Tensor, Tensor]:
    """Group-normalised score: ``(s - mean(group)) / (std(group) + eps)``, the same for every token."""
    g = _sequence_scores(rewards, mask, p)
    adv = (g - g.mean(dim=1, keepdim=True)) / (g.std(dim=1, keepdim=True, unbiased=True) + p.eps)
    adv = adv.reshape(-1, 1) * mask
    return adv, g.reshape(-1, 1) * mask


@register_advantage("rloo")
def rloo(rewards: Tensor, values: Tensor, mask: Tensor, p: AdvantageParams) -> tuple[Tensor, Tensor]:
    """Leave-one-out baseline: ``s_i - mean_{j != i} s_j`` within the group, the same for every token."""
    g = _sequence_scores(rewards, mask, p)
    k = p.group_size
    if k < 2:
        raise ValueError("rloo needs rollout.samples_per_prompt >= 2")
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
