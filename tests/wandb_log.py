"""Reads offline W&B runs back with W&B's own reader, for tests.

wandb 0.31 has no Python reader of the ``.wandb`` transaction log any more (the old ``DataStore`` is gone); its own
reader lives in wandb-core, behind ``wandb leet inspect --json``: one JSON object per record (``history``,
``run``, ``config``, ``artifact``, ...), history items decoded into a mapping.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any


def wandb_runs(run_dir: Path) -> list[Path]:
    """The offline W&B run directories under ``run_dir/wandb``, oldest first (their names start with the time)."""
    return sorted(p for p in (Path(run_dir) / "wandb").glob("offline-run-*") if p.is_dir())


def read_records(wandb_run: Path) -> list[dict[str, Any]]:
    """Every record of one W&B run directory's ``.wandb`` file, in order, as W&B's reader decodes them."""
    (log,) = Path(wandb_run).glob("run-*.wandb")
    env = {**os.environ, "WANDB_MODE": "offline"}  # no telemetry upload from the reader either
    env.pop("WANDB_API_KEY", None)
    out = subprocess.run([sys.executable, "-m", "wandb", "leet", "inspect", "--json", str(log)], env=env,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    return [json.loads(line) for line in out.stdout.splitlines() if line.strip()]


def history(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The ``wandb.log`` rows (with ``_step``) among ``records``."""
    return [r["history"]["item"] for r in records if r["type"] == "history"]


def read_history(run_dir: Path) -> list[dict[str, Any]]:
    """The history of the newest W&B run of a tokengym run directory (a resumed run's holds the whole history)."""
    return history(read_records(wandb_runs(run_dir)[-1]))


def run_record(records: list[dict[str, Any]]) -> dict[str, Any]:
    """The ``run`` record: id, display name, group, tags, notes."""
    return next(r["run"] for r in records if r["type"] == "run")


def config(records: list[dict[str, Any]]) -> dict[str, Any]:
    """The run's config as W&B stored it (each key's value decoded)."""
    out: dict[str, Any] = {}
    for r in records:
        for source in (r.get("run", {}).get("config", {}), r.get("config", {})):
            out.update(source.get("update", {}))
    return out


def read_table(wandb_run: Path, row: dict[str, Any], key: str) -> list[dict[str, Any]]:
    """The W&B table logged as ``key`` in history ``row``, as dicts of its columns."""
    table = json.loads((Path(wandb_run) / "files" / row[f"{key}.path"]).read_text())
    return [dict(zip(table["columns"], values)) for values in table["data"]]
