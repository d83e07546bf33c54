"""tokengym (PPO and GRPO) against TRL's GRPOTrainer, end to end: wall-clock seconds to mean reward 0.5 and 0.8 on
the default task, and completions per second (issue 11, item 2).

The task: reverse 5 letters over a-h (``cafhb=`` -> ``bhfac``), reward = fraction of positions right, as
configs/default.yaml trains it. The model: the tiny random-init Llama and character tokenizer that tokengym's default
run builds (``cluster.run.prepare_policy`` of the config with the round's seed), saved once per seed; every system
loads the same directory. The systems:

- ``tokengym-ppo``: ``tokengym train configs/default.yaml`` (256 prompts x 1 sample per iteration, PPO + GAE).
- ``tokengym-grpo``: ``tokengym train configs/grpo.yaml`` (64 prompts x 8 samples, 4 epochs of minibatch 64).
- ``trl-grpo``: TRL's ``GRPOTrainer`` (bench/trl_grpo.py, in its own environment bench/.venv-trl: the pinned TRL
  and the CPU build of torch, no vLLM, so it generates with Hugging Face ``generate``) with grpo.yaml's shape: 64
  prompts x ``num_generations`` 8 = 512 completions per generation, minibatch 64 (8 steps per generation) over
  ``num_iterations`` 4 (32 optimizer steps per generation, as grpo.yaml), ``max_completion_length`` 5 (the task's
  response length, tokengym's limit), temperature 1, float32, constant learning rate 3e-4 and entropy bonus 0.01
  (both tokengym's); the rest is TRL's defaults (loss ``dapo``, rewards scaled by the group's std, beta 0: no
  reference model, clip 0.2).
- ``trl-grpo-lr1e-6``: the same with TRL's default GRPO learning rate (1e-6).
``--trl-set key=value`` changes the TRL systems' GRPOConfig (values parsed as JSON where they parse).

Each system is one process launched from here (tokengym's 2 rollout actors + its learner; TRL's one process), one
system at a time, each free to use the whole machine. A round runs every system once with the round's seed, in an
order that rotates from round to round (the shared machine's noise hits each alike). A system runs until its smoothed
mean reward reaches the last bar (``--bars``, default 0.5 0.8), or ``--budget-s`` seconds after its launch, or
``--steps`` steps; then it is stopped. A step is one tokengym iteration or one TRL generation (its completions and
every optimizer step on them); each writes a row when the step's update is done (tokengym's metrics.jsonl; TRL: a
callback after the generation's last optimizer step), holding the mean reward of that step's completions. Each row
is timed by this script when it appears (polled every 0.25 s), from the system's launch: so times to a bar include
start-up (Ray, the vLLM engines, loading TRL), as a user waits them; "train s" excludes it (the system's own sum of
step times). Smoothing, the same for every system: the completion-weighted mean reward of the latest steps that hold
at least ``--window`` completions (default 1,024: 4 PPO iterations, 2 GRPO iterations or TRL generations); it is
undefined until that many completions exist. A system that does not reach a bar is reported with its plateau (the
maximum of its smoothed curve).

Reported per system: median over rounds of the seconds (from launch) and steps to each bar, completions/s (all
completions over the system's summed step time), start-up seconds, plateau; and for each bar the ratio of tokengym's
time to it over TRL's (the faster TRL variant of the round), per round and its median. Where only one side reached
the bar, the ratio is bounded by the budget: "< x" or "> x".

    RAY_memory_monitor_refresh_ms=0 nice -n 19 .venv/bin/python bench/vs_trl.py [--systems ...] [--seeds 0 1 2]
        [--budget-s 600] [--steps N] [--bars 0.5 0.8] [--window 1024] [--trl-set key=value ...] [--record]

The first run creates bench/.venv-trl (a few minutes; reused while the pins below stay the same).
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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run as a script from anywhere: bench/ is not a package

from cluster.config import ExperimentConfig, load_config  # noqa: E402
from cluster.run import prepare_policy  # noqa: E402
from textenv import make_env  # noqa: E402

TRL_VENV = REPO / "bench" / ".venv-trl"
TORCH_PIN = "torch==2.13.0+cpu"  # first, from the local CPU wheel: no resolver step may reach for a CUDA torch
# The newest TRL, and what pip resolved for it next to the CPU torch (2026-11-30), pinned exactly.
TRL_PINS = ("trl==1.16.0", "transformers==5.24.0", "accelerate==1.15.0", "datasets==5.2.0")
CUDA_LEFTOVERS = ("torchvision", "torchaudio", "torchcodec", "triton")
POLL_S = 0.25


@dataclass(frozen=True)
class System:
    """One system under test: a tokengym config, or TRL's GRPOTrainer with GRPOConfig ``trl`` (plus ``--trl-set``)."""

    name: str
    config: str | None = None
    trl: dict[str, Any] = field(default_factory=dict)


