"""Supervision of the run's own Ray actors (the vLLM rollout actors and the reward-model actor).

Every wait on an actor has a deadline (``cluster.actor_timeout_s``) and ends, when it passes, in a one-line
:class:`ActorTimeoutError` naming the actor. The actors are started with Ray's ``max_restarts``
(``cluster.max_actor_restarts``) and ``max_task_retries=0``: Ray restarts a lost actor (its ``__init__`` runs
again), but a call that was running when it died fails instead of being replayed behind our back. The caller
(:class:`cluster.rollout.RolloutGroup`) then waits for the restart (:meth:`Supervisor.wait_restarted`), gives the
actor back the run's state (the current weights and version) and redoes the whole call with the same arguments,
so seeded work comes out the same and nothing is lost or done twice. :class:`Supervisor` counts those restarts
for the ``faults/actor_restarts`` metric.

A call that raises (a user's reward function, a stale version) is not a lost actor: its own exception comes back,
marked with the actor that raised it (:func:`cluster.console.tag`, "rollout actor 1"), for the run's one error line;
so does an actor whose ``__init__`` raised (:class:`cluster.console.ActorDied`), which Ray does not restart.

Ray is imported inside the functions: the CLI imports this module for its error classes.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Protocol, Sequence, runtime_checkable

from cluster.console import ActorDied, tag
from textenv.rewards import RewardServiceError

DEFAULT_TIMEOUT_S = 1800.0  # ClusterConfig.actor_timeout_s
DEFAULT_MAX_RESTARTS = 3  # ClusterConfig.max_actor_restarts


class ClusterError(RuntimeError):
    """A Ray actor of the run failed in a way the run cannot recover from; the message is one line."""


class ActorTimeoutError(ClusterError, RewardServiceError):
    """An actor did not answer within ``cluster.actor_timeout_s``."""


class ActorLostError(ClusterError, RewardServiceError):
    """An actor died and Ray did not bring it back (out of restarts, or its node is gone)."""


@dataclass
class Outcome:
    """What one actor call came to: its value, the exception it raised, or the loss of the actor itself."""

    value: Any = None
    error: BaseException | None = None  # raised by the call (Ray's wrapper removed) or, when lost, Ray's error
    lost: bool = False  # the actor died (or became unreachable) while the call ran


@runtime_checkable
class Restartable(Protocol):
    """Something that calls an actor of its own from inside other actors (the reward model): the rollout group
    waits for that actor's restart when a call fails because it was lost."""

    def wait_restarted(self, supervisor: Supervisor) -> None: ...


def first_line(err: BaseException) -> str:
    """The first non-empty line of an exception's message (Ray's errors span many lines)."""
    lines = [ln.strip() for ln in str(err).splitlines() if ln.strip()]
    return lines[0] if lines else type(err).__name__


