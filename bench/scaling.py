"""Scaling: time per iteration and throughput with 1-3 rollout actors and 1 or 2 learners (issue 11, item 3).

Also prints the measured inputs of a projection to a multi-node GPU cluster (bench/RESULTS.md draws it).

A layout ``AxL`` is A rollout actors (``rollout.num_actors``) and L learners: L = 1 is the learner in the driver's
process (``cluster.num_learners=0``, the default config's), L >= 2 is L DDP learner actors (``cluster.num_learners=L``,
gloo on CPU). Each layout is a real ``cluster.trainer.Trainer`` of the config (default: configs/default.yaml, the
tiny Llama on reverse-5-letters PPO, 256 prompts per iteration), built as ``tokengym train`` builds it, in one local
Ray sized for the largest layout. It runs ``--warmup`` iterations that are not counted and ``--iterations`` timed
ones, from the same initial weights and seeds, and is shut down. Starting a layout takes 25-55 s, so the layouts
cannot alternate iteration by iteration; instead every round runs each layout once, in an order that rotates from
round to round (the shared machine's noise hits each alike), and a layout's number is the median over rounds of its
per-round median. Ratios are against the first layout (``1x1``), with the range of the per-round paired ratios.

Equal work: every layout samples the same prompts with the same seeds and trains on batches of the same size with
the same global minibatch: ``algorithm.minibatch_size`` is per learner, so L learners get minibatch / L each (the same
optimizer steps as one learner; strong scaling). Each component gets one core: a rollout actor and a learner actor
ask Ray for one CPU (Ray sets their ``OMP_NUM_THREADS=1``), and the driver's learner gets ``--driver-threads`` (1)
torch threads. The threads each process really uses are printed.

What is timed is what the trainer logs (docs/metrics.md): ``timing/rollout_s`` (all actors sample in parallel),
``timing/logprobs_s`` and ``timing/update_s`` (the learners), ``timing/weight_sync_s`` (learner 0's weights into
every engine by ``rollout.weight_transport``, the object store by default: buckets in the engines' dtype, put by
learner 0's process, which is the driver's when L = 1), the rest of ``timing/iteration_s`` (advantages and
building the batch, on the driver), ``throughput/rollout_tokens_per_s`` and ``throughput/update_tokens_per_s``.

The projection inputs printed at the end: each phase's share of the 1x1 iteration; the parallel efficiency of the
rollout (A actors' tokens/s over A x one actor's) and of the update (L learners' over L x one learner's); the weight
sync's growth per engine; and the serial share (weight sync + rest: the synchronous loop runs them on the driver,
with nothing else in flight, whatever the number of engines and learners), whose inverse bounds the speedup any
number of engines and learners can give this loop (Amdahl). bench/RESULTS.md turns them into the projection and
states its assumptions.

    RAY_memory_monitor_refresh_ms=0 nice -n 19 .venv/bin/python bench/scaling.py [--layouts 1x1 2x1 3x1 1x2 2x2 3x2]
        [--rounds 2] [--max-minutes M] [--warmup 1] [--iterations 3] [--config configs/default.yaml]
        [--set key=value ...] [--record]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run as a script from anywhere: bench/ is not a package

from bench.rollout import record  # noqa: E402
from cluster.config import ExperimentConfig, load_config  # noqa: E402
from cluster.run import init_ray, prepare_policy  # noqa: E402
from textenv import EpochOrder, HFTokenizerAdapter, make_env  # noqa: E402

PHASES = ("rollout", "logprobs", "update", "weight_sync")
COLUMNS = (  # (column, per-iteration value from the trainer's metrics)
    ("iteration", lambda m: m["timing/iteration_s"]),
    *((phase, lambda m, p=phase: m[f"timing/{p}_s"]) for phase in PHASES),
    ("rest", lambda m: m["timing/iteration_s"] - sum(m[f"timing/{p}_s"] for p in PHASES)),
    ("rollout tok/s", lambda m: m["throughput/rollout_tokens_per_s"]),
    ("update tok/s", lambda m: m["throughput/update_tokens_per_s"]),
)


@dataclass(frozen=True)
class Layout:
    """A rollout actors and L learners (L = 1: the driver's own learner; L >= 2: DDP learner actors)."""

    actors: int
    learners: int

    @classmethod
    def parse(cls, text: str) -> Layout:
        try:
            actors, learners = (int(x) for x in text.split("x"))
        except ValueError:
            raise SystemExit(f"--layouts: {text!r} is not ACTORSxLEARNERS, e.g. 2x1") from None
        if actors < 1 or learners < 1:
            raise SystemExit(f"--layouts: {text!r} needs at least 1 actor and 1 learner")
        return cls(actors, learners)

    def __str__(self) -> str:
        return f"{self.actors}x{self.learners}"

    @property
    def name(self) -> str:
        where = " (driver)" if self.learners == 1 else "s (DDP)"
        return f"{self.actors} actor{'s' * (self.actors > 1)}, {self.learners} learner{where}"

    def overrides(self, minibatch: int) -> list[str]:
        """The config keys of this layout; the global minibatch ``minibatch`` is split over the learners."""
        if minibatch % self.learners:
            raise SystemExit(f"algorithm.minibatch_size {minibatch} does not split over {self.learners} "
                             f"learners; --set algorithm.minibatch_size=<a multiple of {self.learners}>")
        num_learners = 0 if self.learners == 1 else self.learners
        return [f"rollout.num_actors={self.actors}", f"cluster.num_learners={num_learners}",
                f"algorithm.minibatch_size={minibatch // self.learners}"]


def threads_in_use(trainer: Any) -> dict[str, list[int]]:
    """torch's thread count in every engine's and every learner's process."""
    import ray
    import torch

    engines = ray.get([a.__ray_call__.remote(lambda actor: torch.get_num_threads()) for a in trainer.rollouts.actors])
    learners = [r.get() for r in trainer.learners.foreach_learner(lambda learner: torch.get_num_threads())]
    return {"engines": engines, "learners": learners}


def run_layout(cfg: ExperimentConfig, layout: Layout, model_dir: Path, env: Any, warmup: int, iterations: int
               ) -> dict[str, Any]:
    """Start the layout's trainer, run ``warmup`` + ``iterations`` iterations, shut it down; the timed iterations'
    metrics, the start-up time and the threads in use."""
    from cluster.trainer import Trainer

    start = time.perf_counter()
    trainer = Trainer(cfg, model_dir, env.max_prompt_tokens, env.max_response_tokens,
                      data=EpochOrder.for_task(env.task, cfg.seed), name=f"bench-scaling-{layout}")
    try:
        trainer.sync_weights()  # version 1, as a run starts
        start_s = time.perf_counter() - start
        threads = threads_in_use(trainer)
        rows = [trainer.run_iteration(i)[0] for i in range(1, warmup + iterations + 1)]
    finally:
        trainer.shutdown()
    return {"rows": rows[warmup:], "start_s": start_s, "threads": threads}


def summarize(runs: list[dict[str, Any]]) -> dict[str, float]:
    """Every column's median over rounds of its per-round median."""
    return {col: statistics.median(statistics.median(value(m) for m in run["rows"]) for run in runs)
            for col, value in COLUMNS}


def paired(runs: list[dict[str, Any]], base: list[dict[str, Any]], col: str, faster: bool) -> list[float]:
    """Per-round ratios of a column against the base layout's same round (time: base / layout; rate: layout / base)."""
    value = dict(COLUMNS)[col]
    out = []
    for run, ref in zip(runs, base):
        a, b = (statistics.median(value(m) for m in r["rows"]) for r in (run, ref))
        out.append(b / a if faster else a / b)
    return out


def report(layouts: list[Layout], results: dict[Layout, list[dict[str, Any]]], med: dict[Layout, dict[str, float]]
           ) -> list[str]:
    """The per-layout table, the ratios against the first layout and the projection inputs, as printed lines."""
    base = layouts[0]
    lines = [f"  {'layout':28s} {'s/iter':>7s} {'rollout':>8s} {'logprobs':>8s} {'update':>7s} {'w_sync':>7s} "
             f"{'rest':>6s} {'rollout tok/s':>13s} {'update tok/s':>12s}   vs {base}: iteration, rollout, update"]
    for layout in layouts:
        m = med[layout]
        cells = []
        for col, faster in (("iteration", True), ("rollout tok/s", False), ("update tok/s", False)):
            ratio = med[base][col] / m[col] if faster else m[col] / med[base][col]
            rounds = paired(results[layout], results[base], col, faster)
            cells.append(f"{ratio:.2f}x ({min(rounds):.2f}-{max(rounds):.2f})")
        lines.append(f"  {layout.name:28s} {m['iteration']:7.3f} {m['rollout']:8.3f} {m['logprobs']:8.3f} "
                     f"{m['update']:7.3f} {m['weight_sync']:7.3f} {m['rest']:6.3f} {m['rollout tok/s']:13,.0f} "
                     f"{m['update tok/s']:12,.0f}   {', '.join(cells)}")
    lines += projection_inputs(layouts, med)
    return lines


def projection_inputs(layouts: list[Layout], med: dict[Layout, dict[str, float]]) -> list[str]:
    """What the projection in bench/RESULTS.md is derived from."""
    base = med[layouts[0]]
    total = base["iteration"]
    shares = ", ".join(f"{col} {base[col] / total:.0%}" for col in (*PHASES, "rest"))
    serial = (base["weight_sync"] + base["rest"]) / total
    lines = ["projection inputs:", f"  shares of the {layouts[0]} iteration ({total:.3f} s): {shares}",
             f"  serial share (weight_sync + rest) {serial:.1%}: no number of engines and learners makes this "
             f"synchronous loop more than {1 / serial:.1f}x faster (Amdahl)"]
    overlapped = max(base["rollout"], total - base["rollout"])
    lines.append(f"  rollouts overlapped with the rest of the iteration (an async loop, one step stale): "
                 f"max(rollout, the rest) = {overlapped:.3f} s, {total / overlapped:.2f}x at the most")
    for layout in layouts[1:]:
        m = med[layout]
        if layout.learners == 1:
            eff = m["rollout tok/s"] / base["rollout tok/s"] / layout.actors
            lines.append(f"  rollout efficiency, {layout.actors} actors: {eff:.0%} of {layout.actors}x one actor's "
                         "tokens/s")
        if layout.actors == 1:
            eff = m["update tok/s"] / base["update tok/s"] / layout.learners
            lines.append(f"  update efficiency, {layout.learners} learners: {eff:.0%} of {layout.learners}x one "
                         "learner's tokens/s")
    syncs = sorted((layout.actors, med[layout]["weight_sync"]) for layout in layouts if layout.learners == 1)
    if len(syncs) > 1:
        (a0, s0), (a1, s1) = syncs[0], syncs[-1]
        lines.append(f"  weight sync: {s0:.3f} s with {a0} engine(s), {s1:.3f} s with {a1}: "
                     f"{(s1 - s0) / (a1 - a0) * 1000:+.0f} ms per engine added")
    return lines


def summary_table(layouts: list[Layout], med: dict[Layout, dict[str, float]]) -> str:
    """The markdown table of every layout's medians and ratios (for RESULTS.md and the README)."""
    base = med[layouts[0]]
    head = ["actors x learners", "s/iteration", "rollout s", "logprobs s", "update s", "weight_sync s",
            "rollout tokens/s", "update tokens/s", "iteration speedup", "rollout x", "update x"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for layout in layouts:
        m = med[layout]
        cells = [layout.name, *(f"{m[c]:.3f}" for c in ("iteration", *PHASES)), f"{m['rollout tok/s']:,.0f}",
                 f"{m['update tok/s']:,.0f}", f"{base['iteration'] / m['iteration']:.2f}x",
                 *(f"{m[c] / base[c]:.2f}x" for c in ("rollout tok/s", "update tok/s"))]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layouts", nargs="+", default=["1x1", "2x1", "3x1", "1x2", "2x2", "3x2"],
                        help="ACTORSxLEARNERS; the first is the base of the ratios (must be 1x1)")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--max-minutes", type=float, default=None,
                        help="start another round only if one more round as long as the last still ends within this")
    parser.add_argument("--warmup", type=int, default=1, help="iterations per layout and round, not counted")
    parser.add_argument("--iterations", type=int, default=3, help="timed iterations per layout and round")
    parser.add_argument("--config", default=None, help="the experiment (default: configs/default.yaml)")
    parser.add_argument("--set", dest="overrides", nargs="*", default=[], help="section.key=value overrides")
    parser.add_argument("--driver-threads", type=int, default=1,
                        help="torch threads of the driver's learner (layouts with 1 learner); a learner actor has 1")
    parser.add_argument("--record", action="store_true", help="append the result to bench/RESULTS.md")
    args = parser.parse_args()
    layouts = [Layout.parse(text) for text in args.layouts]
    if str(layouts[0]) != "1x1" or len(set(layouts)) != len(layouts):
        raise SystemExit("--layouts must start with 1x1 (the base of the ratios) and name each layout once")
    if args.rounds < 1 or args.iterations < 1 or args.warmup < 0:
        raise SystemExit("--rounds and --iterations must be >= 1, --warmup >= 0")
    import torch

    torch.set_num_threads(args.driver_threads)
    base = load_config(args.config, args.overrides)
    configs = {layout: load_config(args.config, [*args.overrides, *layout.overrides(base.algorithm.minibatch_size)])
               for layout in layouts}
    load_before = os.getloadavg()
    began = time.perf_counter()
    results: dict[Layout, list[dict[str, Any]]] = {layout: [] for layout in layouts}
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = prepare_policy(base, Path(tmp))  # the run's tiny policy (or policy.model_path)
        from policies.models import load_tokenizer

        env = make_env(base.env, tokenizer=HFTokenizerAdapter(load_tokenizer(model_dir))).unwrapped
        # One local Ray for every layout, sized as `tokengym train` sizes it for the largest.
        init_ray(max(configs.values(), key=lambda c: c.rollout.num_actors * c.rollout.num_cpus_per_actor
                     + c.cluster.num_learners))
        import ray

        try:
            for r in range(args.rounds):
                round_began = time.perf_counter()
                for layout in layouts[r % len(layouts):] + layouts[: r % len(layouts)]:
                    run = run_layout(configs[layout], layout, model_dir, env, args.warmup, args.iterations)
                    results[layout].append(run)
                    its = [m["timing/iteration_s"] for m in run["rows"]]
                    print(f"round {r + 1}: {layout.name:28s} started in {run['start_s']:5.1f} s, "
                          f"{statistics.median(its):.3f} s/iteration, threads {run['threads']}", flush=True)
                now = time.perf_counter()
                if args.max_minutes is not None and now - began + (now - round_began) > args.max_minutes * 60:
                    break  # another round would not end in time
        finally:
            ray.shutdown()
    wall = time.perf_counter() - began
    med = {layout: summarize(results[layout]) for layout in layouts}
    rounds = len(results[layouts[0]])
    header = (f"{args.config or 'configs/default.yaml'}: {base.rollout.prompts_per_iteration} prompts x "
              f"{base.rollout.samples_per_prompt} samples per iteration, global minibatch "
              f"{base.algorithm.minibatch_size}, "
              f"{base.algorithm.num_epochs} epochs; one core per engine and learner (driver learner: "
              f"{args.driver_threads} thread(s)); {os.cpu_count()} cores; median over {rounds} round(s) of "
              f"{args.iterations} timed iteration(s) after {args.warmup} warm-up; {wall / 60:.1f} min in all")
    lines = [header, *report(layouts, results, med)]
    table = summary_table(layouts, med)
    print("\n".join(lines), flush=True)
    print(table)
    if args.record:
        record("scaling.py", load_before, "\n".join(lines), table)


if __name__ == "__main__":
    main()
