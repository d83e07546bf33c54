"""The reward protocol: what a reward function receives and must return.

A reward function is any callable ``fn(ctx: RewardContext) -> float``. The environment calls it after every token
(``ctx.done`` is False) and once more at the end of the episode (``ctx.done`` is True); the value it returns is that
step's reward. It must return a finite number, never ``None``. User functions are named in the config by import
path (``package.module:function``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Literal, Protocol, Sequence

from textenv.tasks import Task, TaskSample

RewardMode = Literal["per_token", "terminal"]


@dataclass(frozen=True)
class RewardContext:
    """Everything a reward function may look at."""

    task: Task
    sample: TaskSample
    prompt_ids: Sequence[int]
    response_ids: Sequence[int]
    response_text: str
    done: bool


class RewardFn(Protocol):
    def __call__(self, ctx: RewardContext) -> float: ...


class RewardError(RuntimeError):
    """A reward function raised or returned something that is not a finite number."""


class TaskReward:
    """The task's own verifier as a reward.

    ``per_token``: each token earns the change in ``task.partial_score``, and the last one also the rest of
    ``task.score``; the rewards of an episode add up to its final score. ``terminal``: only the last token is
    rewarded, with ``task.score``.
    """

    def __init__(self, mode: RewardMode = "per_token") -> None:
        if mode not in ("per_token", "terminal"):
            raise ValueError(f"reward mode must be 'per_token' or 'terminal'; got {mode!r}")
        self.mode = mode
        self._earned = 0.0

    def reset(self) -> None:
        self._earned = 0.0

    def __call__(self, ctx: RewardContext) -> float:
        if ctx.done:
            total = ctx.task.score(ctx.sample, ctx.response_text)
        elif self.mode == "per_token":
            total = ctx.task.partial_score(ctx.sample, ctx.response_text)
        else:
            return 0.0
        reward, self._earned = total - self._earned, total
        return reward


class TerminalReward:
    """Wraps a user function ``fn(ctx) -> float`` so that it is called only at the end of the episode."""

    def __init__(self, fn: Callable[[RewardContext], float]) -> None:
        self.fn = fn

    def reset(self) -> None:
        pass

    def __call__(self, ctx: RewardContext) -> float:
        return self.fn(ctx) if ctx.done else 0.0


def checked_reward(fn: Callable[[RewardContext], float], ctx: RewardContext) -> float:
    """Call ``fn`` and insist on a finite float; the error names the task, the function and the sample."""
    named = fn.fn if isinstance(fn, TerminalReward) else fn  # name the user's function, not the wrapper
    where = f"reward function {getattr(named, '__qualname__', type(named).__name__)} of task {ctx.task.name!r}"
    try:
        value = fn(ctx)
    except Exception as err:  # noqa: BLE001 - re-raised with the context a user needs
        raise RewardError(f"{where} raised {type(err).__name__}: {err} on prompt {ctx.sample.prompt!r}") from err
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise RewardError(f"{where} returned {value!r} (not a finite number) on prompt {ctx.sample.prompt!r}")
    return float(value)
