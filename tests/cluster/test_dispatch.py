"""Dynamic dispatch (cluster/dispatch.py) on a real Ray, with stand-in actors: ``StandIn`` answers ``ready`` and
``sample`` like a rollout actor, without vLLM, and takes as long as it is told to. What is under test is the
dispatcher: who serves which chunk, the order of the merged batch, the order of queued jobs, and recovery from a
lost actor. The real rollout actors go through the same dispatcher in every training test (tests/cluster/test_e2e.py,
test_faults.py, test_async.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from cluster.dispatch import Dispatcher, RolloutJob, merge_chunks
from cluster.supervision import ActorPool, Supervisor
from tests.standins import StandIn

pytestmark = pytest.mark.ray


def start(ray, delays: list[float], die_once: list[str | None] | None = None, restored: list | None = None):
    supervisor = Supervisor(timeout_s=60, max_restarts=2)
    cls = ray.remote(num_cpus=0, **supervisor.actor_options())(StandIn)
    die_once = die_once or [None] * len(delays)
    pool = ActorPool([cls.remote(i, d, die_once[i]) for i, d in enumerate(delays)], supervisor, "stand-in",
                     restore=(restored.append if restored is not None else None))
    pool.start()
    return pool, Dispatcher(pool, state_lost=lambda err: False)


def job(n_chunks: int, rows_per_chunk: int = 2, first_seed: int = 0) -> RolloutJob:
    return RolloutJob("sample", n_chunks, lambda actor, c: actor.sample.remote(rows_per_chunk, first_seed + c, 1))


def test_free_actors_take_the_next_chunk_and_the_batch_keeps_chunk_order(ray_session) -> None:
    pool, dispatcher = start(ray_session, [0.6, 0.02])  # actor 0 is 30x slower
    try:
        parts, served_by = dispatcher.submit(job(12)).result(timeout=60)
    finally:
        dispatcher.stop()
    # The fast actor served most chunks while the slow one worked on its first or second; no static split.
    assert served_by.count(1) >= 9, served_by
    merged = merge_chunks(parts, served_by, num_actors=2, examples=8)
    assert merged["score"].tolist() == [float(c) for c in range(12) for _ in range(2)]  # chunk order, not finish order
    assert merged["served"].tolist() == [a for a in served_by for _ in range(2)]
    assert merged["sample_version"].tolist() == [1] * 24
    # The busiest actor's own total, not the sum over actors.
    assert merged["generate_s"] == pytest.approx(max(0.6 * served_by.count(0), 0.02 * served_by.count(1)))


def test_queued_jobs_are_served_in_submission_order(ray_session) -> None:
    pool, dispatcher = start(ray_session, [0.05, 0.05])
    try:
        first, second = dispatcher.submit(job(6)), dispatcher.submit(job(6, first_seed=100))
        a, _ = first.result(timeout=60)
        b, _ = second.result(timeout=60)
    finally:
        dispatcher.stop()
    # No chunk of the later batch started before every chunk of the earlier one had.
    assert min(p["start"] for p in b) >= max(p["start"] for p in a)
    assert [p["score"][0] for p in b] == [100.0 + c for c in range(6)]


def test_a_chunk_of_a_lost_actor_is_redone_after_its_restart(ray_session, tmp_path: Path) -> None:
    restored: list[int] = []
    pool, dispatcher = start(ray_session, [0.05, 0.05], die_once=[str(tmp_path / "died"), None], restored=restored)
    pids = [info["pid"] for info in pool.info]
    try:
        parts, served_by = dispatcher.submit(job(6)).result(timeout=60)
    finally:
        dispatcher.stop()
    assert (tmp_path / "died").exists()  # actor 0 did die mid-call
    assert [p["score"][0] for p in parts] == [float(c) for c in range(6)]  # every chunk once, none lost
    assert restored == [0] and pool.supervisor.restarts == 1  # restarted once and given the run's state back
    assert pool.info[0]["pid"] != pids[0] and pool.info[1]["pid"] == pids[1]


def test_a_chunks_own_error_fails_its_job_with_that_error(ray_session) -> None:
    pool, dispatcher = start(ray_session, [0.01])
    bad = RolloutJob("sample", 3, lambda actor, c: actor.sample.remote("not a number", c, 1))
    try:
        with pytest.raises(TypeError):
            dispatcher.submit(bad).result(timeout=60)
        parts, _ = dispatcher.submit(job(2)).result(timeout=60)  # the dispatcher goes on serving
    finally:
        dispatcher.stop()
    assert len(parts) == 2
