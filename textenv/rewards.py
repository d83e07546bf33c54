"""The reward protocol: what a reward function receives and must return.

A reward function is any callable ``fn(ctx: RewardContext) -> float``. The environment calls it after every token
(``ctx.done`` is False) and once more at the end of the episode (``ctx.done`` is True); the value it returns is that
step's reward. It must return a finite number, never ``None``. User functions are named in the config by import
path (``package.module:function``).

A terminal reward that is cheaper to compute many episodes at a time (a reward model) is an object with
``score_batch(ctxs: list[RewardContext]) -> list[float]``, one finite number per context, called only with finished
episodes (its ``name`` attribute, if it has one, is how errors name it). The environment wraps it in
:class:`DeferredReward`: stepping on its own, it scores each episode as it ends (``score_batch([ctx])``); a caller
replaying many responses (``replay(..., defer=True)``) leaves the terminal contexts pending and scores them all in
one call with :func:`textenv.score_pending`. The rewards are the same either way.
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


class BatchRewardFn(Protocol):
    """A terminal reward scored many finished episodes at a time: one finite number per context, in order."""

    def score_batch(self, ctxs: list[RewardContext]) -> list[float]: ...


def is_batched(fn: object) -> bool:
    """Whether ``fn`` is a :class:`BatchRewardFn` (has a ``score_batch`` method)."""
    return callable(getattr(fn, "score_batch", None))


class RewardError(RuntimeError):
    """A reward function raised or returned something that is not a finite number."""


class RewardServiceError(RuntimeError):
    """A failure of what serves a reward (e.g. a reward-model actor that was lost or timed out), not of the reward
    itself. It passes through the reward checks unchanged (no :class:`RewardError`, no failure value), so that the
    caller can recover: wait for the service and redo the rollout."""


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


class DeferredReward:
    """A per-token reward (``base``; none: 0.0) plus a batched terminal reward added at the end of the episode.

    Called like any reward function (what ``env.step`` does), it scores a finished episode on its own with
    ``batched.score_batch([ctx])``. A caller that batches takes :meth:`step_reward` for the last token instead and
    later adds :meth:`score` of many episodes' contexts (see ``replay(..., defer=True)`` and ``score_pending``).
    """

    def __init__(self, batched: BatchRewardFn, base: TaskReward | TerminalReward | None = None) -> None:
        if not is_batched(batched):
            raise TypeError(f"a batched reward needs a score_batch(ctxs) method; {type(batched).__name__} has none")
        self.batched, self.base = batched, base

    def reset(self) -> None:
        if self.base is not None:
            self.base.reset()

    def step_reward(self, ctx: RewardContext) -> float:
        """The base reward alone (checked): every token's reward, and the last token's before its batched score."""
        return checked_reward(self.base, ctx) if self.base is not None else 0.0

    def score(self, ctxs: Sequence[RewardContext]) -> list[float | RewardError]:
        """The batched reward of finished episodes, one ``score_batch`` call (checked, see :func:`checked_batch`)."""
        return checked_batch(self.batched, ctxs)

    def __call__(self, ctx: RewardContext) -> float:
        value = self.step_reward(ctx)
        if ctx.done:
            (scored,) = self.score([ctx])
            if isinstance(scored, RewardError):
                raise scored
            value += scored
        return value


def _where(fn: object, ctx: RewardContext) -> str:
    """How an error names a reward: the task's verifier, a user's function by import path (``mod:fn``), or a batched
    reward by its ``name`` attribute (e.g. ``reward model 'models/rm'``), else its class's import path."""
    task = f"task {ctx.task.name!r}"
    if isinstance(fn, TaskReward):
        return f"the verifier ({_import_path(type(ctx.task))}) of {task}"
    named = fn.fn if isinstance(fn, TerminalReward) else fn  # name the user's function, not the wrapper
    if hasattr(named, "__qualname__"):
        return f"reward function {_import_path(named)} of {task}"
    label = getattr(named, "name", None)
    return f"{label if isinstance(label, str) else 'batched reward ' + _import_path(type(named))} of {task}"


def _import_path(obj: object) -> str:
    return f"{getattr(obj, '__module__', '?')}:{getattr(obj, '__qualname__', type(obj).__name__)}"


def _error(message: str, cause: BaseException | None = None) -> RewardError:
    err = RewardError(message)
    err.__cause__ = cause
    return err


def _is_finite_number(value: object) -> bool:
    return not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)


def checked_reward(fn: Callable[[RewardContext], float], ctx: RewardContext) -> float:
    """Call ``fn`` and insist on a finite float; the error names the task, the function and the sample."""
    try:
        value = fn(ctx)
    except (RewardError, RewardServiceError):
        raise  # already names the function that failed (a DeferredReward's parts), or is the service's to recover
    except Exception as err:  # noqa: BLE001 - re-raised with the context a user needs
        failed = f"raised {type(err).__name__}: {err}"
        raise RewardError(f"{_where(fn, ctx)} {failed} on prompt {ctx.sample.prompt!r}") from err
    if not _is_finite_number(value):
        raise RewardError(f"{_where(fn, ctx)} returned {value!r} (not a finite number) on prompt {ctx.sample.prompt!r}")
    return float(value)


def checked_batch(fn: BatchRewardFn, ctxs: Sequence[RewardContext]) -> list[float | RewardError]:
    """Call ``fn.score_batch(ctxs)`` once; per context, a finite float or the :class:`RewardError` naming the task,
    the function and that context's prompt. A call that raises or returns the wrong number of scores fails them all.

    Errors come back as values, not raised, so that a caller can give only the failed episodes a failure value.
    """
    ctxs = list(ctxs)
    if not ctxs:
        return []
    try:
        values = list(fn.score_batch(ctxs))
    except RewardServiceError:
        raise  # the reward's service failed, not the reward: the caller recovers (restart, redo)
    except Exception as err:  # noqa: BLE001 - handed back with the context a user needs
        failed = f"raised {type(err).__name__}: {err}"
        return [_error(f"{_where(fn, c)} {failed} on prompt {c.sample.prompt!r}", cause=err) for c in ctxs]
    if len(values) != len(ctxs):
        failed = f"returned {len(values)} scores for {len(ctxs)} episodes"
        return [_error(f"{_where(fn, c)} {failed}, one of them on prompt {c.sample.prompt!r}") for c in ctxs]
    return [
        float(v) if _is_finite_number(v)
        else RewardError(f"{_where(fn, c)} returned {v!r} (not a finite number) on prompt {c.sample.prompt!r}")
        for v, c in zip(values, ctxs)
    ]


def build_reward(
    reward_fn: Callable[[RewardContext], float] | BatchRewardFn | None,
    mode: RewardMode = "per_token",
    batch_reward: BatchRewardFn | None = None,
) -> TaskReward | TerminalReward | DeferredReward:
    """The environment's reward: the task's verifier (``reward_fn`` None), a user function called at the end, or a
    batched reward object scored at the end; plus, with ``batch_reward``, a batched terminal reward added on top."""
    if reward_fn is None:
        reward: TaskReward | TerminalReward | DeferredReward = TaskReward(mode)
    elif is_batched(reward_fn):
        reward = DeferredReward(reward_fn)
    else:
        reward = TerminalReward(reward_fn)
    if batch_reward is None:
        return reward
    if isinstance(reward, DeferredReward):
        raise ValueError("reward_fn is already a batched reward; batch_reward adds to a per-token or per-episode one")
    return DeferredReward(batch_reward, base=reward)
