"""Actor supervision with stand-in actors (no vLLM): deadlines that name the actor, restarts waited for, the state
given back, the lost call redone once; a reward-model actor lost under a rollout call."""

from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from cluster.reward_model import RewardModelReward
from cluster.rollout import StaleWeightsError
from cluster.console import WHERE, ActorDied
from cluster.supervision import ActorLostError, ActorPool, ActorTimeoutError, Supervisor

pytestmark = pytest.mark.ray


def setup_module() -> None:
    from ray import cloudpickle

    # The stand-in actors below travel by value: Ray's workers cannot import a pytest-collected module by name.
    cloudpickle.register_pickle_by_value(sys.modules[__name__])


class Worker:
    """A stand-in rollout actor: holds a version (0 after every start, like a restarted engine), answers ``work``
    only for the version it holds, and can die once (a marker file remembers it across restarts) or hang."""

    def __init__(self, index: int, reward: Any = None) -> None:
        self.index, self.version, self.reward = index, 0, reward

    def ready(self) -> dict[str, Any]:
        return {"index": self.index, "pid": os.getpid(), "node": "127.0.0.1"}

    def load(self, version: int) -> int:
        self.version = version
        return version

    def work(self, x: int, expected: int, die_once: str | None = None, hang_s: float = 0.0) -> tuple[int, int]:
        if die_once is not None and not os.path.exists(die_once):
            Path(die_once).touch()
            os._exit(1)  # as abrupt as a SIGKILL: no exception reaches Ray
        if self.version != expected:
            raise StaleWeightsError(f"worker {self.index} holds version {self.version}, asked for {expected}")
        if self.reward is not None:  # calls another actor from inside this one, as rollout actors call the scorer
            ctx = SimpleNamespace(sample=SimpleNamespace(prompt="p", answer="a"), response_text="r")
            x += int(self.reward.score_batch([ctx])[0])
        time.sleep(hang_s)
        return x * 2, os.getpid()


class Broken:
    """A stand-in actor whose ``__init__`` raises (a user error at start-up): Ray does not restart it."""

    def __init__(self) -> None:
        raise ValueError("bad budget")

    def ready(self) -> dict[str, Any]:
        return {}


class Scorer:
    """A stand-in reward-model actor that dies during its first ``score`` call."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def ready(self) -> dict[str, Any]:
        return {"pid": os.getpid()}

    def score(self, texts: list[str]) -> list[float]:
        if not os.path.exists(self.marker):
            Path(self.marker).touch()
            os._exit(1)
        return [10.0 for _ in texts]


def make_pool(ray: Any, supervisor: Supervisor, n: int = 2, reward: Any = None) -> tuple[ActorPool, list[int]]:
    """A started pool of ``n`` workers whose ``restore`` pushes the pool's current version, and the restored list."""
    cls = ray.remote(num_cpus=0, **supervisor.actor_options())(Worker)
    restored: list[int] = []
    state = {"version": 0}

    def restore(i: int) -> None:
        restored.append(i)
        supervisor.get(pool.actors[i].load.remote(state["version"]), pool.name(i), "load")

    pool = ActorPool([cls.remote(i, reward) for i in range(n)], supervisor, "worker", restore=restore,
                     dependency=reward)
    pool.start()
    pool.call("load", lambda i, a: a.load.remote(3))
    state["version"] = 3
    return pool, restored


def test_a_lost_actor_is_restarted_restored_and_the_whole_call_redone(ray_session: Any, tmp_path: Path) -> None:
    supervisor = Supervisor(timeout_s=120, max_restarts=2)
    pool, restored = make_pool(ray_session, supervisor)
    pids = [info["pid"] for info in pool.info]
    marker = str(tmp_path / "died")
    out = pool.call("work", lambda i, a: a.work.remote(10 + i, 3, die_once=marker if i == 1 else None))
    assert [x for x, _ in out] == [20, 22]  # each result once, the lost one redone with the same arguments
    assert out[0][1] == pids[0] and out[1][1] != pids[1]  # the survivor's process, the lost one's successor
    assert pool.info[1]["pid"] == out[1][1] and "pid" in pool.name(1)
    assert restored == [1] and supervisor.take_restarts() == 1 and supervisor.take_restarts() == 0
    for a in pool.actors:
        ray_session.kill(a)


