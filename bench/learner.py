"""Learner overhead: tokens/s of one RLlib update step vs a bare torch step of the same model and batch.

"ours": ``LearnerGroup.update`` with one minibatch (the RLlib learner: batch conversion, the TransformerPolicy
RLModule's forward, the registered PPO objective + value loss + entropy, backward, gradient clipping, Adam, metrics).
"bare": the same HF model and value head, the same response-only log-prob/entropy/value computation and PPO loss,
backward, clip, Adam, written directly in torch. The two alternate, and the medians are compared.
Goal (issue 4): ours / bare time <= 1.3.

    .venv/bin/python bench/learner.py                      # tiny default policy on CPU
    .venv/bin/python bench/learner.py --preset qwen2-0.5b   # ~0.5B Qwen2 built from its config (use a GPU)
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import numpy as np
import torch

PRESETS = {
    "tiny": dict(arch="llama", hidden_size=128, num_layers=2, num_heads=4, intermediate_size=256, batch=256, P=6, R=5),
    "small": dict(arch="llama", hidden_size=512, num_layers=4, num_heads=8, intermediate_size=1024, batch=32, P=64, R=64),
    "qwen2-0.5b": dict(arch="qwen2", hidden_size=896, num_layers=24, num_heads=14, intermediate_size=4864, batch=16,
                       P=256, R=256),
}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="tiny", choices=sorted(PRESETS))
    ap.add_argument("--repeats", type=int, default=15)
    args = ap.parse_args()
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
        opt = torch.optim.Adam(params, lr=algo.lr, eps=algo.adam_eps)
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
            torch.nn.utils.clip_grad_norm_(params, 1.0)
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
