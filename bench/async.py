"""Asynchronous rollouts: wall time and iterations to reward 0.5 and 0.8 with rollout.max_staleness k = 0, 1, 2.

Each (k, seed) is one real ``tokengym train`` run of the config (default: configs/default.yaml, PPO on
reverse-5-letters) with ``rollout.max_staleness=k`` (and, for k > 0, ``algorithm.off_policy`` = ``--off-policy``,
default decoupled), stopped once its reward has stayed at or above ``--target`` (0.8) for 3 iterations, or at
``--max-iterations``. The runs of one round go one at a time, in an order that rotates from round to round (the
machine is shared and noisy: each k meets the same conditions on average), and every k is run with the same seeds.

Per run, from its metrics (docs/metrics.md): iterations to 0.5 and to the target (the first iteration whose
``reward/mean`` reaches it); training seconds to the target (the sum of ``timing/iteration_s`` up to it: the loop's
wall time, without start-up); and how busy the two sides were over the run: engines = sum of
``timing/engines_busy_s`` (each engine's seconds on its batches) / training seconds, learner = sum of
``timing/logprobs_s + timing/update_s`` / training seconds. Printed per run, then per k the median over the seeds and
rounds, and the ratios to k = 0 (time and iterations to the target; the issue's goal: k = 1 in less wall time with at
most 15% more iterations).

    RAY_memory_monitor_refresh_ms=0 .venv/bin/python bench/async.py [--staleness 0 1 2] [--seeds 0 1]
        [--rounds 1] [--target 0.8] [--max-iterations 250] [--off-policy decoupled] [--config configs/default.yaml]
        [--set key=value ...] [--record]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run as a script from anywhere: bench/ is not a package

from bench.rollout import record  # noqa: E402

HOLD = 3  # iterations the reward must stay at or above the target before a run is stopped


def metrics(run: Path) -> list[dict[str, Any]]:
    path = run / "metrics.jsonl"
    if not path.exists():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:  # the line being written
            break
    return [r for r in rows if "reward/mean" in r]


def reached(rows: list[dict[str, Any]], target: float) -> bool:
    return len(rows) >= HOLD and all(r["reward/mean"] >= target for r in rows[-HOLD:])


def run_one(config: str, k: int, seed: int, out: Path, args: argparse.Namespace) -> list[dict[str, Any]]:
    """One run until the reward holds the target (then Ctrl-C: the run stops cleanly) or max iterations."""
    name = f"async-k{k}-s{seed}"
    extra = [f"algorithm.off_policy={args.off_policy}"] if k > 0 else []
    cmd = [sys.executable, "-m", "cluster.cli", "train", config, f"seed={seed}", f"name={name}", f"runs_dir={out}",
           f"iterations={args.max_iterations}", f"checkpoint_every={args.max_iterations}", "tracking.wandb=false",
           "tracking.progress_bar=false", f"rollout.max_staleness={k}", *extra, *args.set]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    run = None
    while proc.poll() is None:
        time.sleep(1.0)
        runs = sorted(out.glob(f"{name}-*"))
        run = runs[-1] if runs else None
        if run is not None and reached(metrics(run), args.target):
            os.killpg(proc.pid, signal.SIGINT)  # tokengym stops after the iteration in progress
            break
    _, err = proc.communicate(timeout=300)
    if proc.returncode not in (0, 130):
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{err[-2000:]}")
    runs = sorted(out.glob(f"{name}-*"))
    return metrics(runs[-1])


def summarize(rows: list[dict[str, Any]], target: float) -> dict[str, Any]:
    def first(bar: float) -> int | None:
        return next((r["iteration"] for r in rows if r["reward/mean"] >= bar), None)

    to_target = first(target)
    train_s = sum(r["timing/iteration_s"] for r in rows)
    return {
        "iterations": len(rows), "to_0.5": first(0.5), "to_target": to_target,
        "s_to_target": (sum(r["timing/iteration_s"] for r in rows[:to_target]) if to_target is not None else None),
        "s_per_iteration": train_s / max(len(rows), 1),
        "engines_busy": sum(r["timing/engines_busy_s"] for r in rows) / train_s,
        "learner_busy": sum(r["timing/logprobs_s"] + r["timing/update_s"] for r in rows) / train_s,
        "staleness": statistics.mean(r["rollout/staleness"] for r in rows),
        "best": max(r["reward/mean"] for r in rows),
    }


def median(values: list[float | int | None]) -> float | None:
    known = [v for v in values if v is not None]
    return statistics.median(known) if known and len(known) == len(values) else None


def fmt(value: float | None, spec: str) -> str:
    return "never" if value is None else format(value, spec)


def ratio(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}x"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--staleness", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--target", type=float, default=0.8)
    parser.add_argument("--max-iterations", type=int, default=250)
    parser.add_argument("--off-policy", default="decoupled", choices=["none", "truncated_is", "decoupled"])
    parser.add_argument("--config", default=str(REPO / "configs" / "default.yaml"))
    parser.add_argument("--set", nargs="*", default=[], help="more overrides for every run (key=value)")
    parser.add_argument("--record", action="store_true", help="append the result to bench/RESULTS.md")
    args = parser.parse_args()
    if args.staleness[0] != 0:
        raise SystemExit("--staleness must start with 0: the synchronous loop is what the others are compared to")
    load_before = os.getloadavg()
    results: dict[int, list[dict[str, Any]]] = {k: [] for k in args.staleness}
    lines = []
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            order = args.staleness[r % len(args.staleness):] + args.staleness[:r % len(args.staleness)]
            for seed in args.seeds:
                for k in order:
                    s = summarize(run_one(args.config, k, seed, Path(tmp) / f"r{r}", args), args.target)
                    results[k].append(s)
                    line = (f"  round {r} seed {seed} k={k}: {s['iterations']} iterations, reward {args.target} at "
                            f"{fmt(s['to_target'], 'd')} ({fmt(s['s_to_target'], '.1f')} s), 0.5 at "
                            f"{fmt(s['to_0.5'], 'd')}, {s['s_per_iteration']:.3f} s/iteration, engines busy "
                            f"{s['engines_busy']:.0%}, learner busy {s['learner_busy']:.0%}, staleness "
                            f"{s['staleness']:.2f}, best reward {s['best']:.3f}")
                    print(line, flush=True)
                    lines.append(line)
    base = results[args.staleness[0]]
    table = [f"| max_staleness | iterations to 0.5 | iterations to {args.target} | training s to {args.target} | "
             "s / iteration | engines busy | learner busy | time vs k=0 | iterations vs k=0 |",
             "|---|---|---|---|---|---|---|---|---|"]
    for k in args.staleness:
        runs = results[k]
        time_ratio = median([None if a["s_to_target"] is None or b["s_to_target"] is None
                             else a["s_to_target"] / b["s_to_target"] for a, b in zip(runs, base)])
        it_ratio = median([None if a["to_target"] is None or b["to_target"] is None
                           else a["to_target"] / b["to_target"] for a, b in zip(runs, base)])
        table.append(
            f"| {k} | {fmt(median([s['to_0.5'] for s in runs]), '.0f')} | "
            f"{fmt(median([s['to_target'] for s in runs]), '.0f')} | {fmt(median([s['s_to_target'] for s in runs]), '.1f')}"
            f" | {median([s['s_per_iteration'] for s in runs]):.3f} | {median([s['engines_busy'] for s in runs]):.0%} | "
            f"{median([s['learner_busy'] for s in runs]):.0%} | {ratio(time_ratio)} | {ratio(it_ratio)} |")
    print("\n".join(table))
    if args.record:
        record("async.py", load_before, "\n".join(lines), "\n".join(table))


if __name__ == "__main__":
    main()
