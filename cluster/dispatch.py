"""Dynamic dispatch of rollout work: each iteration's prompts go out in chunks, each to whichever actor is free.

A :class:`RolloutJob` is one iteration's batch cut into chunks; chunk ``c`` is posed with the seeds of "actor" ``c``
(:func:`cluster.rollout.actor_seed`), so what a chunk samples does not depend on which actor serves it, and with one
chunk per actor the batch is exactly the old static split's. The :class:`Dispatcher` is one thread per
:class:`cluster.rollout.RolloutGroup`: it keeps every actor busy with the oldest queued chunk (jobs in submission
order, so the batch needed first is served first), collects the results, and recovers from lost actors the way
:class:`cluster.supervision.ActorPool` does (wait for Ray's restart, give the actor the current weights back, redo the
chunk), under the pool's lock so that the two never recover the same actor twice. Because it runs beside the
driver's main thread, the engines keep sampling queued jobs while the learner updates (``rollout.max_staleness``).

Weights reach an actor only between its calls (Ray runs an actor's calls one at a time, in submission order): a
chunk is sampled entirely with one weight version, which it reports; the job carries each sequence's version.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from typing import Any, Callable, Sequence

import numpy as np

from cluster.supervision import ActorPool, ActorTimeoutError, lost_dependency

POLL_S = 0.02  # how long the dispatcher waits for a chunk to finish before looking at the queue again


class RolloutJob:
    """One batch in ``n_chunks`` chunks: ``call(actor, chunk)`` submits chunk ``chunk`` to ``actor`` (an ObjectRef).

    :meth:`result` waits for every chunk and returns their results in chunk order, with the actor that served each.
    """

    def __init__(self, name: str, n_chunks: int, call: Callable[[Any, int], Any]) -> None:
        self.name, self.n_chunks, self.call = name, n_chunks, call
        self.parts: list[Any] = [None] * n_chunks
        self.served_by: list[int] = [-1] * n_chunks
        self.error: BaseException | None = None
        self._left = n_chunks
        self._done = threading.Event()

    def done(self) -> bool:
        return self._done.is_set()

    def result(self, timeout: float | None = None) -> tuple[list[Any], list[int]]:
        """The chunks' results in chunk order and the index of the actor that served each; re-raises the first
        error a chunk ended in (its own exception, a timeout, or a lost actor that could not be recovered)."""
        if not self._done.wait(timeout):
            raise ActorTimeoutError(f"{self.name} did not finish within {timeout:g} s (cluster.actor_timeout_s)")
        if self.error is not None:
            raise self.error
        return self.parts, self.served_by

    def _finish(self, chunk: int, value: Any, actor: int) -> None:
        self.parts[chunk], self.served_by[chunk] = value, actor
        self._left -= 1
        if self._left == 0:
            self._done.set()

    def _fail(self, error: BaseException) -> None:
        if self.error is None:
            self.error = error
        self._done.set()


class Dispatcher:
    """Hands queued chunks to free actors of ``pool`` (a thread of its own); see the module docstring.

    ``state_lost(error)`` says whether a chunk's error may mean its actor lost the run's weights (Ray restarted it
    between calls): then the actor is checked, given the weights back and the chunk redone.
    """

    def __init__(self, pool: ActorPool, state_lost: Callable[[BaseException], bool]) -> None:
        self.pool, self.state_lost = pool, state_lost
        self._queue: deque[tuple[RolloutJob, int]] = deque()
        self._wake = threading.Condition()
        self._stopped = False
        self._thread = threading.Thread(target=self._run, name="tokengym-dispatch", daemon=True)
        self._thread.start()

    def submit(self, job: RolloutJob) -> RolloutJob:
        with self._wake:
            if self._stopped:
                raise RuntimeError("the rollout group was shut down")
            self._queue.extend((job, c) for c in range(job.n_chunks))
            self._wake.notify()
        return job

    def stop(self) -> None:
        with self._wake:
            self._stopped = True
            pending = {id(job): job for job, _ in self._queue}
            self._queue.clear()
            self._wake.notify()
        for job in pending.values():
            job._fail(RuntimeError("the rollout group was shut down"))
        self._thread.join(timeout=10)

    # ------------------------------------------------------------------------------------------ the thread
    def _run(self) -> None:
        import ray

        supervisor = self.pool.supervisor
        free = list(range(len(self.pool.actors)))
        running: dict[Any, tuple[RolloutJob, int, int, Any, float]] = {}  # ref -> job, chunk, actor, pid, deadline
        while True:
            with self._wake:
                if self._stopped:
                    return
                while free and self._queue:
                    job, chunk = self._queue.popleft()
                    if job.done():  # failed already: its other chunks are not worth sampling
                        continue
                    actor = free.pop(0)
                    pid = self.pool.info[actor].get("pid")
                    try:
                        ref = job.call(self.pool.actors[actor], chunk)
                    except BaseException as err:  # noqa: BLE001 (handed to the waiting caller)
                        job._fail(err)
                        free.insert(0, actor)
                        continue
                    running[ref] = (job, chunk, actor, pid, time.monotonic() + supervisor.timeout_s)
                if not running:
                    self._wake.wait()
                    continue
            done, _ = ray.wait(list(running), num_returns=1, timeout=POLL_S)
            now = time.monotonic()
            for ref in list(running):
                job, chunk, actor, pid, deadline = running[ref]
                if ref not in done and now < deadline:
                    continue
                del running[ref]
                if ref not in done:
                    job._fail(ActorTimeoutError(
                        f"{self.pool.name(actor)} did not finish {job.name} within {supervisor.timeout_s:g} s "
                        "(cluster.actor_timeout_s)"))
                    continue  # the actor stays busy (and out of the free list) until Ray gives up on it
                self._collect(ref, job, chunk, actor, pid)
                free.append(actor)

    def _collect(self, ref: Any, job: RolloutJob, chunk: int, actor: int, pid: Any) -> None:
        """File a finished chunk's result; after a lost actor (or reward model), recover and queue it again."""
        out = self.pool.supervisor.outcome(ref, self.pool.label(actor))
        if out.error is None:
            job._finish(chunk, out.value, actor)
            return
        lost_weights = not out.lost and self.state_lost(out.error)
        if not (out.lost or lost_dependency(out.error) or lost_weights):
            job._fail(out.error)
            return
        try:
            if lost_dependency(out.error) and self.pool.dependency is not None:
                self.pool.dependency.wait_restarted(self.pool.supervisor)
            if out.lost:
                self.pool.recover(actor, pid)
            elif lost_weights and not self.pool.recover_if_restarted(actor):
                job._fail(out.error)  # a real version mismatch, not a restart
                return
        except BaseException as err:  # noqa: BLE001 (out of restarts, or not back in time: the caller's error)
            job._fail(err)
            return
        with self._wake:
            self._queue.appendleft((job, chunk))


