"""Where metrics go: ``metrics.jsonl`` in the run directory, Weights & Biases, and a console progress bar.

W&B and resumed runs: a resumed run starts a new W&B run (new id, the same group, named ``<name>-resume-<iteration>``,
its config noting the parent run's id and the checkpoint's iteration) and first replays ``metrics.jsonl`` (and the
samples tables of ``samples.jsonl``) up to the checkpoint into it. Its history then equals ``metrics.jsonl`` exactly,
offline and online alike: continuing the old W&B run would drop the iterations redone after the checkpoint (W&B
ignores steps below its last one), and W&B's server-side rewind cannot be used offline.
"""

from __future__ import annotations

import json
import math
import os
import re
import secrets
import sys
from collections import defaultdict
from pathlib import Path
from typing import IO, Any

from cluster.config import ConfigError, TrackingConfig

METRICS_FILE = "metrics.jsonl"
SAMPLES_FILE = "samples.jsonl"  # one line per logged response: iteration, kind (train | eval), prompt, response, ...
WANDB_ID_FILE = "wandb_id"  # the id of the W&B run that logs this run directory now
SAMPLES_KEY = "samples/{kind}"  # the W&B table of an iteration's logged responses


def wandb_mode(cfg: TrackingConfig) -> str:
    """The W&B mode a run uses. ``auto``: ``WANDB_MODE`` when it is set, else online when W&B finds credentials by
    its own means (:func:`wandb_credentials_found`), else offline (no network, no login prompt)."""
    if not cfg.wandb or cfg.mode == "disabled":
        return "disabled"
    if cfg.mode != "auto":
        return cfg.mode
    env_mode = {"dryrun": "offline", "run": "online"}.get(os.environ.get("WANDB_MODE", ""), os.environ.get("WANDB_MODE"))
    if env_mode in ("online", "offline", "disabled"):
        return env_mode
    return "online" if wandb_credentials_found() else "offline"


def wandb_credentials_found() -> bool:
    """Whether W&B would log in without asking: ``WANDB_API_KEY`` (or ``WANDB_IDENTITY_TOKEN_FILE``), the key that
    ``wandb login`` saved in ``~/.netrc`` (or ``$NETRC``), or an ``api_key`` in W&B's settings files, for the server
    W&B is set to (``WANDB_BASE_URL``). W&B's own lookup; it reads files only: no network, no prompt."""
    from wandb.errors import AuthenticationError
    from wandb.sdk import wandb_setup
    from wandb.sdk.lib import wbauth

    settings = wandb_setup.singleton().settings
    host = wbauth.HostUrl(settings.base_url, app_url=settings.app_url)
    try:
        auth = wbauth.authenticate_session(host=host, source="tokengym", prompt=False, update_session=False)
    except AuthenticationError as err:  # found, but not a usable key: going offline would hide it
        raise ConfigError(f"tracking.mode=auto: W&B credentials for {host.url} are invalid ({err}); fix them "
                          "(wandb login --relogin) or set tracking.mode=offline") from None
    return auth is not None


