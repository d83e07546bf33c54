"""Module boundaries: textenv needs no torch, ray or vllm; policies needs no vllm."""

from __future__ import annotations

import subprocess
import sys

import pytest


def imported_after(code: str) -> set[str]:
    probe = f"{code}\nimport sys\nprint(' '.join(sorted({{m.split('.')[0] for m in sys.modules}})))"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True, timeout=120)
    return set(out.stdout.split())


def test_textenv_is_light() -> None:
    mods = imported_after("import textenv, gymnasium as gym\ne = gym.make('textenv/GuessNumber-v0'); e.reset(seed=0)")
    assert not mods & {"torch", "ray", "vllm", "transformers", "pyarrow"}, mods & {"torch", "ray", "vllm"}


@pytest.mark.parametrize("module", ["policies.learner", "policies.rl_module", "policies.lora"])
def test_policies_do_not_import_vllm(module: str) -> None:
    assert "vllm" not in imported_after(f"import {module}")
