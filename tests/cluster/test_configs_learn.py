"""Every shipped config learns: each runs shortened (its own settings, fewer iterations) and must pass a reward bar.

The bars sit well above where each config starts (mean reward about 0.05-0.1 at iteration 1) and below where it is
at that iteration over seeds 0-2 (bench/RESULTS.md, "Shipped configs"), so a config that stops learning fails here.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from cluster.config import load_config
from cluster.tracking import read_metrics

REPO = Path(__file__).resolve().parents[2]
CONFIGS = REPO / "configs"
# config file: (iterations, bar on the mean reward of the last 5 of them)
LEARNS = {
    "default.yaml": (30, 0.42),
    "grpo.yaml": (20, 0.4),
    "rloo.yaml": (20, 0.4),
    "reinforce.yaml": (40, 0.45),
    "guess_number.yaml": (40, 0.3),
}
# In the long tier (pytest --slow): default.yaml is also trained by the default tier's
# tests/cluster/test_e2e.py::test_short_default_run_learns_and_records_everything; grpo.yaml stands for the
# critic-free family there.
LONG_TIER = {"default.yaml", "rloo.yaml", "reinforce.yaml", "guess_number.yaml"}
NOT_RUN_HERE = {
    "gpu.yaml": "needs CUDA GPUs",
    "ppo.yaml": "the same experiment as default.yaml (checked by test_ppo_is_the_default_experiment)",
    "smollm2.yaml": "needs the pulled model: tests/cluster/test_pull.py::test_smollm2_config_learns_held_out_additions",
}


def test_every_shipped_config_has_a_learning_test() -> None:
    shipped = {p.name for p in CONFIGS.glob("*.yaml")}
    assert shipped == set(LEARNS) | set(NOT_RUN_HERE)


def test_ppo_is_the_default_experiment() -> None:
    default, ppo = load_config(CONFIGS / "default.yaml").to_dict(), load_config(CONFIGS / "ppo.yaml").to_dict()
    default.pop("name"), ppo.pop("name")
    assert default == ppo


@pytest.mark.ray
@pytest.mark.vllm
@pytest.mark.e2e
@pytest.mark.parametrize("config", [pytest.param(c, marks=[pytest.mark.slow] if c in LONG_TIER else []) for c in sorted(LEARNS)])
def test_shipped_config_learns(config: str, tmp_path: Path) -> None:
    assert_learns(config, LEARNS[config], tmp_path)


@pytest.mark.ray
@pytest.mark.vllm
@pytest.mark.e2e
def test_grpo_learns_with_minibatches_of_whole_groups(tmp_path: Path) -> None:
    """grpo.yaml with algorithm.group_minibatches=true (each epoch shuffles whole groups, whose prompts the update then
    forwards once): the same bar as grpo.yaml's."""
    assert_learns("grpo.yaml", LEARNS["grpo.yaml"], tmp_path, "algorithm.group_minibatches=true")


def assert_learns(config: str, length_and_bar: tuple[int, float], tmp_path: Path, *overrides: str) -> None:
    iterations, bar = length_and_bar
    env = {**os.environ, "WANDB_MODE": "disabled"}
    cmd = [sys.executable, "-m", "cluster.cli", "train", str(CONFIGS / config), f"iterations={iterations}",
           f"checkpoint_every={iterations}", f"runs_dir={tmp_path}", "tracking.progress_bar=false", "tracking.wandb=false",
           *overrides]
    result = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    (run,) = [p for p in tmp_path.iterdir() if (p / "metrics.jsonl").exists()]
    rows = read_metrics(run)
    rewards = [row["reward/mean"] for row in rows]
    assert all(row["rollout/logprob_gap"] < 1e-3 for row in rows), "learner and vLLM disagree on the sampled tokens"
    assert len(rewards) == iterations
    first, last = rewards[0], sum(rewards[-5:]) / 5
    assert first < 0.2, f"{config}: starts at {first:.3f}, so the bar says nothing"
    assert last >= bar, f"{config} stopped learning: mean reward {first:.3f} -> {last:.3f} in {iterations} iterations, bar {bar}"
