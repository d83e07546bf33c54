"""bench/vs_trl.py's arithmetic (no Ray, no TRL): TRL's reward is textenv's, and the smoothing, bars and medians
that turn progress rows into the table."""

from __future__ import annotations

import numpy as np

from bench.trl_grpo import positional_reward
from bench.vs_trl import median_or_never, outcome, smoothed
from textenv.tasks import ReverseTask


def test_trl_reward_is_textenv_reverse_score() -> None:
    """The TRL side's reimplemented reward gives textenv's Reverse score on right, partly right, too short, too long
    and empty responses (the benchmark also checks a few before every TRL run, in the TRL environment)."""
    task, rng = ReverseTask(), np.random.default_rng(0)
    for _ in range(200):
        sample = task.sample(rng)
        cut = int(rng.integers(0, 8))
        response = "".join(rng.choice(list("abcdefgh"), size=cut)) if rng.random() < 0.5 else sample.answer[:cut]
        assert positional_reward(sample.answer, response) == task.score(sample, response)
    assert positional_reward("abcde", "abxde") == 0.8


def rows(rewards: list[float], completions: int, step_s: float = 2.0, startup: float = 10.0) -> list[dict]:
    return [{"completions": completions, "reward": r, "step_s": step_s, "t": startup + step_s * (i + 1)}
            for i, r in enumerate(rewards)]


def test_smoothing_window_is_counted_in_completions() -> None:
    """Undefined until the window holds enough completions; then the completion-weighted mean of the latest rows."""
    steps = rows([0.1, 0.3, 0.9], completions=256)
    assert smoothed(steps[:3], 1024) is None
    assert smoothed(steps[:2], 512) == 0.2
    assert smoothed(steps, 512) == 0.6
    mixed = [{"completions": 512, "reward": 0.2}, {"completions": 256, "reward": 0.8}]
    assert abs(smoothed(mixed, 600) - (512 * 0.2 + 256 * 0.8) / 768) < 1e-12


def test_outcome_times_each_bar_from_launch_and_in_training() -> None:
    """Seconds from launch (start-up included), training seconds and steps at the first smoothed crossing; a bar
    never reached is None and the plateau is the smoothed curve's maximum."""
    run = {"rows": rows([0.1, 0.5, 0.7, 0.6], completions=512, step_s=2.0, startup=10.0), "stopped": "budget"}
    o = outcome(run, [0.5, 0.8], window=1024)
    assert o["reached"][0.5] == (16.0, 6.0, 3)  # smoothed: -, 0.3, 0.6, 0.65
    assert o["reached"][0.8] is None
    assert abs(o["plateau"] - 0.65) < 1e-12 and o["startup_s"] == 10.0
    assert o["per_s"] == 4 * 512 / 8.0 and o["completions"] == 2048


def test_median_counts_never_as_slowest() -> None:
    assert median_or_never([30.0, None, 10.0]) == 30.0
    assert median_or_never([None, None, 10.0]) is None
    assert median_or_never([5.0]) == 5.0