SYSTEMS = {s.name: s for s in (
    System("tokengym-ppo", config="configs/default.yaml"),
    System("tokengym-grpo", config="configs/grpo.yaml"),
    System("trl-grpo"),  # tokengym's learning rate (trl_config)
    System("trl-grpo-lr1e-6", trl={"learning_rate": 1e-6}),
)}


def trl_python() -> Path:
    """bench/.venv-trl's interpreter, creating or updating the environment first when its pins changed."""
    python, stamp = TRL_VENV / "bin" / "python", TRL_VENV / ".pins"
    want = " ".join((TORCH_PIN, *TRL_PINS))
    if python.exists() and stamp.exists() and stamp.read_text() == want:
        return python
    print(f"vs_trl: installing {want} into {TRL_VENV} (a few minutes, once)", file=sys.stderr, flush=True)
    base = getattr(sys, "_base_executable", sys.executable)
    subprocess.run([base, "-m", "venv", "--clear", str(TRL_VENV)], check=True)
    pip_install(python, TORCH_PIN)
    pip_install(python, *TRL_PINS)
    # A resolver may bring PyPI's CUDA builds of these; they break transformers on a CPU torch.
    subprocess.run([str(python), "-m", "pip", "uninstall", "-y", "-q", *CUDA_LEFTOVERS], check=False,
                   stderr=subprocess.DEVNULL)
    version = subprocess.run([str(python), "-c", "import torch; print(torch.__version__)"], check=True,
                             capture_output=True, text=True).stdout.strip()
    if not version.endswith("+cpu"):
        raise SystemExit(f"vs_trl: {TRL_VENV} got a non-CPU torch {version}; delete it and check pip's find-links")
    stamp.write_text(want)
    return python


def pip_install(python: Path, *requirements: str) -> None:
    """``pip install -q``, without this machine's warnings about index folders it skips."""
    result = subprocess.run([str(python), "-m", "pip", "install", "-q", *requirements], stderr=subprocess.PIPE,
                            text=True)
    sys.stderr.write("".join(line for line in result.stderr.splitlines(keepends=True)
                             if not line.startswith("WARNING: Location")))
    if result.returncode != 0:
        raise SystemExit(f"vs_trl: pip install {' '.join(requirements)} failed (exit {result.returncode})")


def trl_config(system: System, base: ExperimentConfig, grpo: ExperimentConfig, seed: int, out: Path,
               response_tokens: int, extra: dict[str, Any]) -> dict[str, Any]:
    """The GRPOConfig keyword arguments of a TRL system: grpo.yaml's batch shape, tokengym's limits."""
    a, r = grpo.algorithm, grpo.rollout
    completions = r.prompts_per_iteration * r.samples_per_prompt
    return {
        "output_dir": str(out), "seed": seed, "use_cpu": True, "bf16": False, "report_to": "none",
        "save_strategy": "no", "disable_tqdm": True, "logging_steps": 10**6, "num_train_epochs": 10**4,
        "num_generations": r.samples_per_prompt, "per_device_train_batch_size": a.minibatch_size,
        "steps_per_generation": completions // a.minibatch_size, "num_iterations": a.num_epochs,
        "max_completion_length": response_tokens, "temperature": r.temperature, "epsilon": a.clip_ratio,
        "max_grad_norm": a.grad_clip, "entropy_coef": a.entropy_coef, "lr_scheduler_type": "constant",
        "learning_rate": base.algorithm.lr, **system.trl, **extra,
    }


