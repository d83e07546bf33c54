"""Run storage on a URI (``cluster/storage.py``), against ``file://`` (and fsspec's ``memory://`` for the fsspec path):
checkpoints uploaded so that a reader never sees half of one, pruning, torn uploads, a run's working copy; the CLI
continuing a stored run after its local directory is gone; and one whole run on Ray and vLLM that does so for real."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from fsspec.implementations.local import LocalFileSystem
from pyarrow.fs import FSSpecHandler, PyFileSystem

from cluster.checkpoint import CHECKPOINTS, LATEST, STATE, latest_checkpoint, read_state, save_checkpoint
from cluster.cli import main
from cluster.config import ConfigError, load_config
from cluster.storage import (
    Storage, download_run, local_output, local_run_copy, stored_checkpoint, upload_checkpoint,
)
from cluster.tracking import METRICS_FILE, read_metrics
from tests.cluster.test_resume_auto import FakeLearners, FakeTrainer, fake_trainer, train_args  # noqa: F401

REPO = Path(__file__).resolve().parents[2]


def stored_dirs(store: Path) -> list[str]:
    return sorted(p.name for p in (store / CHECKPOINTS).iterdir())


def local_checkpoint(run_dir: Path, iteration: int) -> Path:
    """A checkpoint as the trainer writes it (the LearnerGroup's files, state.json, rng.json), plus its metrics."""
    run_dir.mkdir(parents=True, exist_ok=True)
    with open(run_dir / METRICS_FILE, "a") as f:
        f.write(json.dumps({"iteration": iteration}) + "\n")
    return save_checkpoint(run_dir / CHECKPOINTS, iteration, FakeLearners(), {"weights_version": iteration + 1},
                           keep=100, rng={"driver": iteration})


def test_bad_storage_is_one_config_error_naming_the_field(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("")
    for uri, reason in [
        ("foo://bucket/runs", "nor fsspec (Protocol not known: foo) has a filesystem for it"),
        ("file://runs", "File URI cannot be relative"),
        (f"file://{tmp_path}/file", "is a file, not a directory"),
    ]:
        with pytest.raises(ConfigError, match=r"^storage ") as err:
            Storage.open(uri)
        assert reason in str(err.value) and "\n" not in str(err.value), str(err.value)
        assert "give a URI such as file:///abs/dir, s3://bucket/prefix" in str(err.value)
    if importlib.util.find_spec("adlfs") is None:  # fsspec knows the scheme, its package is not installed
        with pytest.raises(ConfigError, match="^storage 'az://c/runs': Install adlfs .*; install that package, or "):
            Storage.open("az://c/runs")
    with pytest.raises(ConfigError, match="storage='runs2'|got 'runs2'.*set runs_dir instead"):
        load_config(None, ["storage=runs2"])  # a plain path is what runs_dir is for
    # train's checks before Ray reach the storage too (an unknown scheme, before anything starts).
    assert main(["train", "--dry-run", "storage=foo://x/runs"]) == 2


def test_checkpoints_upload_with_latest_last_and_pruning(tmp_path: Path) -> None:
    run_dir, store = tmp_path / "run", tmp_path / "store" / "run"
    run = Storage.open(f"file://{tmp_path}/store").child("run")
    assert stored_checkpoint(run) is None
    for iteration in (1, 2, 3):
        upload_checkpoint(run, local_checkpoint(run_dir, iteration), keep=2, run_dir=run_dir)
        assert stored_checkpoint(run) == f"iter_{iteration:06d}"
        # The metrics up to the checkpoint went with it.
        assert [r["iteration"] for r in read_metrics(store)] == list(range(1, iteration + 1))
    assert stored_dirs(store) == ["iter_000002", "iter_000003", LATEST]
    assert (store / CHECKPOINTS / LATEST).read_text() == "iter_000003"
    assert sorted(p.name for p in (store / CHECKPOINTS / "iter_000003").rglob("*")) == sorted(
        p.name for p in (run_dir / CHECKPOINTS / "iter_000003").rglob("*"))
    assert not list(store.rglob(".*tmp*"))  # the pointer was written aside and moved into place


class DyingFileSystem(LocalFileSystem):
    """A local filesystem whose writer dies (raises) when it opens its ``budget``-th file for writing."""

    def __init__(self, budget: int) -> None:
        super().__init__()
        self.budget = budget

    def open(self, path: str, mode: str = "rb", **kwargs: Any) -> Any:
        if "w" in mode or "a" in mode:
            self.budget -= 1
            if self.budget < 0:
                raise OSError("writer killed")
        return super().open(path, mode, **kwargs)


def test_a_writer_killed_at_any_point_leaves_the_previous_checkpoint_readable(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    root = tmp_path / "store"
    run = Storage.open(f"file://{root}").child("run")
    upload_checkpoint(run, local_checkpoint(run_dir, 1), keep=1, run_dir=run_dir)
    second = local_checkpoint(run_dir, 2)
    writes = len([p for p in second.rglob("*") if p.is_file()]) + 2  # the checkpoint's files, metrics.jsonl, latest
    pointer = root / "run" / CHECKPOINTS / LATEST
    for budget in range(writes):  # the writer dies before its (budget+1)-th write, at every point of the upload
        dying = Storage(PyFileSystem(FSSpecHandler(DyingFileSystem(budget))), str(root / "run"), "dying")
        with pytest.raises(OSError, match="writer killed"):
            upload_checkpoint(dying, second, keep=1, run_dir=run_dir)
        assert stored_checkpoint(run) == "iter_000001", budget  # the pointer still names the previous one
        pointer.unlink()  # e.g. the first checkpoint's upload: no pointer yet
        found = stored_checkpoint(run)  # the newest complete one: torn until state.json, the last but one write
        assert found == ("iter_000002" if budget == writes - 1 else "iter_000001"), budget
        assert max(r["iteration"] for r in read_metrics(root / "run")) >= int(found[5:])  # its history is there
        if budget == writes - 2:  # died writing state.json: every other file of the checkpoint is there
            assert (root / "run" / CHECKPOINTS / "iter_000002" / "learner").is_dir()
        pointer.write_text("iter_000001")
    upload_checkpoint(run, second, keep=1, run_dir=run_dir)  # the next try replaces the torn upload and prunes
    assert stored_checkpoint(run) == "iter_000002" and stored_dirs(root / "run") == ["iter_000002", LATEST]
    # A torn upload of a later iteration, left by a killed writer, is pruned by the next checkpoint too.
    shutil.copytree(root / "run" / CHECKPOINTS / "iter_000002" / "learner",
                    root / "run" / CHECKPOINTS / "iter_000009" / "learner")
    assert stored_checkpoint(run) == "iter_000002"
    upload_checkpoint(run, local_checkpoint(run_dir, 3), keep=1, run_dir=run_dir)
    assert stored_dirs(root / "run") == ["iter_000003", LATEST]


def test_a_stored_run_becomes_a_local_working_copy(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    run = Storage.open(f"file://{tmp_path}/store").child("run")
    run_dir.mkdir()
    (run_dir / "config.yaml").write_text("name: x\n")
    (run_dir / "policy_init").mkdir()
    (run_dir / "policy_init" / "config.json").write_text("{}")
    run.upload(run_dir / "policy_init", "policy_init")
    for iteration in (1, 2):
        upload_checkpoint(run, local_checkpoint(run_dir, iteration), keep=3, run_dir=run_dir)

    fresh = tmp_path / "fresh"  # a new pod: a stale file from elsewhere is dropped, storage is the truth
    fresh.mkdir()
    (fresh / "samples.jsonl").write_text('{"iteration": 7}\n')
    download_run(run, fresh)
    assert sorted(p.name for p in fresh.iterdir()) == ["checkpoints", "config.yaml", "metrics.jsonl", "policy_init"]
    assert read_state(latest_checkpoint(fresh / CHECKPOINTS))["iteration"] == 2
    assert sorted(p.name for p in (fresh / CHECKPOINTS).iterdir()) == ["iter_000002", LATEST]  # only the latest
    with local_run_copy(f"file://{tmp_path}/store/run/checkpoints/iter_000001", "export") as copy:
        assert read_state(latest_checkpoint(copy / CHECKPOINTS))["iteration"] == 1  # the checkpoint asked for
    assert not copy.exists()
    with pytest.raises(ConfigError, match="no config.yaml there"):
        with local_run_copy(f"file://{tmp_path}/store/other", "export"):
            pass
    with local_output(f"file://{tmp_path}/store/out", "--out") as out:
        out.mkdir()
        (out / "model.safetensors").write_text("w")
    assert (tmp_path / "store" / "out" / "model.safetensors").read_text() == "w"
    with pytest.raises(ConfigError, match="exists; choose a new location"):
        with local_output(f"file://{tmp_path}/store/out", "--out"):
            pass


def test_fsspec_filesystems_work_through_the_same_layer() -> None:
    store = Storage.open("memory://tokengym-test/store")  # a scheme pyarrow has no filesystem for
    store.write_text("run/checkpoints/latest", "iter_000001")
    store.write_text("run/checkpoints/iter_000001/state.json", "{}")
    assert store.list_dirs() == ["run"] and stored_checkpoint(store.child("run")) == "iter_000001"


def test_a_stored_run_resumes_after_its_local_directory_is_gone(
    fake_trainer: type[FakeTrainer], tmp_path: Path, capsys: pytest.CaptureFixture,  # noqa: F811
) -> None:
    """The driver loop with a stand-in Trainer (no Ray): --resume auto on a fresh machine finds the run in storage."""
    runs, store = tmp_path / "runs", tmp_path / "store"
    args = [*train_args(runs, "checkpoint_every=2", "keep_checkpoints=1"), f"storage=file://{store}"]
    fake_trainer.fail_at = 4
    assert main([*args, "--resume", "auto"]) == 1
    (run,) = [p.name for p in store.iterdir()]
    assert stored_dirs(store / run) == ["iter_000002", LATEST]
    assert [r["iteration"] for r in read_metrics(store / run)] == [1, 2]

    shutil.rmtree(runs)  # a new pod: nothing local
    fake_trainer.fail_at = None
    assert main([*args, "--resume", "auto"]) == 0
    assert f"--resume auto: continuing file://{store}/{run}" in capsys.readouterr().err
    assert fake_trainer.restored_from == [2] and fake_trainer.ran == [1, 2, 3, 3, 4, 5]
    assert [r["iteration"] for r in read_metrics(store / run)] == [1, 2, 3, 4, 5]
    assert stored_dirs(store / run) == ["iter_000005", LATEST]
    assert (store / run / "wandb_id").read_text() == (runs / run / "wandb_id").read_text()

    # --resume with the run's URI, to more iterations; a finished run's summary says where it is stored.
    assert main(["train", "--resume", f"file://{store}/{run}", "iterations=6"]) == 0
    assert f"storage         file://{store}/{run}" in capsys.readouterr().out
    assert [r["iteration"] for r in read_metrics(store / run)] == [1, 2, 3, 4, 5, 6]


@pytest.mark.ray
@pytest.mark.vllm
@pytest.mark.e2e
def test_run_in_storage_resumes_on_a_fresh_machine_and_exports_from_it(tmp_path: Path) -> None:
    """A real run with storage=file://, its local directory deleted, --resume from the URI to more iterations, and
    tokengym export from the URI: the metrics in storage cover every iteration once, the export loads."""
    # RAY_ADDRESS=local: a local Ray of its own even when a `ray start` head runs on this machine (ray.init with no
    # address joins the head that /tmp/ray/ray_current_cluster names).
    env = {**os.environ, "WANDB_MODE": "offline", "PYTHONUNBUFFERED": "1", "RAY_ADDRESS": "local"}
    env.pop("WANDB_API_KEY", None)
    store, runs = tmp_path / "store", tmp_path / "runs"

    def tokengym(*args: str) -> subprocess.CompletedProcess:
        result = subprocess.run([sys.executable, "-m", "cluster.cli", *args], cwd=REPO, env=env, capture_output=True,
                                text=True, timeout=600)
        assert result.returncode == 0, result.stderr[-3000:]
        return result

    small = ["rollout.num_actors=1", "rollout.prompts_per_iteration=32", "algorithm.minibatch_size=16",
             "algorithm.num_epochs=1", "tracking.progress_bar=false", "checkpoint_every=2", "keep_checkpoints=2"]
    tokengym("train", "name=stored", "iterations=3", *small, f"runs_dir={runs}", f"storage=file://{store}")
    (run,) = [p.name for p in store.iterdir()]
    assert stored_dirs(store / run) == ["iter_000002", "iter_000003", LATEST]
    assert (store / run / "plots" / "summary.png").is_file() and (store / run / "config.yaml").is_file()
    shutil.rmtree(runs)  # the driver's disk is gone

    tokengym("train", "--resume", f"file://{store}/{run}", "iterations=5", f"runs_dir={runs}")
    rows = read_metrics(store / run)
    assert [r["iteration"] for r in rows] == [1, 2, 3, 4, 5]
    assert [r["weights/version"] for r in rows] == [2, 3, 4, 5, 6]  # continued from the checkpoint's weights
    assert stored_dirs(store / run) == ["iter_000004", "iter_000005", LATEST]
    assert read_state(latest_checkpoint(runs / run / CHECKPOINTS))["iteration"] == 5

    shutil.rmtree(runs)  # export on yet another machine: the checkpoint's own model path (runs/...) is gone too
    assert main(["export", f"file://{store}/{run}", "--out", f"file://{store}/exported"]) == 0
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(store / "exported")
    tokenizer = AutoTokenizer.from_pretrained(store / "exported")
    assert model.config.num_hidden_layers == 2 and tokenizer("abc")["input_ids"]
