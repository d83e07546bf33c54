"""Unit tests of the plotter (cluster/plot.py, `tokengym plot`) on hand-written metrics.jsonl files: no Ray, no run."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from PIL import Image

from cluster.cli import main
from cluster.plot import PHASES, load_run, plot_runs, summary_figure
from cluster.run import plot_summary

STEPS = ("rollout", "logprobs", "advantages", "update", "weight_sync", "generate", "replay", "batch_reward", "iteration")


def fake_run(run_dir: Path, iterations: int, critic: bool, eval_every: int = 0) -> Path:
    """A metrics.jsonl with the keys the trainer logs (cluster/trainer.py), the values made up."""
    rows = []
    if eval_every:
        rows.append({"iteration": 0, "eval/accuracy": 0.0, "eval/reward": 0.1, "eval/response_length": 5.0,
                     "timing/eval_s": 2.0})
    for i in range(1, iterations + 1):
        row = {"iteration": i, "reward/mean": 1 - math.exp(-i / 5), "losses/approx_kl": 0.01 / i,
               "losses/entropy": 2.0 - i / iterations, "rollout/response_length": 5.0 + i % 3,
               "losses/policy_loss": (-1) ** i * 0.1, "losses/value_loss": 0.5 / i if critic else 0.0,
               **{f"timing/{s}_s": 0.1 * (k + 1) for k, s in enumerate(STEPS)}}
        if eval_every and i % eval_every == 0:
            row.update({"eval/accuracy": i / iterations, "eval/reward": i / iterations, "timing/eval_s": 2.0})
        rows.append(row)
    run_dir.mkdir(parents=True)
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return run_dir


def assert_drawn_png(path: Path) -> None:
    with Image.open(path) as img:
        assert img.format == "PNG" and img.size == (1600, 900)
        colors = img.convert("RGB").getcolors(maxcolors=1 << 20)
    assert colors is not None and len(colors) > 50  # not a blank, single-colour image


def test_plot_unit_two_runs_through_the_cli(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    a = fake_run(tmp_path / "run-a", 12, critic=True, eval_every=4)
    b = fake_run(tmp_path / "run-b", 8, critic=False)
    out = tmp_path / "cmp.png"
    assert main(["plot", str(a), str(b), "--out", str(out)]) == 0
    assert capsys.readouterr().out.strip() == str(out)
    assert_drawn_png(out)


def test_plot_unit_panels_and_legend(tmp_path: Path) -> None:
    runs = {d.name: load_run(d) for d in (fake_run(tmp_path / "run-a", 12, critic=True, eval_every=4),
                                            fake_run(tmp_path / "run-b", 8, critic=False))}
    fig = summary_figure(runs)
    (legend,) = fig.legends
    assert [t.get_text() for t in legend.get_texts()] == ["run-a", "run-b"]
    axes = {ax.get_title(): ax for ax in fig.axes}
    drawn = {title: sorted(line.get_gid() for line in ax.get_lines()) for title, ax in axes.items()}
    assert drawn["reward"] == ["run-a|eval/accuracy", "run-a|eval/reward", "run-a|reward/mean", "run-b|reward/mean"]
    assert drawn["KL"] == ["run-a|losses/approx_kl", "run-b|losses/approx_kl"]
    assert drawn["entropy"] == ["run-a|losses/entropy", "run-b|losses/entropy"]
    assert drawn["response length (tokens)"] == [
        "run-a|eval/response_length", "run-a|rollout/response_length", "run-b|rollout/response_length"]
    # run-b has no critic: its value loss, 0 throughout, is left out
    assert drawn["losses"] == ["run-a|losses/policy_loss", "run-a|losses/value_loss", "run-b|losses/policy_loss"]
    reward_line = next(line for line in axes["reward"].get_lines() if line.get_gid() == "run-a|reward/mean")
    assert list(reward_line.get_xdata()) == list(range(1, 13))  # iteration 0 (evaluation only) has no reward/mean
    accuracy = next(line for line in axes["reward"].get_lines() if line.get_gid() == "run-a|eval/accuracy")
    assert list(accuracy.get_xdata()) == [0, 4, 8, 12] and accuracy.get_linestyle() == "None"
    timing = axes["time per iteration, by phase"]
    bars = list(timing.patches)
    assert len(bars) == 2 * len(PHASES)  # a bar per phase per run (run-b's eval bar has width 0)
    assert sorted({p.get_gid() for p in bars}) == ["run-a", "run-b"]
    a_update = [p for p in bars if p.get_gid() == "run-a"][PHASES.index("update")]
    assert a_update.get_width() == pytest.approx(0.4)
    a_eval = [p for p in bars if p.get_gid() == "run-a"][PHASES.index("eval")]
    assert a_eval.get_width() == pytest.approx(4 * 2.0 / 12)  # four evaluations spread over 12 iterations


def test_plot_unit_one_run_defaults_to_its_summary(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    run = fake_run(tmp_path / "run-a", 5, critic=True)
    assert main(["plot", str(run)]) == 0
    assert capsys.readouterr().out.strip() == str(run / "plots" / "summary.png")
    assert_drawn_png(run / "plots" / "summary.png")
    fig = summary_figure({"run-a": load_run(run)})
    (timing,) = [ax for ax in fig.axes if ax.get_title().startswith("time per iteration (s)")]
    assert [t.get_text() for t in timing.get_legend().get_texts()] == ["rollout", "logprobs", "advantages", "update",
                                                                        "weight_sync"]


def test_plot_unit_several_runs_default_to_compare_png(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    a, b = fake_run(tmp_path / "x" / "run", 3, critic=True), fake_run(tmp_path / "y" / "run", 3, critic=True)
    monkeypatch.chdir(tmp_path)
    assert plot_runs([a, b]) == Path("plots/compare.png")
    assert_drawn_png(tmp_path / "plots" / "compare.png")
    labels = [t.get_text() for t in summary_figure({str(a): load_run(a), str(b): load_run(b)}).legends[0].get_texts()]
    assert labels == [str(a), str(b)]  # the same directory name twice: the whole paths tell them apart


def test_plot_unit_not_a_run_is_one_line_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["plot", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("tokengym: error: ") and "no metrics.jsonl" in err and "\n" not in err


def test_summary_plot_after_training_never_fails_the_run(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    run = fake_run(tmp_path / "run", 4, critic=True)
    assert plot_summary(run) == run / "plots" / "summary.png"
    assert_drawn_png(run / "plots" / "summary.png")
    assert plot_summary(tmp_path / "no-run") is None  # what train() calls after its loop: a warning, not an error
    err = capsys.readouterr().err.strip()
    assert err.startswith("tokengym: warning: no plots/summary.png") and "\n" not in err