def test_an_actor_restarted_between_calls_gets_its_state_back(ray_session: Any) -> None:
    supervisor = Supervisor(timeout_s=120, max_restarts=2)
    pool, restored = make_pool(ray_session, supervisor)
    os.kill(pool.info[0]["pid"], signal.SIGKILL)  # while idle: nothing fails until the next call
    time.sleep(2.0)
    lost_state = lambda err: isinstance(err, StaleWeightsError)  # noqa: E731
    out = pool.call("work", lambda i, a: a.work.remote(i, 3), state_lost=lost_state)
    assert [x for x, _ in out] == [0, 2]
    assert restored == [0] and supervisor.take_restarts() == 1
    # A refusal that is not a restart (same process) is the caller's error, raised as it is.
    with pytest.raises(StaleWeightsError, match="holds version 3, asked for 7") as refused:
        pool.call("work", lambda i, a: a.work.remote(i, 7), state_lost=lost_state)
    assert getattr(refused.value, WHERE) == "worker 0"  # named for the run's error line (cluster/console.py)
    assert supervisor.take_restarts() == 0
    for a in pool.actors:
        ray_session.kill(a)


def test_a_hung_actor_ends_in_a_one_line_error_naming_it(ray_session: Any) -> None:
    supervisor = Supervisor(timeout_s=120, max_restarts=0)
    pool, _ = make_pool(ray_session, supervisor)
    supervisor.timeout_s = 3.0  # after the start-up, which takes longer than that on a busy machine
    with pytest.raises(ActorTimeoutError) as err:
        pool.call("work", lambda i, a: a.work.remote(i, 3, hang_s=60.0 if i == 1 else 0.0))
    pid = pool.info[1]["pid"]
    assert str(err.value) == f"worker 1 (pid {pid} on 127.0.0.1) did not finish work within 3 s (cluster.actor_timeout_s)"
    for a in pool.actors:
        ray_session.kill(a)


def test_an_actor_out_of_restarts_is_lost_for_good(ray_session: Any, tmp_path: Path) -> None:
    supervisor = Supervisor(timeout_s=60, max_restarts=0)
    pool, _ = make_pool(ray_session, supervisor, n=1)
    with pytest.raises(ActorLostError, match=r"^worker 0 \(pid \d+ on 127.0.0.1\) was lost and Ray did not restart it"):
        pool.call("work", lambda i, a: a.work.remote(i, 3, die_once=str(tmp_path / "died")))


def test_a_lost_reward_model_is_waited_for_and_the_call_redone(ray_session: Any, tmp_path: Path) -> None:
    supervisor = Supervisor(timeout_s=120, max_restarts=2)
    scorer = ray_session.remote(num_cpus=0, **supervisor.actor_options())(Scorer).remote(str(tmp_path / "died"))
    reward = RewardModelReward(scorer, weight=1.0, timeout_s=60)
    pool, restored = make_pool(ray_session, supervisor, reward=reward)
    out = pool.call("work", lambda i, a: a.work.remote(i, 3))
    assert [x for x, _ in out] == [20, 22]  # (i + score 10) * 2: scored after the scorer's restart
    assert restored == [] and supervisor.take_restarts() == 1  # the scorer's restart; the workers kept their state
    for a in [*pool.actors, scorer]:
        ray_session.kill(a)


def test_an_actor_whose_init_raised_is_not_waited_for_but_named(ray_session: Any) -> None:
    supervisor = Supervisor(timeout_s=60, max_restarts=2)
    cls = ray_session.remote(num_cpus=0, **supervisor.actor_options())(Broken)
    pool = ActorPool([cls.remote()], supervisor, "worker")
    with pytest.raises(ActorDied, match=r"^worker 0 died: ValueError: bad budget$"):
        pool.start()
    assert supervisor.take_restarts() == 0
