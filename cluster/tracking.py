"""Where metrics go: ``metrics.jsonl`` in the run directory, Weights & Biases, and a console progress bar."""

from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path
from typing import Any

from cluster.config import TrackingConfig

METRICS_FILE = "metrics.jsonl"
SAMPLES_FILE = "samples.jsonl"  # one line per logged response: iteration, kind (eval), prompt, response, answer, score


def wandb_mode(cfg: TrackingConfig) -> str:
    """``auto`` means online when an API key is set and offline (no network, no login prompt) otherwise."""
    if not cfg.wandb or cfg.mode == "disabled":
        return "disabled"
    if cfg.mode == "auto":
        return "online" if os.environ.get("WANDB_API_KEY") else "offline"
    return cfg.mode


class Tracker:
    """Logs one dict of metrics per iteration to every sink; on resume, drops lines past the checkpoint."""

    def __init__(
        self, cfg: TrackingConfig, run_dir: Path, run_name: str, config: dict[str, Any], wandb_id: str,
        start_iteration: int, total_iterations: int,
    ) -> None:
        self.path, self.samples_path = run_dir / METRICS_FILE, run_dir / SAMPLES_FILE
        for path in (self.path, self.samples_path):
            _truncate_after(path, start_iteration)
        self._file = open(self.path, "a")
        self.wandb_run = None
        mode = wandb_mode(cfg)
        if mode != "disabled":
            import wandb

            self.wandb_run = wandb.init(
                project=cfg.project, entity=cfg.entity, name=run_name, id=wandb_id, resume="allow",
                dir=str(run_dir), config=config, mode=mode,
                settings=wandb.Settings(silent=True, console="off", x_disable_stats=True),
            )
        self._bar = None
        if cfg.progress_bar:
            from tqdm import tqdm

            self._bar = tqdm(total=total_iterations, initial=start_iteration, desc=run_name, unit="it", file=sys.stderr,
                             dynamic_ncols=True)

    def log(self, metrics: dict[str, Any]) -> None:
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in metrics.items()}
        self._file.write(json.dumps(clean) + "\n")
        self._file.flush()
        if self.wandb_run is not None:
            self.wandb_run.log(metrics, step=int(metrics["iteration"]))
        if self._bar is not None and "reward/mean" in metrics:  # not the evaluation before training (iteration 0)
            self._bar.set_postfix(reward=f"{metrics['reward/mean']:.3f}", kl=f"{metrics.get('losses/approx_kl', 0):.4f}")
            self._bar.update(1)

    def log_samples(self, iteration: int, kind: str, rows: list[dict[str, Any]]) -> None:
        """Append responses (dicts of prompt, response, answer, score) to ``samples.jsonl``."""
        with open(self.samples_path, "a") as f:
            f.writelines(json.dumps({"iteration": iteration, "kind": kind, **row}) + "\n" for row in rows)

    def close(self, exit_code: int = 0) -> None:
        if self._bar is not None:
            self._bar.close()
        self._file.close()
        if self.wandb_run is not None:
            self.wandb_run.finish(exit_code=exit_code)


def _truncate_after(path: Path, iteration: int) -> None:
    """Iterations after the checkpoint we resume from will run again: forget their old lines."""
    if not path.exists():
        return
    kept = [ln for ln in path.read_text().splitlines() if ln.strip() and json.loads(ln)["iteration"] <= iteration]
    path.write_text("".join(ln + "\n" for ln in kept))


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    """All metric lines of a run, in order."""
    path = Path(run_dir) / METRICS_FILE
    return [json.loads(ln) for ln in path.read_text().splitlines() if ln.strip()]
