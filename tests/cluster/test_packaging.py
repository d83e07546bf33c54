"""A regular (non-editable) install: the wheel ships configs/ and the launch files, and an installed tokengym finds
its configs from any directory."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
SOURCES = ["pyproject.toml", "setup.py", "README.md", "textenv_gym_hook.py", "textenv", "policies", "cluster", "configs"]


def build_wheel(tmp_path: Path) -> Path:
    """The project's wheel, built from a copy of its sources (the checkout gets no build/ or egg-info)."""
    src = tmp_path / "src"
    for name in SOURCES:
        if (REPO / name).is_dir():
            shutil.copytree(REPO / name, src / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            src.mkdir(exist_ok=True)
            shutil.copy(REPO / name, src / name)
    # No build isolation: the venv's setuptools builds it, offline.
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w",
                    str(tmp_path / "dist"), str(src)], check=True, capture_output=True, text=True, timeout=600)
    (wheel,) = (tmp_path / "dist").glob("tokengym-*.whl")
    return wheel


def test_the_wheel_ships_the_configs_and_an_install_finds_them(tmp_path: Path) -> None:
    wheel = build_wheel(tmp_path)
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
        zf.extractall(tmp_path / "site")
    shipped = {f"cluster/configs/{p.name}" for p in (REPO / "configs").glob("*.yaml")}
    assert shipped and shipped <= names
    assert {f"cluster/launch/{p.name}" for p in (REPO / "cluster" / "launch").iterdir()} <= names

    # From a directory without configs/, with only the installed package on the path (not this checkout).
    code = ("from cluster.config import DEFAULT_CONFIG, load_config; print(DEFAULT_CONFIG); "
            "print(load_config('configs/gpu.yaml').name); print(load_config('grpo.yaml').name); print(load_config().name)")
    env = {**os.environ, "PYTHONPATH": str(tmp_path / "site")}
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.splitlines() == [str(tmp_path / "site" / "cluster" / "configs" / "default.yaml"),
                                       "addition-ppo-gpu", "reverse-grpo", "reverse-ppo"]
