"""Start-up: where the seconds before `tokengym train`'s first iteration go, and what tokengym's engines save by not
compiling vLLM's sampler (issue 11: tokengym's start-up against TRL's).

Two parts, each alternating what it compares within one run (the machine is noisy):

  runs    ``tokengym train CONFIG iterations=1`` (W&B offline, as without an API key) for each config (default: configs/default.yaml
          and configs/grpo.yaml), in turn, ``--rounds`` times; each run's ``startup/*`` row (docs/metrics.md) is read
          back from its metrics.jsonl, and the median of every part is printed, with the share of the total.
  engine  a rollout actor (``cluster.rollout.VLLMRolloutActor``, built in a fresh process as a plain object, no Ray)
          of the default config's tiny policy, in two variants in turn, ``--rounds`` times each: ``eager`` (tokengym:
          ``skip_sampler_compile`` leaves torch.compile off in the engine's process on CPU) and ``compile`` (vLLM's
          own behaviour: the sampler's rank op is compiled with inductor on the first generate call). Timed: vLLM's
          import, the engine's build, the warm-up (``ready()``: the first generate call, 4 samples), and a steady-state
          batch (``sample``: 64 prompts x 8 samples of the default task, per-token replay included) ``--repeats``
          times after the warm-up (median). Printed: medians and the ratios eager / compile.

    .venv/bin/python bench/startup.py [--parts runs engine] [--configs configs/default.yaml ...] [--rounds 3]
        [--baseline REV] [--record]

``--baseline REV``: the runs part also runs git revision REV's sources (a temporary worktree), alternating with this
tree's, and prints the ratio of the median totals: a change's effect measured side by side.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run as a script from anywhere: bench/ is not a package

from bench.ab import revision_tree  # noqa: E402
from bench.rollout import record  # noqa: E402
from cluster.run import ACTOR_STARTUP_WORDS, STARTUP_PARTS  # noqa: E402

PARTS = tuple(STARTUP_PARTS)  # one after the other
ACTOR_PARTS = tuple(f"actor_{p}" for p in ACTOR_STARTUP_WORDS)  # inside "actors", the slowest actor's
ENGINE_TIMES = ("import_s", "engine_s", "warmup_s", "batch_s")


def run_once(config: str, runs_dir: Path, tree: Path = REPO) -> dict[str, float]:
    """One ``tokengym train CONFIG iterations=1`` of the sources in ``tree``; its startup/* row."""
    from cluster.tracking import read_metrics

    before = set(runs_dir.iterdir()) if runs_dir.exists() else set()
    cmd = [sys.executable, "-m", "cluster.cli", "train", config, "iterations=1", "checkpoint_every=1",
           "tracking.progress_bar=false", f"runs_dir={runs_dir}"]
    env = {k: v for k, v in os.environ.items() if k != "WANDB_API_KEY"}  # W&B as on a machine without a key: offline
    env |= {"PYTHONUNBUFFERED": "1", "PYTHONPATH": str(tree)}  # the driver and Ray's workers import tree's sources
    done = subprocess.run(cmd, cwd=tree, capture_output=True, text=True, timeout=900, env=env)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{done.stderr[-3000:]}")
    (run,) = [p for p in runs_dir.iterdir() if p not in before and p.is_dir()]
    row = read_metrics(run)[-1]
    return {k.removeprefix("startup/").removesuffix("_s"): v for k, v in row.items() if k.startswith("startup/")}


def runs_part(configs: list[str], rounds: int, baseline: str | None = None) -> tuple[list[str], list[str]]:
    """Report lines and table rows of the ``runs`` part; with ``baseline`` (a git revision), every config is also
    run from that revision's sources, alternating with this tree's."""
    with (revision_tree(baseline) if baseline else contextlib.nullcontext()) as base, \
            tempfile.TemporaryDirectory(prefix="tokengym-startup-") as tmp:
        trees = {"": REPO, **({f" @ {baseline}": base} if base is not None else {})}
        cases = [(config, label) for config in configs for label in trees]
        measured: dict[str, list[dict[str, float]]] = {config + label: [] for config, label in cases}
        for r in range(rounds):
            for config, label in cases if r % 2 == 0 else cases[::-1]:
                measured[config + label].append(run_once(config, Path(tmp) / "runs", trees[label]))
    lines, rows = [], []
    if baseline is not None:
        for config in configs:
            ratio = (statistics.median(run["total"] for run in measured[config])
                     / statistics.median(run["total"] for run in measured[f"{config} @ {baseline}"]))
            lines.append(f"  {config}: total, this tree / {baseline}: {ratio:.2f}x")
    for config, runs in measured.items():
        for run in runs:  # what no part covers (between the parts), per run: medians of parts need not add up
            run["other"] = run["total"] - sum(run.get(p, 0.0) for p in PARTS)
        # A part that a baseline's sources do not log (it came later) is 0 s there: its time is in another part.
        med = {k: statistics.median(run.get(k, 0.0) for run in runs) for k in (*PARTS, *ACTOR_PARTS, "total", "other")}
        total = med["total"]
        totals = ", ".join(f"{run['total']:.1f}" for run in runs)
        lines.append(f"  {config}: total {total:.1f} s (runs {totals})")
        lines.append("    " + ", ".join(f"{p} {med[p]:.2f} s ({med[p] / total:.0%})" for p in PARTS)
                     + f", other {med['other']:.2f} s (medians over the runs, each part's own)")
        lines.append("    inside the slowest rollout actor: " + ", ".join(
            f"{p.removeprefix('actor_')} {med[p]:.2f} s" for p in ACTOR_PARTS))
        rows.append(f"| {config} | {total:.1f} | " + " | ".join(f"{med[p]:.2f}" for p in PARTS) + " | "
                    + " | ".join(f"{med[p]:.2f}" for p in ACTOR_PARTS) + " |")
    head = ("| config | total s | " + " | ".join(PARTS) + " | " + " | ".join(
        f"{p.removeprefix('actor_')} (actor)" for p in ACTOR_PARTS) + " |")
    return lines, [head, "|" + "---|" * (2 + len(PARTS) + len(ACTOR_PARTS)), *rows]


def probe(variant: str, repeats: int) -> dict[str, float]:
    """In this (fresh) process: a rollout actor of the default config's tiny policy, built and timed."""
    import cluster.rollout as rollout
    from cluster.config import load_config
    from cluster.run import prepare_policy
    from cluster.trainer import engine_options
    from textenv import make_env

    if variant == "compile":  # vLLM's own behaviour
        rollout.skip_sampler_compile = lambda on_cpu: None
    cfg = load_config(REPO / "configs" / "default.yaml")
    with tempfile.TemporaryDirectory(prefix="tokengym-startup-") as tmp:
        model_dir = prepare_policy(cfg, Path(tmp))
        env = make_env(cfg.env).unwrapped
        actor = rollout.VLLMRolloutActor(
            0, cfg.env, engine_options(cfg, model_dir, env.max_prompt_tokens, env.max_response_tokens))
        info = actor.ready()
        batches = []
        for k in range(repeats):
            start = time.perf_counter()
            actor.sample(64, 8, seed=k + 1, expected_version=0)
            batches.append(time.perf_counter() - start)
    return {"import_s": info["import_s"], "engine_s": info["engine_s"], "warmup_s": info["warmup_s"],
            "batch_s": statistics.median(batches)}


def engine_part(rounds: int, repeats: int) -> tuple[list[str], list[str]]:
    """Report lines and table rows of the ``engine`` part: each variant in a fresh process, in turn."""
    measured: dict[str, list[dict[str, float]]] = {"eager": [], "compile": []}
    env = {**os.environ, "PYTHONPATH": str(REPO), "VLLM_LOGGING_LEVEL": "ERROR", "OMP_NUM_THREADS": "1"}
    for r in range(rounds):
        for variant in ("eager", "compile") if r % 2 == 0 else ("compile", "eager"):
            done = subprocess.run([sys.executable, __file__, "--probe", variant, "--repeats", str(repeats)], cwd=REPO,
                                  capture_output=True, text=True, timeout=900, env=env)
            if done.returncode != 0:
                raise SystemExit(f"probe {variant} failed:\n{done.stderr[-3000:]}")
            measured[variant].append(json.loads(done.stdout.strip().splitlines()[-1]))
    med = {v: {k: statistics.median(m[k] for m in runs) for k in ENGINE_TIMES} for v, runs in measured.items()}
    lines = []
    for variant in ("eager", "compile"):
        lines.append(f"  {variant:8} " + ", ".join(f"{k.removesuffix('_s')} {med[variant][k]:.3f} s" for k in ENGINE_TIMES))
    lines.append("  eager / compile: " + ", ".join(
        f"{k.removesuffix('_s')} {med['eager'][k] / med['compile'][k]:.2f}x" for k in ENGINE_TIMES))
    saved = sum(med["compile"][k] - med["eager"][k] for k in ("engine_s", "warmup_s"))
    lines.append(f"  start-up saved per engine (build + warm-up): {saved:.2f} s")
    rows = ["| engine | vLLM import s | engine build s | warm-up s | 64x8 batch s |", "|---|---|---|---|---|"]
    rows += [f"| {v} | " + " | ".join(f"{med[v][k]:.3f}" for k in ENGINE_TIMES) + " |" for v in ("eager", "compile")]
    rows.append("| eager / compile | " + " | ".join(f"{med['eager'][k] / med['compile'][k]:.2f}x"
                                                    for k in ENGINE_TIMES) + " |")
    return lines, rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--parts", nargs="+", default=["runs", "engine"], choices=["runs", "engine"])
    parser.add_argument("--configs", nargs="+", default=["configs/default.yaml", "configs/grpo.yaml"])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--baseline", metavar="REV", help="runs part: also run a git revision's sources, in turn")
    parser.add_argument("--repeats", type=int, default=5, help="engine part: steady-state batches per engine")
    parser.add_argument("--record", action="store_true", help="append the result to bench/RESULTS.md")
    parser.add_argument("--probe", choices=["eager", "compile"], help=argparse.SUPPRESS)  # one engine, in a child
    args = parser.parse_args()
    if args.probe:
        print(json.dumps(probe(args.probe, args.repeats)))
        return
    load, started = os.getloadavg(), time.time()
    report, tables = [], []
    if "runs" in args.parts:
        lines, table = runs_part(args.configs, args.rounds, args.baseline)
        against = f"; this tree and {args.baseline}'s sources in turn" if args.baseline else ""
        report += [f"runs: `tokengym train CONFIG iterations=1` (W&B offline), median of {args.rounds} round(s); seconds from the "
                   f"process's start (startup/*, docs/metrics.md){against}", *lines]
        tables.append("\n".join(table))
    if "engine" in args.parts:
        lines, table = engine_part(args.rounds, args.repeats)
        report += [f"engine: a rollout actor of the default tiny policy in a fresh process (1 thread), median of "
                   f"{args.rounds} round(s); batch: 64 prompts x 8 samples, median of {args.repeats}", *lines]
        tables.append("\n".join(table))
    report.append(f"{os.cpu_count()} cores; {(time.time() - started) / 60:.1f} min in all")
    text = "\n".join(report)
    print(text)
    print()
    print("\n\n".join(tables))
    if args.record:
        record("startup.py", load, text, "\n\n".join(tables))


if __name__ == "__main__":
    main()
