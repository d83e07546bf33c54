"""``tokengym plot``: one or more runs' ``metrics.jsonl`` drawn as a grid of panels over the iterations.

Panels: reward (with the ``eval/`` accuracy and reward as markers where evaluation ran), KL, entropy, response
length, losses, and where the time of an iteration goes. Each run has one colour in every panel; within a panel,
each metric has its own line style, named in the panel's legend. Drawn with matplotlib's Agg canvas (no display).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from cluster.config import ConfigError
from cluster.tracking import METRICS_FILE, read_metrics

SUMMARY = Path("plots") / "summary.png"  # in a run directory: written when a run ends, and by `tokengym plot RUN`
COMPARE = Path("plots") / "compare.png"  # in the working directory: `tokengym plot RUN RUN ...`
STYLES = ("-", "--", ":", "-.")
MARKERS = ("o", "s", "^", "D")
# The phases of an iteration (cluster/trainer.py, Trainer.run_iteration), in order; eval runs after weight_sync.
PHASES = ("rollout", "logprobs", "advantages", "update", "weight_sync", "eval")

Rows = list[dict[str, Any]]


@dataclass(frozen=True)
class Panel:
    """One panel: ``lines`` drawn as lines, ``markers`` as points (metrics logged on some iterations only)."""

    title: str
    lines: tuple[str, ...]
    markers: tuple[str, ...] = ()
    hide_zero: bool = False  # leave out a metric that is 0 throughout (e.g. the value loss of a critic-free run)


PANELS = (
    Panel("reward", ("reward/mean",), markers=("eval/accuracy", "eval/reward")),
    Panel("KL", ("losses/approx_kl", "losses/kl_ref", "rollout/kl_ref")),
    Panel("entropy", ("losses/entropy",)),
    Panel("response length (tokens)", ("rollout/response_length",), markers=("eval/response_length",)),
    Panel("losses", ("losses/policy_loss", "losses/value_loss"), hide_zero=True),
)


def plot_runs(run_dirs: list[Path], out: Path | None = None) -> Path:
    """Draw the runs in ``run_dirs`` into the PNG ``out`` (default: RUN_DIR/plots/summary.png for one run,
    ./plots/compare.png for several); returns its path."""
    runs = {label: load_run(d) for label, d in zip(run_labels(run_dirs), run_dirs)}
    if out is None:
        out = Path(run_dirs[0]) / SUMMARY if len(run_dirs) == 1 else COMPARE
    fig = summary_figure(runs)
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out)
    return Path(out)


def load_run(run_dir: Path) -> Rows:
    """The metric rows of a run directory; a ConfigError when it has none."""
    path = Path(run_dir) / METRICS_FILE
    if not path.is_file():
        raise ConfigError(f"{run_dir}: no {METRICS_FILE}; give a run directory made by tokengym train")
    rows = read_metrics(Path(run_dir))
    if not rows:
        raise ConfigError(f"{path} is empty: the run has not logged an iteration yet")
    return rows


def run_labels(run_dirs: list[Path]) -> list[str]:
    """Each run's legend label: its directory's name, or the whole path where two names are the same."""
    names = [Path(d).name for d in run_dirs]
    return [n if names.count(n) == 1 else str(d) for n, d in zip(names, run_dirs)]


def summary_figure(runs: dict[str, Rows]) -> Figure:
    """The figure of panels for ``runs`` (legend label -> metric rows); one colour per run."""
    fig = Figure(figsize=(16, 9), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(2, 3).ravel()
    colors = {label: f"C{i % 10}" for i, label in enumerate(runs)}
    for ax, panel in zip(axes, PANELS):
        draw_panel(ax, panel, runs, colors)
    draw_timing(axes[len(PANELS)], runs, colors)
    handles = [Line2D([], [], color=colors[label], lw=2, label=label) for label in runs]
    fig.legend(handles=handles, loc="outside upper center", ncols=min(len(runs), 4), frameon=False)
    return fig


def series(rows: Rows, key: str) -> tuple[list[int], list[float]]:
    """The iterations at which ``key`` was logged with a finite value, and those values."""
    points = [(r["iteration"], float(r[key])) for r in rows if isinstance(r.get(key), (int, float))]
    points = [(i, v) for i, v in points if math.isfinite(v)]
    return [i for i, _ in points], [v for _, v in points]


def draw_panel(ax: Axes, panel: Panel, runs: dict[str, Rows], colors: dict[str, str]) -> None:
    """The panel's metrics for every run: lines, then markers."""
    drawn: list[Line2D] = []
    for keys, as_line in ((panel.lines, True), (panel.markers, False)):
        for k, key in enumerate(keys):
            style = dict(ls=STYLES[k % len(STYLES)]) if as_line else dict(ls="", marker=MARKERS[k % len(MARKERS)])
            present = False
            for label, rows in runs.items():
                xs, ys = series(rows, key)
                if not xs or (panel.hide_zero and not any(ys)):
                    continue
                ax.plot(xs, ys, color=colors[label], ms=5, gid=f"{label}|{key}", **style)
                present = True
            if present:
                drawn.append(Line2D([], [], color="0.3", label=key, **style))
    _finish(ax, panel.title, drawn)


def draw_timing(ax: Axes, runs: dict[str, Rows], colors: dict[str, str]) -> None:
    """Where an iteration's time goes: one run, its phases stacked over the iterations; several runs, each
    phase's seconds per iteration on average (evaluation's time spread over all iterations), a bar per run."""
    phases = [p for p in PHASES if any(series(rows, f"timing/{p}_s")[0] for rows in runs.values())]
    if len(runs) == 1:
        (rows,) = runs.values()
        xs = [r["iteration"] for r in rows if "timing/iteration_s" in r]
        ys = [[float(r.get(f"timing/{p}_s") or 0.0) for r in rows if "timing/iteration_s" in r] for p in phases]
        if xs:
            ax.stackplot(xs, ys, labels=phases, colors=[f"C{i}" for i in range(len(phases))], alpha=0.8, step="mid")
        _finish(ax, "time per iteration (s), by phase", ax.get_legend_handles_labels()[0])
        return
    width = 0.8 / len(runs)
    for j, (label, rows) in enumerate(runs.items()):
        iterations = max(1, len(series(rows, "timing/iteration_s")[0]))
        means = [sum(series(rows, f"timing/{p}_s")[1]) / iterations for p in phases]
        ax.barh([i + j * width for i in range(len(phases))], means, height=width, color=colors[label], gid=label)
    ax.set_yticks([i + width * (len(runs) - 1) / 2 for i in range(len(phases))], phases)
    ax.invert_yaxis()
    ax.set_xlabel("mean seconds per iteration")
    _finish(ax, "time per iteration, by phase", [], xlabel=False)


def _finish(ax: Axes, title: str, handles: list[Any], xlabel: bool = True) -> None:
    ax.set_title(title)
    ax.grid(alpha=0.3)
    if xlabel:
        ax.set_xlabel("iteration")
    if handles:
        ax.legend(handles=handles, fontsize=8)
    elif not ax.has_data():
        ax.text(0.5, 0.5, "not logged", ha="center", va="center", transform=ax.transAxes, color="0.5")
