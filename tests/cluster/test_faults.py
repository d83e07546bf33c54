"""A rollout actor killed with SIGKILL in the middle of a run (as the kernel's OOM killer or a lost node would):
Ray restarts it, the driver gives it the current weights back and redoes the lost work, and the run finishes with
every iteration logged exactly once."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from cluster.checkpoint import latest_checkpoint, read_state
from cluster.tracking import read_metrics

pytestmark = [pytest.mark.ray, pytest.mark.vllm, pytest.mark.e2e]
REPO = Path(__file__).resolve().parents[2]


def rollout_actors(driver: psutil.Process) -> list[psutil.Process]:
    """The run's vLLM rollout actor processes: Ray workers under the driver's local Ray, titled by their class."""
    found = []
    for p in driver.children(recursive=True):
        try:
            if "VLLMRolloutActor" in " ".join(p.cmdline()):
                found.append(p)
        except psutil.NoSuchProcess:
            pass
    return found


def test_a_killed_rollout_actor_is_restarted_and_no_iteration_is_lost_or_repeated(tmp_path: Path) -> None:
    env = {**os.environ, "WANDB_MODE": "offline", "PYTHONUNBUFFERED": "1", "RAY_memory_monitor_refresh_ms": "0"}
    cmd = [sys.executable, "-m", "cluster.cli", "train", "iterations=4", "checkpoint_every=1", "name=faults",
           "rollout.prompts_per_iteration=64", "algorithm.minibatch_size=32", "tracking.wandb=false",
           "tracking.progress_bar=false", f"runs_dir={tmp_path}"]
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        deadline, rows, run = time.time() + 600, [], None
        while time.time() < deadline and proc.poll() is None and not rows:
            runs = [p for p in tmp_path.iterdir() if (p / "metrics.jsonl").is_file()]
            run = runs[0] if runs else None
            rows = read_metrics(run) if run is not None else []
            time.sleep(0.1)
        assert rows and proc.poll() is None, "the run ended before iteration 2"
        actors = rollout_actors(psutil.Process(proc.pid))
        assert len(actors) == 2, actors
        victim = actors[1]
        victim.send_signal(signal.SIGKILL)  # during iteration 2: no chance to clean up
        _, err = proc.communicate(timeout=900)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == 0, err[-3000:]
    assert not victim.is_running()
    rows = read_metrics(run)
    assert [r["iteration"] for r in rows] == [1, 2, 3, 4], "each iteration once, none lost"
    assert rows[0]["faults/actor_restarts"] == 0 and sum(r["faults/actor_restarts"] for r in rows) >= 1
    # The restarted actor got the current weights: one version per update, sampled with the version just pushed.
    assert [r["weights/version"] for r in rows] == [2, 3, 4, 5]
    assert max(r["rollout/logprob_gap"] for r in rows) < 1e-3
    assert read_state(latest_checkpoint(run / "checkpoints"))["iteration"] == 4