class Supervisor:
    """Deadlines, restart options and the restart count shared by a run's actor groups."""

    def __init__(self, timeout_s: float = DEFAULT_TIMEOUT_S, max_restarts: int = DEFAULT_MAX_RESTARTS) -> None:
        self.timeout_s, self.max_restarts = float(timeout_s), int(max_restarts)
        self.restarts = 0  # restarts noticed and recovered from since the last take_restarts()

    def actor_options(self) -> dict[str, Any]:
        """``ray.remote`` options of a supervised actor: restarted by Ray, its calls never retried by Ray."""
        return {"max_restarts": self.max_restarts, "max_task_retries": 0}

    def take_restarts(self) -> int:
        """The restarts counted since the last call (one iteration's ``faults/actor_restarts``)."""
        n, self.restarts = self.restarts, 0
        return n

    def gather(
        self, refs: Sequence[Any], names: Sequence[str], what: str, wheres: Sequence[str] | None = None,
    ) -> list[Outcome]:
        """Wait for every call (``timeout_s`` in all) and return each one's outcome, in order. A call's own
        exception is marked as raised in ``wheres[i]`` (default: ``names[i]``; e.g. "rollout actor 1").

        Raises :class:`ActorTimeoutError` naming the actors whose call did not finish in time.
        """
        import ray

        _, pending = ray.wait(list(refs), num_returns=len(refs), timeout=self.timeout_s)
        if pending:
            late = {ref.hex() for ref in pending}
            slow = [name for ref, name in zip(refs, names) if ref.hex() in late]
            raise ActorTimeoutError(
                f"{', '.join(slow)} did not finish {what} within {self.timeout_s:g} s (cluster.actor_timeout_s)"
            )
        return [self.outcome(ref, where) for ref, where in zip(refs, wheres if wheres is not None else names)]

    def get(self, ref: Any, name: str, what: str, where: str | None = None) -> Any:
        """One call's value; a lost actor raises :class:`ActorLostError`, a failed call its own exception (marked
        as raised in ``where``, default ``name``)."""
        (out,) = self.gather([ref], [name], what, None if where is None else [where])
        if out.lost:
            raise ActorLostError(f"{name} was lost during {what}: {first_line(out.error)}")
        if out.error is not None:
            raise out.error
        return out.value

    def wait_restarted(self, handle: Any, name: str) -> Any:
        """Wait until Ray has restarted a lost actor and its ``ready()`` answers (at most ``timeout_s``); its
        answer. Counts one restart."""
        import ray

        deadline = time.monotonic() + self.timeout_s
        failures = 0
        while True:
            try:
                info = ray.get(handle.ready.remote(), timeout=max(deadline - time.monotonic(), 0.001))
                self.restarts += 1
                return info
            except ray.exceptions.GetTimeoutError:
                raise ActorTimeoutError(
                    f"{name} was lost and did not come back within {self.timeout_s:g} s (cluster.actor_timeout_s)"
                ) from None
            except ray.exceptions.RayTaskError as err:  # ready() itself raised
                raise ActorLostError(f"{name} failed after its restart: {first_line(err.cause)}") from None
            except ray.exceptions.ActorUnavailableError:  # restarting: calls fail at once until it is back
                if time.monotonic() > deadline:
                    raise ActorTimeoutError(f"{name} was lost and did not come back within {self.timeout_s:g} s "
                                            "(cluster.actor_timeout_s)") from None
                time.sleep(0.5)
            except ray.exceptions.RayActorError as err:
                # A call sent while Ray is still noticing the death can fail too; an actor out of restarts fails
                # every time.
                failures += 1
                if failures > 5 or time.monotonic() > deadline:
                    raise ActorLostError(
                        f"{name} was lost and Ray did not restart it (at most cluster.max_actor_restarts="
                        f"{self.max_restarts} restarts per actor): {first_line(err)}"
                    ) from None
                time.sleep(1.0)

    @staticmethod
    def outcome(ref: Any, where: str) -> Outcome:
        """What a finished call ``ref`` came to (its own exception marked as raised in ``where``)."""
        import ray

        try:
            return Outcome(value=ray.get(ref, timeout=0))  # finished: ray.wait said so
        except ray.exceptions.RayTaskError as err:  # the call raised (first: it may also be a RayActorError)
            if isinstance(err.cause, ClusterError):  # ours, from a call inside the actor: already one line
                return Outcome(error=err.cause)
            # The actor's own exception (Ray's wrapper keeps the actor's traceback for error.log), named.
            return Outcome(error=tag(err.as_instanceof_cause(), where))
        except ray.exceptions.RayActorError as err:  # the actor itself is gone
            if err.actor_init_failed:  # its __init__ raised: Ray does not restart it, and a restart would fail again
                return Outcome(error=actor_died(err, where))
            return Outcome(error=err, lost=True)


def actor_died(err: BaseException, where: str) -> ActorDied:
    """An actor that died, as :class:`cluster.console.ActorDied` naming it and the last error line Ray gave (the
    exception its ``__init__`` raised); Ray's error stays chained to it for the run's error.log."""
    lines = [ln.strip() for ln in str(err).splitlines() if ln.strip()]
    cause = next((ln for ln in reversed(lines) if "Error" in ln.split(":")[0]), lines[-1] if lines else "")
    died = ActorDied(f"{where} died: {cause}")
    died.__cause__ = err
    return died


def lost_dependency(err: BaseException | None) -> bool:
    """Whether a call failed because an actor that it called in turn (the reward model) was lost."""
    return isinstance(err, ActorLostError)


