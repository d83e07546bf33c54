"""What ``init_ray`` asks of Ray, with ``ray.init`` replaced by a recorder (a stand-in: nothing starts here)."""

from __future__ import annotations

import pytest

from cluster.config import load_config
from cluster.run import init_ray


@pytest.fixture
def recorded(monkeypatch) -> list[dict]:
    import ray

    calls: list[dict] = []
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda **kwargs: calls.append(kwargs))
    for key in ("VLLM_LOGGING_LEVEL", "TOKENIZERS_PARALLELISM"):  # unset here, as they were before, afterwards
        monkeypatch.setenv(key, "")
        monkeypatch.delenv(key)
    return calls


def test_a_local_ray_gets_its_env_vars_by_inheritance_not_a_job_runtime_env(recorded, monkeypatch) -> None:
    """The workers Ray starts when the driver connects have no runtime_env; a job with one would never use them."""
    import os

    monkeypatch.setenv("VLLM_LOGGING_LEVEL", "ERROR")  # the user's own setting is kept
    init_ray(load_config())
    (kwargs,) = recorded
    assert kwargs["address"] == "local" and "runtime_env" not in kwargs
    assert kwargs["num_cpus"] == 3  # 2 rollout actors + the driver
    assert os.environ["VLLM_LOGGING_LEVEL"] == "ERROR" and os.environ["TOKENIZERS_PARALLELISM"] == "false"


def test_a_cluster_job_carries_them(recorded) -> None:
    init_ray(load_config(overrides=["cluster.address=10.0.0.1:6379"]))
    (kwargs,) = recorded
    assert kwargs["address"] == "10.0.0.1:6379"
    assert kwargs["runtime_env"] == {"env_vars": {"VLLM_LOGGING_LEVEL": "WARNING", "TOKENIZERS_PARALLELISM": "false"}}