def launch(system: System, seed: int, model_dir: Path, job_dir: Path, problems: list[tuple[str, str]],
           checks: list[dict[str, Any]], args: argparse.Namespace, trl_extra: dict[str, Any]
           ) -> tuple[list[str], str, int]:
    """The command of one run, the glob (under ``job_dir``) of the file its rows appear in, and the completions per
    step."""
    if system.config is not None:
        cfg = load_config(system.config, [f"seed={seed}"])
        iterations = args.steps or 10**6
        cmd = [sys.executable, "-m", "cluster.cli", "train", system.config, f"seed={seed}", f"name={system.name}",
               f"runs_dir={job_dir}", f"policy.model_path={model_dir}", f"iterations={iterations}",
               f"checkpoint_every={iterations}", "tracking.wandb=false", "tracking.progress_bar=false"]
        return cmd, "*/metrics.jsonl", cfg.rollout.prompts_per_iteration * cfg.rollout.samples_per_prompt
    base, grpo = load_config("configs/default.yaml"), load_config("configs/grpo.yaml")
    response_tokens = make_env(base.env).unwrapped.max_response_tokens
    conf = trl_config(system, base, grpo, seed, job_dir / "out", response_tokens, trl_extra)
    if args.steps:
        conf["max_steps"] = args.steps * conf["steps_per_generation"] * conf["num_iterations"]
    job = {"seed": seed, "model_dir": str(model_dir), "problems": problems, "reward_checks": checks,
           "grpo_config": conf}
    (job_dir / "job.json").write_text(json.dumps(job))
    cmd = [str(trl_python()), str(REPO / "bench" / "trl_grpo.py"), str(job_dir / "job.json"),
           str(job_dir / "progress.jsonl")]
    return cmd, "progress.jsonl", conf["per_device_train_batch_size"] * conf["steps_per_generation"]


def smoothed(rows: list[dict[str, float]], window: int) -> float | None:
    """Completion-weighted mean reward of the latest rows holding at least ``window`` completions (None: too few)."""
    n = total = 0.0
    for row in reversed(rows):
        n += row["completions"]
        total += row["completions"] * row["reward"]
        if n >= window:
            return total / n
    return None


def run_system(system: System, seed: int, model_dir: Path, work: Path, problems: list[tuple[str, str]],
               checks: list[dict[str, Any]], args: argparse.Namespace, trl_extra: dict[str, Any]) -> dict[str, Any]:
    """Launch one run, follow its rows, stop it at the last bar, the budget or ``--steps``; its rows and outcome."""
    job_dir = work / f"{system.name}-s{seed}"
    job_dir.mkdir()
    cmd, rows_glob, per_step = launch(system, seed, model_dir, job_dir, problems, checks, args, trl_extra)
    env = {**os.environ, "PYTHONPATH": str(REPO), "WANDB_MODE": "disabled", "TOKENIZERS_PARALLELISM": "false"}
    log = (job_dir / "output.log").open("w")
    began = time.perf_counter()
    # A session of its own, so that stopping the run stops everything it started (Ray's processes too).
    # SIGINT's default action in the system, so that stop()'s Ctrl-C works even when this script was started in the
    # background by a shell without job control (its children then inherit SIGINT ignored).
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    rows: list[dict[str, float]] = []
    consumed, stopped = 0, None
    try:
        while stopped is None:
            time.sleep(POLL_S)
            now, exited = time.perf_counter() - began, proc.poll() is not None  # before reading: no row is missed
            found = sorted(job_dir.glob(rows_glob))  # tokengym names its run directory itself
            lines = found[0].read_text().splitlines() if found else []
            for line in lines[consumed:]:
                if not line.endswith("}"):
                    break  # a row being written
                rows.append(parse_row(json.loads(line), per_step, now))
                consumed += 1
            value = smoothed(rows, args.window)
            if value is not None and value >= args.bars[-1]:
                stopped = "bar"
            elif args.steps and len(rows) >= args.steps:
                stopped = "steps"
            elif now > args.budget_s:
                stopped = "budget"
            elif exited:
                stopped = f"exited {proc.returncode}"
    finally:
        stop(proc)
        log.close()
    if stopped.startswith("exited"):
        tail = (job_dir / "output.log").read_text()[-3000:]
        raise SystemExit(f"vs_trl: {system.name} seed {seed} {stopped} after {len(rows)} steps:\n{tail}")
    return {"rows": rows, "stopped": stopped}


def parse_row(row: dict[str, Any], per_step: int, now: float) -> dict[str, float]:
    """A tokengym metrics row or a TRL progress row as (completions, reward, step seconds, arrival time)."""
    if "reward/mean" in row:
        return {"completions": per_step, "reward": row["reward/mean"], "step_s": row["timing/iteration_s"], "t": now}
    return {"completions": row["completions"], "reward": row["reward_mean"], "step_s": row["step_s"], "t": now}