class ActorPool:
    """Actors of one kind driven together under a :class:`Supervisor` (the rollout actors).

    :meth:`call` submits one call per actor and waits for all of them under the deadline. When an actor is lost
    during the call, when it turns out to have been restarted between calls (``state_lost`` says its error means
    that, and it runs in a new process), or when a call fails because the ``dependency`` (the reward model) was
    lost, the pool waits for the restarts, hands each restarted actor to ``restore`` (which gives it the run's
    state back) and redoes the whole call with the same arguments. The actors' ``ready()`` must answer a dict
    with at least ``pid`` (and ``node``, for error messages).
    """

    def __init__(
        self, actors: Sequence[Any], supervisor: Supervisor, kind: str,
        restore: Callable[[int], None] | None = None, dependency: Restartable | None = None,
    ) -> None:
        self.actors, self.supervisor, self.kind = list(actors), supervisor, kind
        self.restore, self.dependency = restore, dependency
        self.info: list[dict[str, Any]] = [{} for _ in self.actors]
        # Held while an actor is recovered and while the run's state is pushed: the rollout dispatcher's thread and
        # the caller's may both meet the same lost actor, and a restored actor must get the newest state.
        self.lock = threading.RLock()

    def name(self, index: int) -> str:
        """How errors name actor ``index``: its kind and number, and its process and node once it has started."""
        info = self.info[index]
        where = f" (pid {info['pid']} on {info['node']})" if "pid" in info and "node" in info else ""
        return f"{self.label(index)}{where}"

    def label(self, index: int) -> str:
        """How the run's error line names the component a call's own exception came from: "rollout actor 1"."""
        return f"{self.kind} {index}"

    def start(self) -> list[dict[str, Any]]:
        """Wait until every actor's ``ready()`` answers; their answers (also kept in ``info``)."""
        self.info = self.call("start-up", lambda i, a: a.ready.remote())
        return self.info

    def call(
        self, what: str, submit: Callable[[int, Any], Any], indices: Sequence[int] | None = None,
        state_lost: Callable[[BaseException], bool] | None = None,
    ) -> list[Any]:
        """``submit(i, actor)`` (returning an ObjectRef) for each actor index (default: all); their results in order.

        A call's own exception is raised as it is (marked with :meth:`label`), once no actor needs recovering.
        """
        indices = list(range(len(self.actors))) if indices is None else list(indices)
        # Ray bounds the restarts of each actor; this bounds the redos even if an actor kept failing the same way.
        for _ in range(1 + (len(self.actors) + 1) * (self.supervisor.max_restarts + 1)):
            pids = {i: self.info[i].get("pid") for i in indices}
            refs = [submit(i, self.actors[i]) for i in indices]
            outcomes = self.supervisor.gather(refs, [self.name(i) for i in indices], what,
                                              [self.label(i) for i in indices])
            lost = [i for i, o in zip(indices, outcomes) if o.lost]
            dependency = self.dependency is not None and any(lost_dependency(o.error) for o in outcomes)
            idle = [i for i, o in zip(indices, outcomes) if state_lost is not None and o.error is not None
                    and not o.lost and state_lost(o.error) and self.recover_if_restarted(i)]
            if not (lost or dependency or idle):
                for o in outcomes:
                    if o.error is not None:
                        raise o.error
                return [o.value for o in outcomes]
            if dependency:
                self.dependency.wait_restarted(self.supervisor)
            for i in lost:
                self.recover(i, pids[i])
        raise ActorLostError(f"{self.kind}s kept failing during {what}; giving up")

    def recover(self, index: int, pid: Any) -> None:
        """Actor ``index`` was lost during a call sent while it ran as process ``pid``: wait for Ray's restart and
        give it the run's state back, unless that was done already (by another thread: the rollout dispatcher)."""
        with self.lock:
            if self.info[index].get("pid") != pid:
                return  # recovered since the call was sent
            self.info[index] = self.supervisor.wait_restarted(self.actors[index], self.name(index))
            if self.restore is not None:
                self.restore(index)

    def recover_if_restarted(self, index: int) -> bool:
        """Whether actor ``index`` runs in a new process since it last answered (Ray restarted it between calls);
        if so it gets the run's state back. Counted as a restart."""
        with self.lock:
            if not self._restarted_while_idle(index):
                return False
            if self.restore is not None:
                self.restore(index)
            return True

    def _restarted_while_idle(self, index: int) -> bool:
        """Whether actor ``index`` runs in a new process since it last answered: Ray restarted it between calls.
        Counted as a restart."""
        try:
            info = self.supervisor.get(self.actors[index].ready.remote(), self.name(index), "ready",
                                       self.label(index))
        except ActorLostError:  # lost again, or still restarting
            self.info[index] = self.supervisor.wait_restarted(self.actors[index], self.name(index))
            return True
        if info.get("pid") == self.info[index].get("pid"):
            return False
        self.info[index] = info
        self.supervisor.restarts += 1
        return True
