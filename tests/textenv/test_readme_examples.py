"""The README's task and reward examples work as written."""

from __future__ import annotations

import re
from pathlib import Path

import gymnasium as gym
import pytest
from gymnasium.utils.env_checker import check_env

import textenv
from cluster.config import load_config

README = Path(__file__).resolve().parents[2] / "README.md"


def code_block(first_line: str) -> str:
    for block in re.findall(r"```(?:python|yaml)\n(.*?)```", README.read_text(), flags=re.S):
        if block.startswith(first_line):
            return block
    raise AssertionError(f"README has no code block starting with {first_line!r}")


@pytest.fixture
def examples(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    (tmp_path / "mytasks.py").write_text(code_block("# mytasks.py"))
    (tmp_path / "myrewards.py").write_text(code_block("# myrewards.py"))
    (tmp_path / "double.yaml").write_text(code_block("# configs/double.yaml"))
    monkeypatch.syspath_prepend(str(tmp_path))
    return tmp_path


def test_readme_task_is_a_working_environment(examples: Path) -> None:
    env = gym.make("textenv/Custom-v0", task="mytasks:DoubleTask")
    check_env(env.unwrapped, skip_render_check=True)
    obs, info = env.reset(seed=0)
    tok = env.unwrapped.tokenizer
    ep = textenv.replay(env.unwrapped, env.unwrapped.sample, tok.encode(info["answer"]))
    assert ep["score"] == 1.0 and ep["rewards"].sum() == pytest.approx(1.0) and len(ep["rewards"]) == 6


def test_readme_config_and_reward_function(examples: Path) -> None:
    cfg = load_config(examples / "double.yaml")
    assert cfg.env.task == "mytasks:DoubleTask" and cfg.env.task_kwargs == {"length": 3}
    env = textenv.make_env(cfg.env).unwrapped
    assert env.max_response_tokens == 6

    rev = gym.make("textenv/Reverse-v0", reward_fn="myrewards:short_and_right").unwrapped
    _, info = rev.reset(seed=1)
    ep = textenv.replay(rev, rev.sample, rev.tokenizer.encode(info["answer"]))
    assert ep["rewards"][:-1].sum() == 0 and ep["rewards"][-1] == pytest.approx(1.0 - 0.05)


def test_custom_id_needs_a_task() -> None:
    with pytest.raises(ValueError, match="needs env.task"):
        textenv.EnvConfig(id="textenv/Custom-v0")
    with pytest.raises(ValueError, match="TokenEnv needs a task"):
        gym.make("textenv/Custom-v0")


def test_textenv_ids_work_in_a_fresh_interpreter_without_importing_textenv(examples: Path) -> None:
    """Gymnasium 1.x loads no env plugins; tokengym's installed .pth hook registers textenv/ when gymnasium loads."""
    import os
    import subprocess
    import sys

    probe = (
        "import sys, gymnasium as gym\n"
        "assert 'textenv' in sys.modules, 'importing gymnasium did not register textenv'\n"
        "env = gym.make('textenv/Custom-v0', task='mytasks:DoubleTask')\n"
        "env.reset(seed=0)\n"
        "print(env.spec.id, gym.make('textenv/Reverse-v0').spec.id)\n"
    )
    env = {**os.environ, "PYTHONPATH": str(examples)}  # the README's own task module, nothing of the repository
    out = subprocess.run([sys.executable, "-c", probe], cwd=examples, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["textenv/Custom-v0", "textenv/Reverse-v0"]
