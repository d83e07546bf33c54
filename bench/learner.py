"""Learner overhead: tokens/s of one RLlib update step vs a bare torch step of the same model and batch.

"ours": ``LearnerGroup.update`` with one minibatch (the RLlib learner: batch conversion, the TransformerPolicy
RLModule's forward, the registered PPO objective + value loss + entropy, backward, gradient clipping, Adam, metrics).
"bare": the same HF model and value head, the same response-only log-prob/entropy/value computation and PPO loss,
backward, clip, Adam, written directly in torch as well as torch allows (fused Adam, foreach clipping). The two
alternate, and the medians are compared.
Goal (issue 4): ours / bare time <= 1.3.

    .venv/bin/python bench/learner.py                      # tiny default policy on CPU
    .venv/bin/python bench/learner.py --preset tiny-64     # the same at the configs' minibatch (64 sequences)
    .venv/bin/python bench/learner.py --preset qwen2-0.5b   # ~0.5B Qwen2 built from its config (use a GPU)
    .venv/bin/python bench/learner.py --shared --preset small-long   # grouped batch: prompts shared or not
    .venv/bin/python bench/learner.py --memory --layers 2   # Qwen2-0.5B vocabulary: log-softmax chunked or not
    .venv/bin/python bench/learner.py --memory --model smollm2-135m-instruct   # the same for pulled SmolLM2

``--memory``: a random Qwen2-0.5B-shaped model (hidden 896, 14/2 heads, vocabulary 151,936, tied embeddings;
``--layers`` of its 24 layers) at a small batch; ``rollout_stats`` then one update per step, with the log-softmax
over the vocabulary all at once (``algorithm.logits_chunk_tokens=null``, as before chunking) and chunked. Each
variant runs in its own process, one after the other, and reports tokens/s and its peak RSS during the steps
(Linux ``VmHWM``, reset after a warm-up step so that loading and Adam's state allocation do not count).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

PRESETS = {
    "tiny": dict(arch="llama", hidden_size=128, num_layers=2, num_heads=4, intermediate_size=256, batch=256, P=6, R=5),
    "tiny-64": dict(arch="llama", hidden_size=128, num_layers=2, num_heads=4, intermediate_size=256, batch=64, P=6,
                    R=5),  # one optimizer step of configs/default.yaml and grpo.yaml (minibatch_size 64)
    "small": dict(arch="llama", hidden_size=512, num_layers=4, num_heads=8, intermediate_size=1024, batch=32, P=64, R=64),
    "qwen2-0.5b": dict(arch="qwen2", hidden_size=896, num_layers=24, num_heads=14, intermediate_size=4864, batch=16,
                       P=256, R=256),
}


def _proc_status_kib(field: str) -> int:
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def _memory_variant(model_dir: str, chunk: int | None, B: int, P: int, R: int, steps: int, out: "Any",
                    bf16: str = "off") -> None:
    """One variant of ``--memory`` in a fresh process: warm-up, reset the peak RSS, then ``steps`` timed steps."""
    from ray.rllib.policy.sample_batch import MultiAgentBatch, SampleBatch

    from cluster.trainer import build_batch
    from policies.columns import ADVANTAGES, RETURNS
    from policies.config import AlgorithmConfig, PolicyConfig
    from policies.learner import MODULE_ID, build_learner_group, group_rollout_stats

    torch.manual_seed(0)
    from transformers import AutoConfig

    algo = AlgorithmConfig(minibatch_size=B, num_epochs=1, logits_chunk_tokens=chunk, bf16=bf16)
    group = build_learner_group(algo, PolicyConfig(), model_dir, 0, 0)
    rng = np.random.default_rng(0)
    V = AutoConfig.from_pretrained(model_dir).vocab_size
    batch = build_batch({
        "prompt_ids": rng.integers(0, V, (B, P)), "prompt_length": np.full(B, P),
        "response_ids": rng.integers(0, V, (B, R)), "response_length": np.full(B, R),
        "rewards": rng.random((B, R)).astype(np.float32), "sampling_logp": np.zeros((B, R), np.float32),
    })
    batch[ADVANTAGES] = rng.standard_normal((B, R)).astype(np.float32)
    batch[RETURNS] = rng.random((B, R)).astype(np.float32)

    def step() -> None:
        batch.update(group_rollout_stats(group, batch, B))
        group.update(batch=MultiAgentBatch({MODULE_ID: SampleBatch(dict(batch))}, env_steps=B), num_epochs=1,
                     minibatch_size=B, shuffle_batch_per_epoch=False)

    step()  # warm-up: Adam's state is allocated here
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM (the peak RSS) to the current RSS
    rss_before = _proc_status_kib("VmRSS")
    start = time.perf_counter()
    for _ in range(steps):
        step()
    elapsed = time.perf_counter() - start
    out.put({"chunk": chunk, "tokens_per_s": steps * B * (P + R) / elapsed, "step_s": elapsed / steps,
             "peak_gib": _proc_status_kib("VmHWM") / 2**20, "peak_above_gib": (_proc_status_kib("VmHWM") - rss_before) / 2**20})
    group.shutdown()


SHARED_PRESETS = {  # --shared: grouped batches (samples_per_prompt consecutive rows share a prompt)
    "tiny-64": dict(hidden_size=128, num_layers=2, num_heads=4, intermediate_size=256, batch=64, P=6, R=5, n=8,
                    value_head=False),  # one step of configs/grpo.yaml with algorithm.group_minibatches=true
    "small-long": dict(hidden_size=512, num_layers=4, num_heads=8, intermediate_size=1024, batch=32, P=128, R=32,
                       n=8, value_head=False),  # long prompts, short answers: a math-style GRPO step
    "smollm2-addition": dict(model="smollm2-135m-instruct", batch=64, P=29, R=16, n=8, value_head=False,
                             bf16="on"),  # one step of configs/smollm2.yaml (its chat prompt: 29 tokens)
}


def shared_main(args: argparse.Namespace) -> None:
    """``--shared``: one learner step (pre-update log-probs of the minibatch, then the update) with each distinct
    prompt forwarded once (``algorithm.share_prompts``) against one forward per sequence, on the same grouped
    minibatch, in turn; medians and their ratio."""
    from ray.rllib.policy.sample_batch import MultiAgentBatch, SampleBatch

    from cluster.trainer import build_batch
    from policies.columns import ADVANTAGES
    from policies.config import AlgorithmConfig, PolicyConfig
    from policies.learner import MODULE_ID, build_learner_group, group_rollout_stats
    from policies.models import save_tiny_policy

    p = SHARED_PRESETS[args.preset]
    B, P, R, n = p["batch"], p["P"], p["R"], p["n"]
    alphabet = "abcdefghijklmnopqrstuvwxyz0123456789=+"
    with tempfile.TemporaryDirectory() as tmp:
        if "model" in p:  # a pulled model (tokengym pull NAME)
            from transformers import AutoConfig

            from cluster.pull import resolve_model_dir

            model_dir = resolve_model_dir("--preset", p["model"])
            config = AutoConfig.from_pretrained(model_dir)
            V = config.vocab_size
            what = f"{p['model']} ({config.num_hidden_layers} layers, hidden {config.hidden_size}, vocab {V:,})"
        else:
            model_dir = save_tiny_policy(tmp, alphabet, seed=0, arch="llama", hidden_size=p["hidden_size"],
                                         num_layers=p["num_layers"], num_heads=p["num_heads"],
                                         intermediate_size=p["intermediate_size"], max_positions=P + R + 8)
            V = len(alphabet) + 2
            what = f"tiny Llama, hidden {p['hidden_size']} x {p['num_layers']} layers"
        policy = PolicyConfig(value_head=p["value_head"])
        bf16 = p.get("bf16", "auto")
        groups = {share: build_learner_group(AlgorithmConfig(minibatch_size=B, num_epochs=1, share_prompts=share,
                                                             bf16=bf16), policy, str(model_dir), 0, 0)
                  for share in (True, False)}
        rng = np.random.default_rng(0)
        batch = build_batch({
            "prompt_ids": np.repeat(rng.integers(2, V, (B // n, P)), n, axis=0), "prompt_length": np.full(B, P),
            "response_ids": rng.integers(2, V, (B, R)), "response_length": np.full(B, R),
            "rewards": rng.random((B, R)).astype(np.float32), "sampling_logp": np.zeros((B, R), np.float32),
        })
        batch[ADVANTAGES] = rng.standard_normal((B, R)).astype(np.float32)

        def step(share: bool) -> float:
            start = time.perf_counter()
            mine = dict(batch) | group_rollout_stats(groups[share], batch, B)
            groups[share].update(batch=MultiAgentBatch({MODULE_ID: SampleBatch(mine)}, env_steps=B), num_epochs=1,
                                 minibatch_size=B, shuffle_batch_per_epoch=False)
            return time.perf_counter() - start

        for _ in range(3):  # warm-up
            step(True), step(False)
        times: dict[bool, list[float]] = {True: [], False: []}
        for _ in range(args.repeats):
            for share in (True, False):
                times[share].append(step(share))
        for group in groups.values():
            group.shutdown()
    shared_s, plain_s = statistics.median(times[True]), statistics.median(times[False])
    tokens_plain, tokens_shared = B * (P + R), B // n * P + B * R
    print(f"preset {args.preset} --shared: {B} sequences = {B // n} prompts x {n} samples, {P} prompt + {R} response "
          f"tokens, {what}, bf16 autocast {bf16}, cpu, {torch.get_num_threads()} thread(s), median of {args.repeats}; "
          f"a step = pre-update log-probs + one update")
    print(f"  one forward per sequence  {plain_s * 1e3:9.1f} ms  ({tokens_plain:,} tokens forwarded)")
    print(f"  prompts shared            {shared_s * 1e3:9.1f} ms  ({tokens_shared:,} tokens forwarded, "
          f"{tokens_shared / tokens_plain:.0%})")
    print(f"  shared / per sequence = {shared_s / plain_s:.2f}x the time")


def memory_main(args: argparse.Namespace) -> None:
    import multiprocessing as mp

    from transformers import AutoConfig, AutoModelForCausalLM

    B, P, R = args.batch, 32, args.response
    ctx = mp.get_context("spawn")
    with tempfile.TemporaryDirectory() as tmp:
        if args.model == "qwen2-0.5b-shaped":
            config = AutoConfig.for_model(
                "qwen2", vocab_size=151_936, hidden_size=896, num_hidden_layers=args.layers, num_attention_heads=14,
                num_key_value_heads=2, intermediate_size=4864, max_position_embeddings=4096, tie_word_embeddings=True,
            )
            torch.manual_seed(0)
            model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
            params_m = sum(x.numel() for x in model.parameters()) / 1e6
            model.save_pretrained(tmp)
            del model
            model_dir = tmp
            what = f"Qwen2-0.5B-shaped, {args.layers} of 24 layers ({params_m:.0f}M params), vocab 151,936, tied"
        else:  # a model directory or a pulled model's name (tokengym pull smollm2-135m-instruct)
            from cluster.pull import resolve_model_dir

            model_dir = resolve_model_dir("--model", args.model)
            config = AutoConfig.from_pretrained(model_dir)
            what = (f"{Path(model_dir).name}, {config.num_hidden_layers} layers, vocab {config.vocab_size:,}, "
                    f"tied={config.tie_word_embeddings}")
        rows = []
        for chunk in (None, args.chunk):
            out = ctx.Queue()
            proc = ctx.Process(target=_memory_variant, args=(model_dir, chunk, B, P, R, args.repeats, out, args.bf16))
            proc.start()
            rows.append(out.get())
            proc.join()
    print(f"{what}; batch {B} x ({P} prompt + {R} response) tokens, cpu, bf16 autocast {args.bf16}, "
          f"rollout_stats + one update per step, {args.repeats} steps")
    for r in rows:
        name = "whole vocab at once (before)" if r["chunk"] is None else f"chunked, {r['chunk']} tokens (after)"
        print(f"  {name:32s} {r['tokens_per_s']:8.1f} tokens/s  {r['step_s']:6.2f} s/step  peak RSS "
              f"{r['peak_gib']:5.2f} GiB  ({r['peak_above_gib']:+.2f} GiB over the steady state)")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="tiny", choices=sorted(set(PRESETS) | set(SHARED_PRESETS)))
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--memory", action="store_true", help="the Qwen2-0.5B-vocabulary memory comparison")
    ap.add_argument("--layers", type=int, default=24, help="--memory: transformer layers (of Qwen2-0.5B's 24)")
    ap.add_argument("--batch", type=int, default=4, help="--memory: sequences per step")
    ap.add_argument("--response", type=int, default=128, help="--memory: response tokens per sequence")
    ap.add_argument("--chunk", type=int, default=128, help="--memory: algorithm.logits_chunk_tokens of 'after'")
    ap.add_argument("--model", default="qwen2-0.5b-shaped",
                    help="--memory: qwen2-0.5b-shaped (random), a model directory, or a pulled model's name")
    ap.add_argument("--bf16", default="off", choices=["on", "off"], help="--memory: algorithm.bf16 (autocast)")
    ap.add_argument("--shared", action="store_true",
                    help="prompts shared (algorithm.share_prompts) against one forward per sequence, on grouped "
                         "minibatches; --preset tiny-64, small-long or smollm2-addition")
    args = ap.parse_args()
    if args.memory:
        return memory_main(args)
    if args.shared:
        return shared_main(args)
    p = PRESETS[args.preset]
    gpu = torch.cuda.is_available()

    from ray.rllib.policy.sample_batch import MultiAgentBatch, SampleBatch

    from cluster.trainer import build_batch
    from policies.columns import ADVANTAGES, OLD_LOGP, OLD_VALUES, RETURNS
    from policies.config import AlgorithmConfig, PolicyConfig
    from policies.learner import MODULE_ID, build_learner_group
    from policies.losses import ppo_clip, value_loss
    from policies.models import load_causal_lm, save_tiny_policy

    B, P, R = p["batch"], p["P"], p["R"]
    alphabet = "abcdefghijklmnopqrstuvwxyz0123456789=+"
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = save_tiny_policy(tmp, alphabet, seed=0, arch=p["arch"], hidden_size=p["hidden_size"],
                                     num_layers=p["num_layers"], num_heads=p["num_heads"],
                                     intermediate_size=p["intermediate_size"], max_positions=P + R + 8)
        algo = AlgorithmConfig(minibatch_size=B, num_epochs=1)
        group = build_learner_group(algo, PolicyConfig(arch=p["arch"]), str(model_dir), 0, 1 if gpu else 0)
        rng = np.random.default_rng(0)
        V = len(alphabet) + 2
        rollouts = {
            "prompt_ids": rng.integers(2, V, (B, P)), "prompt_length": np.full(B, P),
            "response_ids": rng.integers(2, V, (B, R)), "response_length": np.full(B, R),
            "rewards": rng.random((B, R)).astype(np.float32), "sampling_logp": np.zeros((B, R), np.float32),
        }
        batch = build_batch(rollouts)
        batch[OLD_LOGP] = np.full((B, R), -3.0, np.float32)
        batch[OLD_VALUES] = np.zeros((B, R), np.float32)
        batch[ADVANTAGES] = rng.standard_normal((B, R)).astype(np.float32)
        batch[RETURNS] = rng.random((B, R)).astype(np.float32)
        mab = MultiAgentBatch({MODULE_ID: SampleBatch(batch)}, env_steps=B)

        device = torch.device("cuda" if gpu else "cpu")
        lm = load_causal_lm(model_dir).to(device).train()
        head = torch.nn.Linear(lm.config.hidden_size, 1).to(device)
        params = list(lm.parameters()) + list(head.parameters())
        opt = torch.optim.Adam(params, lr=algo.lr, eps=algo.adam_eps, fused=True)  # plain torch's fastest
        t = {k: torch.from_numpy(v).to(device) for k, v in batch.items()}

        def bare_step() -> None:
            hidden = lm.base_model(input_ids=t["input_ids"], attention_mask=t["attention_mask"],
                                   position_ids=t["position_ids"]).last_hidden_state[:, -R - 1 : -1]
            logp_all = torch.log_softmax(lm.get_output_embeddings()(hidden).float(), -1)
            logp = logp_all.gather(-1, t["input_ids"][:, -R:].unsqueeze(-1)).squeeze(-1)
            entropy = -(logp_all.exp() * logp_all).sum(-1)
            values = head(hidden.float()).squeeze(-1)
            mask = t["response_mask"]
            loss, _ = ppo_clip(logp, t[OLD_LOGP], t[ADVANTAGES], mask, 0.2, "token_mean")
            loss = loss - 0.01 * (entropy * mask).sum() / mask.sum()
            loss = loss + 0.5 * value_loss(values, t[OLD_VALUES], t[RETURNS], mask, 0.2, "token_mean")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0, foreach=True)
            opt.step()

        def ours_step() -> None:
            group.update(batch=mab, num_epochs=1, minibatch_size=B, shuffle_batch_per_epoch=False)

        def timed(fn) -> float:
            if gpu:
                torch.cuda.synchronize()
            start = time.perf_counter()
            fn()
            if gpu:
                torch.cuda.synchronize()
            return time.perf_counter() - start

        for _ in range(3):  # warm-up
            bare_step(), ours_step()
        bare, ours = [], []
        for _ in range(args.repeats):
            bare.append(timed(bare_step))
            ours.append(timed(ours_step))
        group.shutdown()

    tokens = B * (P + R)
    params_m = sum(x.numel() for x in lm.parameters()) / 1e6
    b, o = statistics.median(bare), statistics.median(ours)
    print(f"preset {args.preset}: {params_m:.1f}M params, batch {B} x {P + R} tokens, device {device}, "
          f"median of {args.repeats}")
    print(f"  bare torch step  {b * 1e3:9.1f} ms  {tokens / b:>12,.0f} tokens/s")
    print(f"  RLlib learner    {o * 1e3:9.1f} ms  {tokens / o:>12,.0f} tokens/s")
    print(f"  overhead (learner / bare time) = {o / b:.2f}x  (goal <= 1.3x)")


if __name__ == "__main__":
    main()
