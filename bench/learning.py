"""How fast a config learns, over seeds: iterations to mean reward 0.5 and 0.8, the last 5 iterations' reward, the
final entropy and the training time, per seed and as a range.

Each seed is one real run, ``tokengym train CONFIG seed=S runs_dir=OUT tracking.wandb=false
tracking.progress_bar=false [overrides]``; with ``--parallel 2`` two runs share the machine at a time (each run is
deterministic per seed, so this changes only the wall time). ``--report RUN_DIR ...`` summarises runs that exist.

    OMP_NUM_THREADS=1 .venv/bin/python bench/learning.py configs/grpo.yaml --seeds 0 1 2 [--set algorithm.lr=1e-4]

Set ``OMP_NUM_THREADS=1`` to repeat the numbers in bench/RESULTS.md exactly: torch's default thread count is the
machine's core count, and a different count rounds the learner's sums differently, so the runs take other (equally
good) paths from the first update on.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def run_seed(config: str, seed: int, out: Path, overrides: list[str]) -> Path:
    """One ``tokengym train`` run; returns its run directory."""
    name = f"{Path(config).stem}-s{seed}"
    cmd = [sys.executable, "-m", "cluster.cli", "train", config, f"seed={seed}", f"name={name}", f"runs_dir={out}",
           "tracking.wandb=false", "tracking.progress_bar=false", *overrides]
    result = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{result.stderr[-2000:]}")
    (run,) = sorted(out.glob(f"{name}-*"))[-1:]
    return run


def summarize(run: Path) -> dict[str, float | int | None]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    rewards = [r["reward/mean"] for r in rows]

    def first(bar: float) -> int | None:
        return next((r["iteration"] for r in rows if r["reward/mean"] >= bar), None)

    return {"iterations": len(rows), "to_0.5": first(0.5), "to_0.8": first(0.8), "first": rewards[0],
            "last5": sum(rewards[-5:]) / len(rewards[-5:]), "entropy": rows[-1].get("losses/entropy"),
            "train_s": sum(r["timing/iteration_s"] for r in rows)}


def span(values: list) -> str:
    known = [v for v in values if v is not None]
    missing = len(values) - len(known)
    if not known:
        return "never"
    text = f"{min(known)}" if min(known) == max(known) else f"{min(known)}-{max(known)}"
    return text + (f" ({missing} never)" if missing else "")


def report(runs: list[Path]) -> None:
    stats = [summarize(r) for r in runs]
    print(f"{'run':42s} {'iters':>5s} {'to 0.5':>6s} {'to 0.8':>6s} {'first':>6s} {'last 5':>6s} {'entropy':>7s} {'train s':>7s}")
    for run, s in zip(runs, stats):
        fmt = lambda v: "-" if v is None else str(v)  # noqa: E731
        print(f"{run.name:42s} {s['iterations']:5d} {fmt(s['to_0.5']):>6s} {fmt(s['to_0.8']):>6s} {s['first']:6.3f} "
              f"{s['last5']:6.3f} {s['entropy']:7.3f} {s['train_s']:7.0f}")
    print(f"over {len(stats)} runs: to 0.5 {span([s['to_0.5'] for s in stats])}, to 0.8 {span([s['to_0.8'] for s in stats])}, "
          f"last 5 {min(s['last5'] for s in stats):.3f}-{max(s['last5'] for s in stats):.3f}, "
          f"final entropy {min(s['entropy'] for s in stats):.3f}-{max(s['entropy'] for s in stats):.3f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config", nargs="?", help="a config file (omit with --report)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--set", dest="overrides", nargs="*", default=[], help="section.key=value overrides")
    parser.add_argument("--out", type=Path, default=REPO / "runs" / "bench-learning")
    parser.add_argument("--parallel", type=int, default=1)
    parser.add_argument("--report", type=Path, nargs="+", help="summarise these run directories instead")
    args = parser.parse_args()
    if args.report:
        report(args.report)
        return
    if args.config is None:
        parser.error("give a config file, or --report RUN_DIR ...")
    args.out.mkdir(parents=True, exist_ok=True)
    with ThreadPoolExecutor(args.parallel) as pool:
        runs = list(pool.map(lambda s: run_seed(args.config, s, args.out, args.overrides), args.seeds))
    print(f"{args.config} {' '.join(args.overrides)}")
    report(runs)


if __name__ == "__main__":
    main()
