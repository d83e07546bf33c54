"""`tokengym envs`, `tokengym config` and `tokengym train --dry-run`: answers without Ray."""

from __future__ import annotations

import inspect
import subprocess
import sys
from pathlib import Path

import gymnasium as gym
import pytest
import yaml

from cluster.cli import main
from cluster.config import build_config, load_config
from textenv import ENV_IDS, TASKS
from textenv.catalog import USER_TASK, registered_envs

REPO = Path(__file__).resolve().parents[2]


def test_registered_envs_cover_every_textenv_id() -> None:
    envs = {e.id: e for e in registered_envs()}
    assert set(envs) == {k for k in gym.registry if k.startswith("textenv/")}
    assert set(ENV_IDS) | {"textenv/Custom-v0", "textenv/File-v0"} <= set(envs)
    for e in envs.values():
        assert e.description and "\n" not in e.description
    assert envs["textenv/Reverse-v0"].knobs == {"length": 5, "letters": "abcdefgh"}
    assert envs["textenv/Reverse-v0"].description == (
        "Reverse a random string: `cafhb=` -> `bhfac`. Reward: fraction of positions right.")
    # a first docstring line that breaks off mid-sentence is continued to the sentence's end
    assert envs["textenv/GuessNumber-v0"].description.endswith("and the episode ends on the right guess.")
    assert envs["textenv/GuessNumber-v0"].knobs == {"high": 9, "max_turns": 4}
    assert envs["textenv/File-v0"].knobs["prompt_field"] == "prompt"
    assert envs["textenv/Custom-v0"].description == USER_TASK and envs["textenv/Custom-v0"].knobs == {}
    for env_id, task in ENV_IDS.items():  # the knobs are what the task accepts
        assert list(envs[env_id].knobs) == list(inspect.signature(TASKS[task]).parameters)


def test_envs_cli_lists_ids_descriptions_and_knobs(capsys: pytest.CaptureFixture) -> None:
    assert main(["envs"]) == 0
    out = capsys.readouterr().out.splitlines()
    for e in registered_envs():
        (line,) = [ln for ln in out if ln.startswith(e.id + " ")]
        assert line.split(None, 1)[1] == e.description
    after_addition = out[[i for i, ln in enumerate(out) if ln.startswith("textenv/Addition-v0")][0] + 1]
    assert after_addition.split() == ["task_kwargs:", "digits=2,", "template='{a}+{b}=',", "verifier='exact',",
                                      "eval_fraction=0.0"]


def test_config_cli_prints_the_resolved_config(capsys: pytest.CaptureFixture) -> None:
    assert main(["config", str(REPO / "configs" / "rloo.yaml"), "seed=4", "algorithm.lr=1e-4"]) == 0
    text = capsys.readouterr().out
    assert build_config(yaml.safe_load(text)) == load_config(REPO / "configs" / "rloo.yaml", ["seed=4", "algorithm.lr=1e-4"])
    assert text.startswith("# ") and "rloo.yaml seed=4 algorithm.lr=1e-4: resolved, valid" in text
    assert "  # vLLM engines, each a Ray actor" in text  # help text as comments
    assert main(["config"]) == 0  # no file: configs/default.yaml
    assert build_config(yaml.safe_load(capsys.readouterr().out)) == load_config()


def test_dry_run_checks_prints_and_does_not_train(capsys: pytest.CaptureFixture, tmp_path: Path) -> None:
    assert main(["train", "--dry-run", str(REPO / "configs" / "grpo.yaml"), f"runs_dir={tmp_path}", "seed=3"]) == 0
    text = capsys.readouterr().out
    assert text.startswith("# ") and "dry run" in text.split("\n\n")[0]
    cfg = build_config(yaml.safe_load(text))
    assert cfg == load_config(REPO / "configs" / "grpo.yaml", [f"runs_dir={tmp_path}", "seed=3"])
    assert text.endswith("#   bundle 0: rollout actor 0 {CPU: 1}\n#   bundle 1: rollout actor 1 {CPU: 1}\n")  # placement
    assert list(tmp_path.iterdir()) == []  # no run directory


@pytest.mark.parametrize("command", [["config"], ["train", "--dry-run"]])
def test_bad_key_is_one_line_exit_2(command: list[str], capsys: pytest.CaptureFixture) -> None:
    assert main([*command, "algorithm.lr_rate=1e-4"]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.strip().endswith("unknown key 'algorithm.lr_rate'; did you mean 'algorithm.lr'?")
    assert captured.err.count("\n") == 1


def test_dry_run_checks_what_train_checks_before_ray(capsys: pytest.CaptureFixture) -> None:
    assert main(["train", "--dry-run", "policy.model_path=/no/such/model"]) == 2
    assert "policy.model_path '/no/such/model' is not a local Hugging Face" in capsys.readouterr().err


def test_dry_run_starts_no_ray() -> None:
    code = ("import sys; from cluster.cli import main; rc = main(['train', '--dry-run', 'iterations=3']); "
            "assert 'ray' not in sys.modules and 'vllm' not in sys.modules, 'imported ray or vllm'; sys.exit(rc)")
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "iterations: 3" in result.stdout.splitlines()