class Tracker:
    """Logs one dict of metrics per iteration to every sink; on resume, drops lines past the checkpoint.

    ``start_iteration > 0`` (a resumed run) starts a new W&B run that replays the kept history first (see the
    module's docstring); ``wandb_id`` is the id of the W&B run logging now, kept in ``RUN_DIR/wandb_id`` and in
    every checkpoint.
    """

    def __init__(
        self, cfg: TrackingConfig, run_dir: Path, run_name: str, config: dict[str, Any], start_iteration: int,
        total_iterations: int, console: IO[str] | None = None,
    ) -> None:
        self.cfg, self.run_dir = cfg, run_dir
        self.path, self.samples_path = run_dir / METRICS_FILE, run_dir / SAMPLES_FILE
        for path in (self.path, self.samples_path):
            _truncate_after(path, start_iteration)
        self._file = open(self.path, "a")
        self.parent_id = _read_id(run_dir) if start_iteration > 0 else None
        self.wandb_id = secrets.token_hex(4)
        (run_dir / WANDB_ID_FILE).write_text(self.wandb_id)
        self.wandb_run, self.wandb_dir = None, None
        mode = wandb_mode(cfg)
        if mode != "disabled":
            self.wandb_run = self._start_wandb(mode, cfg.name or run_name, config, start_iteration)
            self.wandb_dir = Path(self.wandb_run.dir).parent  # RUN_DIR/wandb/offline-run-<stamp>-<id> (or run-...)
            if start_iteration > 0:
                self._replay()
        self._bar = None
        if cfg.progress_bar:
            from tqdm import tqdm

            self._bar = tqdm(total=total_iterations, initial=start_iteration, desc=run_name, unit="it",
                             file=console or sys.stderr, dynamic_ncols=True)

    def _start_wandb(self, mode: str, name: str, config: dict[str, Any], start_iteration: int) -> Any:
        import wandb

        if start_iteration > 0:
            name = f"{name}-resume-{start_iteration}"
            config = {**config, "resumed_from": {"wandb_id": self.parent_id, "iteration": start_iteration}}
        cfg = self.cfg
        return wandb.init(
            project=cfg.project, entity=cfg.entity, name=name, group=cfg.group or self.run_dir.name,
            tags=list(cfg.tags) or None, notes=cfg.notes, id=self.wandb_id, dir=str(self.run_dir), config=config,
            mode=mode, settings=wandb.Settings(silent=True, console="off", x_disable_stats=True),
        )

    def _replay(self) -> None:
        """The kept metrics and samples, into the new W&B run, at their own steps."""
        samples: dict[int, dict[str, list[dict[str, Any]]]] = defaultdict(lambda: defaultdict(list))
        for row in _read_jsonl(self.samples_path):
            samples[row["iteration"]][row.pop("kind")].append(row)
        for row in _read_jsonl(self.path):
            step = int(row["iteration"])
            tables = {SAMPLES_KEY.format(kind=kind): _table(rows) for kind, rows in samples.get(step, {}).items()}
            self.wandb_run.log({**_from_json(row), **tables}, step=step)

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
        """Append responses (dicts: prompt, response and reward for ``train``; answer and score for ``eval``) to
        ``samples.jsonl``, and log them as the W&B table ``samples/<kind>`` of that iteration's step."""
        with open(self.samples_path, "a") as f:
            f.writelines(json.dumps({"iteration": iteration, "kind": kind, **row}) + "\n" for row in rows)
        if self.wandb_run is not None and rows:
            # Same step as the iteration's metrics: W&B merges the two into one history row.
            self.wandb_run.log({SAMPLES_KEY.format(kind=kind): _table([{**r, "iteration": iteration} for r in rows])},
                               step=iteration)

    def log_artifact(self, path: Path, name: str, kind: str) -> None:
        """A directory as a W&B artifact of this run (nothing without W&B)."""
        if self.wandb_run is None:
            return
        import wandb

        artifact = wandb.Artifact(re.sub(r"[^\w.-]", "-", name), type=kind)
        artifact.add_dir(str(path))
        self.wandb_run.log_artifact(artifact)

    def close(self, exit_code: int = 0) -> None:
        if self._bar is not None:
            self._bar.close()
        self._file.close()
        if self.wandb_run is not None:
            self.wandb_run.finish(exit_code=exit_code)


def _table(rows: list[dict[str, Any]]) -> Any:
    """A W&B table of response rows; the columns are the first row's keys, ``iteration`` last."""
    import wandb

    columns = [k for k in rows[0] if k != "iteration"] + ["iteration"]
    return wandb.Table(columns=columns, data=[[row.get(c) for c in columns] for row in rows])


def _from_json(row: dict[str, Any]) -> dict[str, Any]:
    """A metrics.jsonl row as it was logged: ``null`` stood for a NaN or infinite float."""
    return {k: (math.nan if v is None else v) for k, v in row.items()}


def _read_id(run_dir: Path) -> str | None:
    path = run_dir / WANDB_ID_FILE
    return path.read_text().strip() if path.is_file() else None


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(ln) for ln in path.read_text().splitlines() if ln.strip()] if path.exists() else []


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
