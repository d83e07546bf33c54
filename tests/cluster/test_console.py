"""The console of a run without Ray: stderr's noise into console.log, a failure as one line plus error.log."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from cluster.config import ConfigError
from cluster.console import (
    CONSOLE_LOG, ERROR_LOG, ActorDied, RunFailed, failures_logged, one_line, quiet_console, tag,
)
from textenv import RewardError, TokenEnv


def test_stderr_goes_to_console_log_and_our_lines_to_the_console(tmp_path: Path, capfd) -> None:
    with quiet_console(tmp_path, verbose=False) as console:
        os.write(2, b"C-level noise\n")  # what Ray's C++ core and its child processes write
        print("python noise", file=sys.__stderr__, flush=True)  # a logging handler made on the process's stderr
        print("our progress", file=console)
    print("after", file=sys.stderr)
    _, err = capfd.readouterr()
    assert err.splitlines() == ["our progress", "after"]
    assert (tmp_path / CONSOLE_LOG).read_text().splitlines() == ["C-level noise", "python noise"]

    with quiet_console(tmp_path, verbose=True) as console:
        print("shown", file=console)
        os.write(2, b"also shown\n")
    _, err = capfd.readouterr()
    assert err.splitlines() == ["shown", "also shown"]


def reward_error() -> RewardError:
    import reward_fns  # tests/textenv, as a user's module

    env = TokenEnv("reverse", reward_fn=reward_fns.raising)
    env.reset(options={"prompt": "abcde=", "answer": "edcba"})
    try:
        for token in env.tokenizer.encode("edcba"):
            env.step(token)
    except RewardError as err:
        return err
    raise AssertionError("the reward function did not raise")


def from_actor(err: BaseException, where: str) -> BaseException:
    """``err`` as :func:`cluster.rollout.unwrap_ray_errors` hands it back from an actor's method."""
    import traceback

    from ray.exceptions import RayTaskError

    text = "".join(traceback.format_exception(err))
    wrapped = RayTaskError("sample", text, err, proctitle="ray::rollout actor 1.sample()", pid=1, ip="127.0.0.1")
    return tag(wrapped.as_instanceof_cause(), where)


def test_reward_error_from_an_actor_is_one_line_naming_actor_function_and_prompt(tmp_path: Path,
                                                                                monkeypatch) -> None:
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "textenv"))
    with pytest.raises(RunFailed) as failed:
        with failures_logged(tmp_path):
            raise from_actor(reward_error(), "rollout actor 1")
    line = str(failed.value)
    assert line == ("rollout actor 1: reward function reward_fns:raising of task 'reverse' raised KeyError: "
                    f"'verifier exploded' on prompt 'abcde=' (traceback: {tmp_path / ERROR_LOG})")
    log = (tmp_path / ERROR_LOG).read_text()
    assert "Traceback" in log and 'raise KeyError("verifier exploded")' in log  # the user's frame, from the actor
    assert "\x1b" not in log  # Ray's colours are for terminals


def test_other_failures_name_the_component_the_exception_and_where_it_was_raised(tmp_path: Path) -> None:
    def task_sample() -> None:
        raise ValueError("no problems left\nsecond line")

    try:
        task_sample()
    except ValueError as err:
        remote = from_actor(err, "rollout actor 0")
    text = "".join(__import__("traceback").format_exception(remote))
    assert one_line(remote, text).startswith("rollout actor 0: ValueError: no problems left (in task_sample "
                                             "(test_console.py:")
    assert one_line(ActorDied("rollout actor 2 died: ValueError: bad budget")) == (
        "rollout actor 2 died: ValueError: bad budget")
    assert one_line(tag(KeyError("x"), "learner")) == "learner: KeyError: 'x'"

    with pytest.raises(ConfigError, match="^bad key$"):  # already one line: passed through as it is
        with failures_logged(tmp_path, passthrough=(ConfigError,)):
            raise ConfigError("bad key")
    with pytest.raises(KeyboardInterrupt):
        with failures_logged(tmp_path):
            raise KeyboardInterrupt


def test_seconds_since_launch_counts_from_the_process_start_not_a_second_before() -> None:
    """A new process's age, as it reports it, lies between the parent's clock before it was started and after it
    answered. psutil's create_time puts the start up to a second early on Linux (the boot time in whole seconds);
    the kernel's uptime and the process's start ticks do not."""
    import subprocess
    import time

    code = "import time; from cluster.console import seconds_since_launch as s; age = s(); print(time.time() - age)"
    for _ in range(3):
        before = time.time()
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
        after = time.time()
        started = float(out)
        assert before - 0.02 <= started <= after, (before, started, after)  # 0.02: the kernel counts in 10 ms ticks
