"""``--resume auto`` (which run it continues) and a failed iteration (no checkpoint, the last good one kept), with
the driver loop of ``cluster.run.train`` around a stand-in Trainer: no Ray."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from cluster.checkpoint import latest_checkpoint, read_state, save_checkpoint
from cluster.cli import main
from cluster.run import find_resumable_run
from cluster.supervision import ActorTimeoutError
from cluster.tracking import read_metrics


def make_run(root: Path, dirname: str, name: str) -> Path:
    path = root / dirname
    path.mkdir(parents=True)
    (path / "config.yaml").write_text(f"name: {name}\n")
    return path


def test_auto_picks_the_newest_run_of_that_name(tmp_path: Path) -> None:
    assert find_resumable_run(tmp_path / "missing", "exp") is None
    assert find_resumable_run(tmp_path, "exp") is None
    make_run(tmp_path, "exp-20261129-101500", "exp")
    newest = make_run(tmp_path, "exp-20261130-080000", "exp")
    make_run(tmp_path, "exp-b-20261231-000000", "exp-b")  # another name that starts with the same text
    make_run(tmp_path, "other-20261231-000000", "other")
    (tmp_path / "exp-20261231-000000").mkdir()  # no config.yaml: not a run
    (tmp_path / "exp-20261231-000001.txt").write_text("")
    assert find_resumable_run(tmp_path, "exp") == newest
    # Same second: the -n suffix new_run_dir adds counts; the start time, not the modification time, decides.
    second = make_run(tmp_path, "exp-20261130-080000-2", "exp")
    assert find_resumable_run(tmp_path, "exp") == second
    (tmp_path / "exp-20261129-101500" / "config.yaml").touch()
    assert find_resumable_run(tmp_path, "exp") == second
    assert find_resumable_run(tmp_path, "exp-b") == tmp_path / "exp-b-20261231-000000"


class FakeLearners:
    """What save_checkpoint needs from a LearnerGroup."""

    def save_to_path(self, path: str) -> None:
        Path(path).mkdir(parents=True)
        (Path(path) / "weights").write_text("w")


class FakeTrainer:
    """A stand-in for cluster.trainer.Trainer: the driver loop's view of it, with an iteration that can fail."""

    fail_at: int | None = None
    restored_from: list[int] = []
    ran: list[int] = []

    def __init__(self, cfg: Any, model_dir: Path, prompt_tokens: int, response_tokens: int, data: Any = None,
                 name: str = "tokengym") -> None:
        self.cfg, self.weights_version = cfg, 0
        self.startup: dict[str, float] = {}  # where a real trainer's start went (nothing to time here)

    def sync_weights(self) -> None:
        self.weights_version += 1

    def restore(self, checkpoint: Path) -> dict[str, Any]:
        state = read_state(checkpoint)
        FakeTrainer.restored_from.append(state["iteration"])
        self.weights_version = state["weights_version"]
        return state

    def run_iteration(self, iteration: int) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        if iteration == FakeTrainer.fail_at:
            raise ActorTimeoutError("rollout actor 1 (pid 42 on 10.0.0.2) did not finish sample within 5 s "
                                    "(cluster.actor_timeout_s)")
        FakeTrainer.ran.append(iteration)
        self.weights_version += 1
        return {"iteration": iteration, "reward/mean": 0.1 * iteration, "weights/version": self.weights_version,
                "faults/actor_restarts": 0}, []

    def save(self, root: Path, iteration: int, extra: dict[str, Any]) -> Path:
        state = {"weights_version": self.weights_version, **extra}
        return save_checkpoint(root, iteration, FakeLearners(), state, self.cfg.keep_checkpoints)

    def shutdown(self) -> None:
        pass


@pytest.fixture
def fake_trainer(monkeypatch: pytest.MonkeyPatch) -> type[FakeTrainer]:
    monkeypatch.setattr("cluster.trainer.Trainer", FakeTrainer)
    monkeypatch.setattr("cluster.run.init_ray", lambda cfg: None)
    monkeypatch.setattr("cluster.run.plot_summary", lambda run_dir: None)
    FakeTrainer.fail_at, FakeTrainer.restored_from, FakeTrainer.ran = None, [], []
    return FakeTrainer


