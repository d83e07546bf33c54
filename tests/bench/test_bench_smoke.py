"""The benchmarks at their smallest settings, so none rots (the full runs are not part of the suite)."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def run_script(*args: str, timeout: float = 600) -> str:
    """Run ``python ARGS`` from the repository root; its stdout, after asserting it exited with 0."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "RAY_memory_monitor_refresh_ms": "0"}
    # A session of its own: on a timeout the Ray processes the script started (GCS, raylet, actors) go too.
    proc = subprocess.Popen([sys.executable, *args], cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 0, err[-3000:]
    return out


@pytest.mark.ray
@pytest.mark.vllm
def test_rollout_bench_prints_its_ratio_table() -> None:
    """bench/rollout.py on the tiny model, 4 prompts x 8 samples x 8 tokens, one round: every system generated
    exactly that many tokens (the script refuses otherwise) and the table compares them."""
    out = run_script("bench/rollout.py", "--models", "tiny", "--shapes", "4x8", "--rounds", "1")
    assert "4 prompts x 8 samples, 16 prompt + 8 new tokens (256 generated per batch)" in out
    for system in ("tokengym, 1 actor", "raw vLLM", "HF generate"):
        rate = re.search(rf"^  {re.escape(system)} +([\d,]+) tokens/s", out, re.M)
        assert rate and int(rate.group(1).replace(",", "")) > 0, out
    for other in ("raw vLLM", "HF generate"):
        assert re.search(rf"tokengym, 1 actor / {other}: \d+\.\d\dx", out), out
    assert re.search(r"^\| tiny \| 4x8 \| [\d,]+ \| [\d,]+ \| [\d,]+ \| \d+\.\d\dx \| \d+\.\d\dx \|$", out, re.M), out


@pytest.mark.ray
@pytest.mark.vllm
def test_scaling_bench_prints_its_layout_table() -> None:
    """bench/scaling.py with its smallest layout (1 rollout actor, the driver's learner), one timed iteration of the
    default config at 64 prompts: every phase was timed, each process used the one thread the table claims, and the
    table and the projection inputs are printed."""
    out = run_script("bench/scaling.py", "--layouts", "1x1", "--rounds", "1", "--warmup", "0", "--iterations", "1",
                     "--set", "rollout.prompts_per_iteration=64")
    assert "64 prompts x 1 samples per iteration, global minibatch 64, 4 epochs" in out, out
    assert "threads {'engines': [1], 'learners': [1]}" in out, out
    numbers = r" +".join([r"(\d+\.\d{3})"] * 6) + r" +([\d,]+) +([\d,]+) "
    row = re.search(r"^  1 actor, 1 learner \(driver\) +" + numbers, out, re.M)
    assert row, out
    rollout, logprobs, update, sync, rest = (float(row.group(k)) for k in range(2, 7))
    assert min(rollout, logprobs, update, sync) > 0 and rest >= 0, out
    assert int(row.group(7).replace(",", "")) > 0 and int(row.group(8).replace(",", "")) > 0, out
    assert re.search(r"serial share \(weight_sync \+ rest\) \d+\.\d%: .* more than \d+\.\dx faster", out), out
    table_row = r"^\| 1 actor, 1 learner \(driver\) \|( \d+\.\d{3} \|){5} [\d,]+ \| [\d,]+ \|( 1\.00x \|){3}$"
    assert re.search(table_row, out, re.M), out


@pytest.mark.ray
@pytest.mark.vllm
def test_async_bench_prints_its_staleness_table() -> None:
    """bench/async.py with k = 0 and 1 for 2 iterations of 64 prompts each: both runs finish, the asynchronous one
    reports its staleness, and the table compares them (the target is out of reach: 'never', not a crash)."""
    out = run_script("bench/async.py", "--staleness", "0", "1", "--max-iterations", "2",
                     "--set", "rollout.prompts_per_iteration=64")
    assert re.search(r"k=0: 2 iterations, reward 0.8 at never .* staleness 0\.00", out), out
    assert re.search(r"k=1: 2 iterations, .* staleness 0\.50", out), out  # iteration 1: 0 versions old, then 1
    assert re.search(r"^\| 1 \| never \| never \| never \| \d+\.\d{3} \| \d+% \| \d+% \| n/a \| n/a \|$", out, re.M), out


@pytest.mark.ray
@pytest.mark.vllm
def test_weight_sync_bench_prints_its_table() -> None:
    """bench/weight_sync.py on the ~1M model, one round: every transport brought both engines to each new version
    (the script checks), both moved the same bytes, and the table compares each with the copy bound; a rank-16 LoRA
    policy synced as adapters moves a small part of the merged model's bytes."""
    out = run_script("bench/weight_sync.py", "--models", "1m", "--rounds", "1")
    assert re.search(r"^model 1m \(1\.\dM params, bfloat16: \d\.\d MB per engine in 1 bucket\(s\) of 64 MiB\), "
                     r"2 rollout actors", out, re.M), out
    for system in ("driver (old)", "object_store", "collective"):
        row = re.search(rf"^  {re.escape(system)} +(\d+\.\d) ms/sync +(\d+\.\d\d)x the bound", out, re.M)
        assert row and float(row.group(1)) > 0, out
    for floor in ("copy bound", "engine reload"):
        assert re.search(rf"^  {floor} +\d+\.\d ms/sync$", out, re.M), out
    assert re.search(r"best transport \((object_store|collective)\) / copy bound: \d+\.\d\dx", out), out
    cell = r" [\d,]+\.\d \(\d+\.\dx\) \|"
    assert re.search(rf"^\| 1m \| 1\.\dM \| \d\.\d \| \d+\.\d \| [\d,]+\.\d \|{cell * 3} \d+\.\d\dx "
                     r"\((object_store|collective)\) \| \d+\.\d\dx \|$",
                     out, re.M), out
    lora = {name: re.search(rf"^  lora {name} +(\d+\.\d) ms/sync  (\d+\.\d\d) MB per engine$", out, re.M)
            for name in ("merged", "adapters")}
    assert all(lora.values()), out
    assert 10 * float(lora["adapters"].group(2)) < float(lora["merged"].group(2)), out
    assert re.search(r"^\| 1m \| [\d,]+\.\d \| \d\.\d\d \| [\d,]+\.\d \| \d\.\d\d \| \d+\.\d\dx \|$", out, re.M), out


@pytest.mark.slow  # the long tier: a first run creates bench/.venv-trl (a 1.5 GB download, 5-6 min)
@pytest.mark.ray
@pytest.mark.vllm
@pytest.mark.download
def test_vs_trl_bench_runs_tokengym_and_trl_and_prints_its_table() -> None:
    """bench/vs_trl.py with one step of tokengym's PPO and one generation of TRL's GRPOTrainer (creating the pinned
    TRL environment bench/.venv-trl first when it is missing: a download of about 1.5 GB): each system trained the
    completions its step holds, was timed, and the table compares them."""
    out = run_script("bench/vs_trl.py", "--systems", "tokengym-ppo", "trl-grpo", "--steps", "1", "--window", "256",
                     "--budget-s", "300", timeout=1500)
    for system, completions in (("tokengym-ppo", 256), ("trl-grpo", 512)):
        line = re.search(rf"^  round 1 {system} .*; {completions} completions in 1 steps, ([\d,]+)/s; "
                         rf"start-up (\d+) s; smoothed max (\d\.\d{{3}}), .*stopped: (\w+)", out, re.M)
        assert line, out
        rate, startup, reward, stopped = line.groups()
        assert int(rate.replace(",", "")) > 0 and int(startup) > 0 and 0 <= float(reward) < 0.5, out
        assert stopped == "steps", out  # a random policy gets ~0.08: neither bar is reached in one step
    assert re.search(r"^\| tokengym-ppo \| never \| never \| never \| [\d,]+ \| \d+ \| 0\.\d{3} \| "
                     r"never \| never \|$", out, re.M), out
    assert re.search(r"^\| trl-grpo \| never \| never \| never \| [\d,]+ \| \d+ \| 0\.\d{3} \| - \| - \|$",
                     out, re.M), out


@pytest.mark.ray
@pytest.mark.vllm
def test_startup_bench_prints_both_parts() -> None:
    """bench/startup.py with one round: one default run's start-up parts (they fit in its total), the same run from
    a baseline revision's sources (here HEAD) and their ratio, and one engine of each variant, where skipping the
    sampler's compile makes the warm-up (the first generate call) shorter."""
    out = run_script("bench/startup.py", "--configs", "configs/default.yaml", "--rounds", "1", "--repeats", "1",
                     "--baseline", "HEAD")
    for label in ("", " @ HEAD"):
        block = re.search(rf"^  configs/default\.yaml{re.escape(label)}: total (\d+\.\d) s.*\n(.*)\n", out, re.M)
        assert block, out
        parts = [float(x) for x in re.findall(
            r"(?:launch|policy|ray|actors|learners|first_sync|tracking) (\d+\.\d\d) s \(", block.group(2))]
        assert len(parts) == 7 and sum(parts) <= float(block.group(1)) + 0.05, out
    assert re.search(r"^  configs/default\.yaml: total, this tree / HEAD: \d+\.\d\dx$", out, re.M), out
    assert re.search(r"inside the slowest rollout actor: process \d+\.\d\d s, import \d+\.\d\d s", out), out
    warm = {v: float(re.search(rf"^  {v} +import \d+\.\d+ s, engine \d+\.\d+ s, warmup (\d+\.\d+) s", out, re.M).group(1))
            for v in ("eager", "compile")}
    assert warm["eager"] < warm["compile"], out
    assert re.search(r"^\| eager / compile \| \d+\.\d\dx \| \d+\.\d\dx \| 0\.\d\dx \| \d+\.\d\dx \|$", out, re.M), out


@pytest.mark.ray
def test_ab_bench_runs_one_benchmark_against_a_revision() -> None:
    """bench/ab.py, one round: bench/learner.py's smallest run from this tree and from HEAD's sources (a temporary
    worktree, removed after), the metric read from both and their ratio printed."""
    out = run_script("bench/ab.py", "HEAD", "--rounds", "1", "--metric", r"RLlib learner +([\d.]+) ms", "--",
                     "bench/learner.py", "--preset", "tiny-64", "--repeats", "2")
    values = [float(x) for x in re.findall(r"^  (?:this tree|HEAD) +median ([\d.]+) ", out, re.M)]
    assert len(values) == 2 and all(v > 0 for v in values), out
    assert re.search(r"^  this tree / HEAD: \d+\.\d\dx", out, re.M), out
    listed = subprocess.run(["git", "worktree", "list"], cwd=REPO, capture_output=True, text=True).stdout
    assert "tokengym-ab-" not in listed, listed


@pytest.mark.ray
def test_learner_bench_compares_shared_prompts_with_one_forward_per_sequence() -> None:
    """bench/learner.py --shared on the tiny grouped minibatch, two timed steps of each: both times and their ratio,
    and the share of the tokens the shared forward leaves (8 prompts of 6 tokens and 64 responses of 5: 368 of 704)."""
    out = run_script("bench/learner.py", "--shared", "--preset", "tiny-64", "--repeats", "2")
    assert re.search(r"^  one forward per sequence +\d+\.\d ms  \(704 tokens forwarded\)$", out, re.M), out
    assert re.search(r"^  prompts shared +\d+\.\d ms  \(368 tokens forwarded, 52%\)$", out, re.M), out
    assert re.search(r"^  shared / per sequence = \d+\.\d\dx the time$", out, re.M), out
