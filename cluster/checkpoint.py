"""Atomic checkpoints: a run can be killed at any moment and resumes from the last complete one.

A checkpoint is a folder ``checkpoints/iter_000050/`` with the LearnerGroup's state (RLlib's own
``save_to_path``: weights, optimizer, schedulers), ``state.json`` (iteration, weights version, W&B run id, the data
cursor) and ``rng.json`` (the random generators' states of the driver and of every learner process). It is
written under a temporary name and renamed into place; the ``latest`` file is replaced atomically afterwards.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

CHECKPOINTS = "checkpoints"  # the folder of a run directory that holds them
LATEST = "latest"
STATE = "state.json"
RNG = "rng.json"
LEARNER = "learner"


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` so that a reader sees the old or the new content, never a torn file."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def save_checkpoint(
    root: Path, iteration: int, learner_group: Any, state: dict[str, Any], keep: int, rng: dict[str, Any] | None = None
) -> Path:
    """Write checkpoint ``iteration`` under ``root`` atomically and keep only the newest ``keep``."""
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"iter_{iteration:06d}"
    tmp = root / f".tmp-{final.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    learner_group.save_to_path(str((tmp / LEARNER).resolve()))
    if rng is not None:
        atomic_write_text(tmp / RNG, json.dumps(rng))
    atomic_write_text(tmp / STATE, json.dumps({"iteration": iteration, **state}, indent=2))
    if final.exists():  # the same iteration saved again after a resume: replace it
        shutil.rmtree(final)
    os.rename(tmp, final)
    atomic_write_text(root / LATEST, final.name)
    for old in sorted(p for p in root.glob("iter_*") if p.is_dir())[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def latest_checkpoint(root: Path) -> Path | None:
    """The newest complete checkpoint under ``root``, or None."""
    pointer = root / LATEST
    if pointer.is_file():
        path = root / pointer.read_text().strip()
        if (path / STATE).is_file():
            return path
    complete = sorted(p for p in root.glob("iter_*") if (p / STATE).is_file())
    return complete[-1] if complete else None


def read_state(checkpoint: Path) -> dict[str, Any]:
    return json.loads((checkpoint / STATE).read_text())


def read_rng(checkpoint: Path) -> dict[str, Any] | None:
    """The generator states saved with ``checkpoint``; None for a checkpoint written without them."""
    path = checkpoint / RNG
    return json.loads(path.read_text()) if path.is_file() else None