def train_args(runs: Path, *extra: str) -> list[str]:
    return ["train", "name=auto", "iterations=5", "checkpoint_every=1", f"runs_dir={runs}", "tracking.wandb=false",
            "tracking.progress_bar=false", "policy.hidden_size=32", "policy.num_heads=1", "policy.intermediate_size=64",
            *extra]


def test_failed_iteration_keeps_the_last_checkpoint_and_resume_auto_continues(
    fake_trainer: type[FakeTrainer], tmp_path: Path, capsys: pytest.CaptureFixture,
) -> None:
    runs = tmp_path / "runs"
    fake_trainer.fail_at = 3
    assert main([*train_args(runs), "--resume", "auto"]) == 1  # no run of this name yet: a new one
    err = capsys.readouterr().err
    assert err.strip().splitlines()[-1] == ("tokengym: error: rollout actor 1 (pid 42 on 10.0.0.2) did not finish "
                                            "sample within 5 s (cluster.actor_timeout_s)")
    (run,) = [p for p in runs.iterdir()]
    assert "ActorTimeoutError: rollout actor 1" in (run / "error.log").read_text()  # its traceback, as any failure's
    assert [r["iteration"] for r in read_metrics(run)] == [1, 2]  # the failed iteration logged nothing
    assert read_state(latest_checkpoint(run / "checkpoints"))["iteration"] == 2  # ... and saved nothing
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["iter_000001", "iter_000002", "latest"]

    # The same command again (a Kubernetes retry) continues that run from iteration 3, each iteration once.
    fake_trainer.fail_at = None
    assert main([*train_args(runs), "--resume", "auto"]) == 0
    assert "--resume auto: continuing" in capsys.readouterr().err
    assert [p for p in runs.iterdir()] == [run]
    assert fake_trainer.restored_from == [2] and fake_trainer.ran == [1, 2, 3, 4, 5]
    rows = read_metrics(run)
    assert [r["iteration"] for r in rows] == [1, 2, 3, 4, 5]
    assert [r["weights/version"] for r in rows] == [2, 3, 4, 5, 6]  # versions continue from the checkpoint
    assert read_state(latest_checkpoint(run / "checkpoints"))["iteration"] == 5
    assert json.loads((run / "checkpoints" / "iter_000005" / "state.json").read_text())["wandb_id"] == (
        run / "wandb_id").read_text().strip()


def test_resume_auto_restarts_a_run_stopped_before_its_first_checkpoint(
    fake_trainer: type[FakeTrainer], tmp_path: Path,
) -> None:
    runs = tmp_path / "runs"
    fake_trainer.fail_at = 1
    assert main(train_args(runs)) == 1
    (run,) = [p for p in runs.iterdir()]
    assert latest_checkpoint(run / "checkpoints") is None
    wandb_id = (run / "wandb_id").read_text()
    fake_trainer.fail_at = None
    assert main([*train_args(runs), "--resume", "auto"]) == 0
    assert [p for p in runs.iterdir()] == [run]  # same directory
    assert (run / "wandb_id").read_text() != wandb_id  # every start is a new W&B run (cluster/tracking.py)
    assert fake_trainer.restored_from == [] and [r["iteration"] for r in read_metrics(run)] == [1, 2, 3, 4, 5]


def test_resume_auto_uses_the_runs_own_config_plus_the_overrides(
    fake_trainer: type[FakeTrainer], tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    runs = tmp_path / "runs"
    assert main(train_args(runs, "iterations=2")) == 0
    (run,) = [p for p in runs.iterdir()]
    calls: list[tuple[Any, ...]] = []
    monkeypatch.setattr("cluster.run.train", lambda cfg, run_dir=None, resume=False: calls.append(
        (cfg, run_dir, resume)) or run)
    assert main(["train", f"runs_dir={runs}", "name=auto", "iterations=4", "--resume", "auto"]) == 0
    ((cfg, run_dir, resume),) = calls
    assert (run_dir, resume) == (run, True)
    assert (cfg.iterations, cfg.policy.hidden_size, cfg.tracking.wandb) == (4, 32, False)  # the run's, plus overrides
    assert main(["train", f"runs_dir={runs}", "name=other", "--resume", "auto"]) == 0  # no such run: a new one
    assert calls[1][1:] == (None, False) and calls[1][0].name == "other"