def merge_chunks(parts: Sequence[dict[str, Any]], served_by: Sequence[int], num_actors: int,
                 examples: int) -> dict[str, Any]:
    """One batch from its chunks' results, in chunk order: arrays concatenated, ``sample_version`` (each sequence's
    weight version), counters summed, per-phase times as the busiest actor's total, ``examples`` spread evenly."""
    merged: dict[str, Any] = {k: np.concatenate([p[k] for p in parts]) for k, v in parts[0].items()
                              if isinstance(v, np.ndarray)}
    merged["sample_version"] = np.concatenate(
        [np.full(len(p["score"]), int(p["weights_version"]), np.int64) for p in parts])
    merged["generated_tokens"] = sum(p["generated_tokens"] for p in parts)
    merged["reward_errors"] = sum(p["reward_errors"] for p in parts)
    for key in ("generate_s", "replay_s", "batch_reward_s"):
        per_actor = np.zeros(num_actors)
        for p, actor in zip(parts, served_by):
            per_actor[actor] += p[key]
        merged[key] = float(per_actor.max())
    merged["busy_s"] = float(sum(p["generate_s"] + p["replay_s"] + p["batch_reward_s"] for p in parts))
    every = [e for p in parts for e in p["examples"]]
    picks = sorted(set(np.linspace(0, len(every) - 1, min(examples, len(every))).round().astype(int).tolist()))
    merged["examples"] = [every[i] for i in picks] if every else []
    return merged
