"""Evaluation on held-out prompts: disjoint from training, logged at iteration 0 and every N, no effect on training,
and ``tokengym eval`` on a run directory."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cluster.config import ConfigError, build_config
from cluster.evaluation import EVAL_FILE, heldout_problems
from cluster.rollout import actor_seed, draw_problems
from cluster.run import check_before_ray
from cluster.tracking import SAMPLES_FILE, read_metrics
from cluster.trainer import iteration_seed
from textenv import EnvConfig, make_env
from test_e2e import only_run, tokengym  # noqa: E402  (same folder)

TRAINING = ["iterations=4", "checkpoint_every=4", "rollout.prompts_per_iteration=64", "tracking.wandb=false"]
EVAL = ["eval.every=2", "eval.num_prompts=16", "eval.k=3"]
EVAL_KEYS = {"eval/accuracy", "eval/reward", "eval/score", "eval/pass@k", "eval/k", "eval/prompts",
             "eval/response_length", "timing/eval_s"}


def training_problems(env_cfg: EnvConfig, seed: int, iterations: int, actors: int, per_actor: int) -> set[str]:
    """Every prompt the rollout actors of a run draw in ``iterations`` iterations (the actors' own derivation)."""
    env = make_env(env_cfg, disable_env_checker=True).unwrapped
    prompts: set[str] = set()
    for iteration in range(1, iterations + 1):
        for index in range(actors):
            samples, _ = draw_problems(env, actor_seed(iteration_seed(seed, iteration), index), per_actor)
            prompts.update(s.prompt for s in samples)
    return prompts


def test_eval_prompts_are_disjoint_from_training_prompts() -> None:
    # 8 letters over a-h: 16.7M strings, so a shared prompt would mean a shared seed stream, not chance.
    env_cfg = EnvConfig(id="textenv/Reverse-v0", task_kwargs={"length": 8, "letters": "abcdefgh"})
    problems = heldout_problems(env_cfg, seed=0, n=64)
    held = [s.prompt for s in problems]
    assert len(set(held)) == 64
    assert held == [s.prompt for s in heldout_problems(env_cfg, seed=0, n=64)]  # the same set at every evaluation
    seen = training_problems(env_cfg, seed=0, iterations=100, actors=2, per_actor=128)
    assert len(seen) > 25_000
    assert not set(held) & seen
    # The comparison can fail: the training stream reproduces its own prompts.
    env = make_env(env_cfg, disable_env_checker=True).unwrapped
    again, _ = draw_problems(env, actor_seed(iteration_seed(0, 7), 1), 128)
    assert {s.prompt for s in again} <= seen
    assert held != [s.prompt for s in heldout_problems(env_cfg, seed=1, n=64)]  # each run seed has its own set


def test_file_task_evaluates_on_its_held_out_rows(tmp_path: Path) -> None:
    rows = [{"prompt": f"{i}+1=", "answer": str(i + 1)} for i in range(20)]
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    env_cfg = EnvConfig(id="textenv/File-v0", task_kwargs={"path": str(data), "eval_fraction": 0.25})
    held = heldout_problems(env_cfg, seed=0, n=100)
    assert len(held) == 5  # each held-out row once, in file order
    trained = make_env(env_cfg, disable_env_checker=True).unwrapped.task.samples
    assert len(trained) == 15 and not {s.prompt for s in held} & {s.prompt for s in trained}


def test_eval_config_errors_name_the_key(tmp_path: Path) -> None:
    for key, value in (("every", -1), ("k", 0), ("num_prompts", 0), ("temperature", 0)):
        with pytest.raises(ConfigError, match=f"eval.{key} must be"):
            build_config({"eval": {key: value}})
    data = tmp_path / "d.jsonl"
    data.write_text('{"prompt": "1+1=", "answer": "2"}\n')
    cfg = build_config({"env": {"id": "textenv/File-v0", "task_kwargs": {"path": str(data)}}, "eval": {"every": 5}})
    with pytest.raises(ConfigError, match="eval.every=5: file: evaluation needs held-out rows.*eval_path"):
        check_before_ray(cfg)


@pytest.mark.ray
@pytest.mark.vllm
@pytest.mark.e2e
def test_eval_during_training_leaves_training_unchanged_and_tokengym_eval_writes_eval_json(tmp_path: Path) -> None:
    histories = {}
    for name, extra in (("evaloff", []), ("evalon", EVAL)):
        result = tokengym("train", *TRAINING, *extra, f"name={name}", runs=tmp_path / name)
        assert result.returncode == 0, result.stderr[-3000:]
        histories[name] = read_metrics(only_run(tmp_path / name))
    off, on = histories["evaloff"], histories["evalon"]

    # Evaluation rows: iteration 0 (before any update) and every 2 iterations, on the same held-out prompts.
    assert [r["iteration"] for r in on] == [0, 1, 2, 3, 4]
    assert set(on[0]) == {"iteration"} | EVAL_KEYS
    assert [EVAL_KEYS <= set(r) for r in on] == [True, False, True, False, True]
    assert all(r["eval/prompts"] == 16 and r["eval/k"] == 3 for r in on if "eval/k" in r)
    for r in on[0], on[2], on[4]:
        assert all(0.0 <= r[k] <= 1.0 for k in ("eval/accuracy", "eval/reward", "eval/pass@k"))
    # The training trajectory is exactly the one without evaluation.
    keys = ["reward/mean", "reward/score_mean", "losses/policy_loss", "losses/value_loss", "losses/entropy",
            "rollout/logprob_gap", "weights/version"]
    assert [[r[k] for k in keys] for r in on[1:]] == [[r[k] for k in keys] for r in off]

    # `tokengym eval RUN_DIR`: the run's config and final weights, the same problems as the run's last evaluation.
    run = only_run(tmp_path / "evalon")
    result = tokengym("eval", str(run), runs=tmp_path / "evalon")
    assert result.returncode == 0, result.stderr[-3000:]
    out = Path(result.stdout.strip().splitlines()[-1])
    assert out == run / EVAL_FILE
    report = json.loads(out.read_text())
    assert EVAL_KEYS <= set(report) and report["eval/prompts"] == 16 and len(report["examples"]) == 16
    for key in ("eval/accuracy", "eval/reward", "eval/pass@k"):
        assert report[key] == pytest.approx(on[4][key], abs=1e-6), key

    # samples.jsonl: every evaluation's greedy responses, scored; they agree with the metrics row.
    samples = [json.loads(line) for line in (run / SAMPLES_FILE).read_text().splitlines()]
    assert [s["iteration"] for s in samples] == [i for i in (0, 2, 4) for _ in range(16)]
    assert {s["kind"] for s in samples} == {"eval"}
    for it, row in ((0, on[0]), (2, on[2]), (4, on[4])):
        scores = [s["score"] for s in samples if s["iteration"] == it]
        assert sum(sc >= 1 - 1e-9 for sc in scores) / 16 == pytest.approx(row["eval/accuracy"])
    assert [(s["prompt"], s["response"]) for s in samples if s["iteration"] == 4] == [
        (e["prompt"], e["response"]) for e in report["examples"]]  # tokengym eval: the same policy, the same problems

    # `tokengym sample`: the final policy's greedy responses, the same as its last evaluation's, as a table.
    result = tokengym("sample", str(run), "--n", "4", "--greedy", "--prompt", "abcde=", "--prompt", "hgfed=",
                      runs=tmp_path / "evalon")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "[1] prompt:   abcde=" in result.stdout and "[2] prompt:   hgfed=" in result.stdout
    assert result.stdout.count("reward:   n/a (no answer)") == 2
    result = tokengym("sample", str(run), "--n", "4", "--greedy", runs=tmp_path / "evalon")
    assert result.returncode == 0, result.stderr[-3000:]
    for i, example in enumerate(report["examples"][:4], 1):
        assert f"[{i}] prompt:   {example['prompt']}" in result.stdout
        assert f"response: {example['response']}" in result.stdout
    assert "mean reward" in result.stdout
