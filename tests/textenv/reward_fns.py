"""User reward functions for the textenv tests, loaded by callable or by import path ``reward_fns:<name>``.

Each takes a :class:`textenv.RewardContext` and returns that step's reward (``TokenEnv`` calls them only at the end).
"""

from __future__ import annotations

import math

from textenv import RewardContext


def exact(ctx: RewardContext) -> float:
    """1.0 when the response equals the reference answer exactly."""
    return float(ctx.response_text == ctx.sample.answer)


def length_bonus(ctx: RewardContext) -> float:
    """0.25 per response token, to tell apart which function ran."""
    return 0.25 * len(ctx.response_ids)


def raising(ctx: RewardContext) -> float:
    raise KeyError("verifier exploded")


def returns_nan(ctx: RewardContext) -> float:
    return math.nan


def returns_inf(ctx: RewardContext) -> float:
    return math.inf


def returns_none(ctx: RewardContext) -> float:
    return None  # type: ignore[return-value]


def returns_str(ctx: RewardContext) -> float:
    return "x"  # type: ignore[return-value]


def returns_bool(ctx: RewardContext) -> float:
    return True