def stop(proc: subprocess.Popen) -> None:
    """Ctrl-C to the run (tokengym shuts Ray down on it), then, after 60 s or once it exited, SIGKILL to whatever
    is left in its session."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


def outcome(run: dict[str, Any], bars: list[float], window: int) -> dict[str, Any]:
    """Per bar: (seconds from launch, train seconds, steps) at the first step whose smoothed reward reached it, or
    None; completions/s, start-up seconds and the plateau."""
    rows = run["rows"]
    curve = [smoothed(rows[: i + 1], window) for i in range(len(rows))]
    train = [sum(r["step_s"] for r in rows[: i + 1]) for i in range(len(rows))]
    reached = {}
    for bar in bars:
        i = next((i for i, v in enumerate(curve) if v is not None and v >= bar), None)
        reached[bar] = None if i is None else (rows[i]["t"], train[i], i + 1)
    known = [v for v in curve if v is not None]
    return {"reached": reached, "steps": len(rows), "completions": sum(r["completions"] for r in rows),
            "per_s": sum(r["completions"] for r in rows) / train[-1] if rows else 0.0,
            "startup_s": rows[0]["t"] - rows[0]["step_s"] if rows else None,
            "plateau": max(known) if known else None, "last": known[-1] if known else None, "stopped": run["stopped"]}


def median_or_never(values: list[float | None]) -> float | None:
    """The median (the lower middle value of an even count), counting a run that never got there as slower than
    every run that did (None: most never did)."""
    ordered = sorted(values, key=lambda v: float("inf") if v is None else v)
    return ordered[(len(ordered) - 1) // 2]


def fmt(value: float | None, spec: str = ".0f", never: str = "never") -> str:
    return never if value is None else format(value, spec)


def report(systems: list[System], outcomes: dict[str, list[dict[str, Any]]], bars: list[float],
           budget_s: float) -> tuple[list[str], str]:
    """The per-round lines, and the markdown table of the medians over rounds and the ratios."""
    lines = []
    for name in (s.name for s in systems):
        for k, o in enumerate(outcomes[name]):
            cells = ", ".join(f"{bar}: " + (f"{o['reached'][bar][0]:.0f} s ({o['reached'][bar][2]} steps)"
                                            if o["reached"][bar] else "never") for bar in bars)
            lines.append(f"  round {k + 1} {name:18s} {cells}; {o['completions']:,} completions in {o['steps']} "
                         f"steps, {o['per_s']:,.0f}/s; start-up {fmt(o['startup_s'], '.0f', '-')} s; smoothed "
                         f"max {fmt(o['plateau'], '.3f', '-')}, last {fmt(o['last'], '.3f', '-')}; stopped: "
                         f"{o['stopped']}")
    head = ["system", *(f"s to {bar} (steps)" for bar in bars), f"train s to {bars[-1]}", "completions/s",
            "start-up s", "smoothed max", *(f"time to {bar} / TRL's" for bar in bars)]
    table = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    trl_names = [s.name for s in systems if s.config is None]
    for system in systems:
        runs = outcomes[system.name]
        cells = [system.name]
        for bar in bars:
            t = median_or_never([o["reached"][bar] and o["reached"][bar][0] for o in runs])
            steps = median_or_never([o["reached"][bar] and o["reached"][bar][2] for o in runs])
            cells.append(f"{fmt(t)} ({fmt(steps, '.0f', '-')})" if t is not None else "never")
        cells.append(fmt(median_or_never([o["reached"][bars[-1]] and o["reached"][bars[-1]][1] for o in runs])))
        cells.append(f"{statistics.median(o['per_s'] for o in runs):,.0f}")
        cells.append(fmt(statistics.median(o["startup_s"] for o in runs if o["startup_s"] is not None)
                         if any(o["startup_s"] is not None for o in runs) else None, ".0f", "-"))
        cells.append(fmt(median_or_never([o["plateau"] for o in runs]), ".3f", "-"))
        cells += [ratio_cell(system, runs, outcomes, trl_names, bar, budget_s) for bar in bars]
        table.append("| " + " | ".join(cells) + " |")
    return lines, "\n".join(table)


def ratio_cell(system: System, runs: list[dict[str, Any]], outcomes: dict[str, list[dict[str, Any]]],
               trl_names: list[str], bar: float, budget_s: float) -> str:
    """tokengym's time to ``bar`` (from launch) over the round's fastest TRL variant's: the median and the per-round
    values."""
    if system.config is None or not trl_names:
        return "-"
    per_round: list[tuple[float | None, str]] = []  # (ratio, as printed); None: a bound or never
    for k, run in enumerate(runs):
        ours = run["reached"][bar]
        theirs = [outcomes[n][k]["reached"][bar] for n in trl_names if k < len(outcomes[n])]
        best = min((t[0] for t in theirs if t is not None), default=None)
        if ours is None:
            per_round.append((None, "never" if best is None else f"> {budget_s / best:.2f}x"))
        elif best is None:
            per_round.append((None, f"< {ours[0] / budget_s:.2f}x"))
        else:
            per_round.append((ours[0] / best, f"{ours[0] / best:.2f}x"))
    if all(r is not None for r, _ in per_round):
        head = f"{statistics.median(r for r, _ in per_round):.2f}x"
    else:
        head = per_round[0][1] if len(per_round) == 1 else "see rounds"
    return head + (f" (rounds {', '.join(text for _, text in per_round)})" if len(per_round) > 1 else "")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--systems", nargs="+", default=list(SYSTEMS), choices=list(SYSTEMS))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0], help="one round per seed")
    parser.add_argument("--budget-s", type=float, default=600, help="seconds per system and round, from its launch")
    parser.add_argument("--steps", type=int, default=None, help="stop each system after this many steps")
    parser.add_argument("--bars", type=float, nargs="+", default=[0.5, 0.8])
    parser.add_argument("--window", type=int, default=1024, help="completions in the smoothing window")
    parser.add_argument("--problems", type=int, default=20_000, help="prompts in TRL's dataset (drawn with the seed)")
    parser.add_argument("--trl-set", nargs="*", default=[], help="GRPOConfig key=value for the TRL systems")
    parser.add_argument("--record", action="store_true", help="append the result to bench/RESULTS.md")
    args = parser.parse_args()
    systems = [SYSTEMS[name] for name in args.systems]
    trl_extra = {}
    for item in args.trl_set:
        key, _, value = item.partition("=")
        try:
            trl_extra[key] = json.loads(value)
        except json.JSONDecodeError:
            trl_extra[key] = value
    if any(s.config is None for s in systems):
        trl_python()  # before any timing: creating the environment is not the benchmark
    import numpy as np

    task = make_env(load_config("configs/default.yaml").env).unwrapped.task
    load_before = os.getloadavg()
    began = time.perf_counter()
    outcomes: dict[str, list[dict[str, Any]]] = {s.name: [] for s in systems}
    with tempfile.TemporaryDirectory(prefix="vs_trl-") as tmp:
        for r, seed in enumerate(args.seeds):
            cfg = load_config("configs/default.yaml", [f"seed={seed}"])
            model_dir = prepare_policy(cfg, Path(tmp) / f"seed{seed}")  # the default run's tiny policy
            rng = np.random.default_rng(seed)
            samples = [task.sample(rng) for _ in range(args.problems)]
            problems = [(s.prompt, s.answer) for s in samples]
            # Responses with 0-5 letters right, scored by textenv's verifier: TRL's reward must agree.
            checks = [{"answer": s.answer, "response": resp, "score": task.score(s, resp)}
                      for s in samples[:6] for resp in (s.answer, s.answer[:3], s.answer[::-1], "", "hhhhhhh")]
            for system in systems[r % len(systems):] + systems[: r % len(systems)]:
                run = run_system(system, seed, model_dir, Path(tmp), problems, checks, args, trl_extra)
                outcomes[system.name].append(outcome(run, args.bars, args.window))
                o = outcomes[system.name][-1]
                print(f"round {r + 1} (seed {seed}): {system.name:18s} {o['steps']} steps, {o['completions']:,} "
                      f"completions, smoothed max {fmt(o['plateau'], '.3f', '-')}, stopped: {o['stopped']}",
                      flush=True)
    wall = time.perf_counter() - began
    header = (f"reverse 5 letters over a-h; the default tiny Llama per seed; bars {args.bars}, smoothing window "
              f"{args.window} completions; budget {args.budget_s:.0f} s per system and round"
              + (f", at most {args.steps} steps" if args.steps else "")
              + (f"; TRL overrides {trl_extra}" if trl_extra else "")
              + f"; {os.cpu_count()} cores; {wall / 60:.1f} min in all")
    lines, table = report(systems, outcomes, args.bars, args.budget_s)
    print("\n".join([header, *lines]), flush=True)
    print(table)
    if args.record:
        from bench.rollout import record

        pins = (f"; TRL {TRL_PINS[0].split('==')[1]} (transformers {TRL_PINS[1].split('==')[1]}), "
                f"{TORCH_PIN.split('==')[1]}")
        record("vs_trl.py", load_before, "\n".join([header, *lines]), table, note=pins)


if __name__ == "__main__":
    main()
