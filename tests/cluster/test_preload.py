"""Which local Rays preload a rollout actor's imports in their workers (cluster/engine_imports.py); the e2e default
run (tests/cluster/test_e2e.py) checks that both of its actors found them made."""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from cluster.config import load_config
from cluster.run import ENGINE_IMPORTS, preloads_engine_imports

REPO = Path(__file__).resolve().parents[2]


def test_a_local_run_of_cpu_engines_only_preloads_them() -> None:
    cfg = load_config()
    assert preloads_engine_imports(cfg)
    assert preloads_engine_imports(load_config("configs/grpo.yaml"))
    assert preloads_engine_imports(load_config(overrides=["rollout.num_actors=3"]))


@pytest.mark.parametrize("change", [
    lambda c: replace(c, cluster=replace(c.cluster, address="10.0.0.1:6379")),  # Ray's workers are the cluster's
    lambda c: replace(c, cluster=replace(c.cluster, num_learners=1)),  # a learner actor would take a worker too
    lambda c: replace(c, reward_model=replace(c.reward_model, path="rm")),  # so would the reward model's
    lambda c: replace(c, rollout=replace(c.rollout, num_gpus_per_actor=1)),  # GPU engines import after their GPU
], ids=["cluster", "learner-actors", "reward-model", "gpu-engines"])
def test_other_layouts_keep_the_imports_in_the_actor(change) -> None:
    assert not preloads_engine_imports(change(load_config()))


def test_the_preloaded_module_makes_the_import_the_actor_checks_for() -> None:
    """A fresh interpreter that imports what Ray's workers preload holds the module VLLMRolloutActor looks for to
    report its imports preloaded, with the setting the actor makes before its own import."""
    probe = (f"import os, sys; import {ENGINE_IMPORTS}; "
             "print('vllm.entrypoints.llm' in sys.modules, os.environ['VLLM_ENABLE_V1_MULTIPROCESSING'])")
    env = {k: v for k, v in os.environ.items() if k != "VLLM_ENABLE_V1_MULTIPROCESSING"}
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=300, env=env, cwd=REPO)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split()[-2:] == ["True", "0"], done.stdout
