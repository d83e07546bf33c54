"""Replay cost: tokens/s through TokenEnv.step() per built-in task, and replay time vs vLLM generation time.

Part 1 (no Ray): each task runs 2,048 responses of its own length (random tokens) through ``env.step()`` and
through ``textenv.replay`` (which skips building observations).
Part 2 (Ray + vLLM): one rollout actor of the default experiment samples 256 prompts x 5 tokens, 10 times;
the actor times its vLLM ``generate`` call and its replays of the same responses side by side in each call.
Goal (issue 3): replay / generation <= 0.05.

    .venv/bin/python bench/env_replay.py
"""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path

import gymnasium as gym
import numpy as np

import textenv


def step_throughput(env_id: str, episodes: int = 2048) -> tuple[float, float]:
    """(tokens/s through env.step(), tokens/s through textenv.replay) on the same responses."""
    env = gym.make(env_id).unwrapped
    env.reset(seed=0)
    rng = np.random.default_rng(0)
    samples = []
    for _ in range(episodes):
        env.reset()
        samples.append(env.sample)
    R, V = env.max_response_tokens, env.action_space.n
    responses = rng.integers(2, V, size=(episodes, R))  # no EOS: every episode runs to the length limit
    start = time.perf_counter()
    tokens = 0
    for s, r in zip(samples, responses):
        env.reset(options={"sample": s})
        for t in r:
            tokens += 1
            if any(env.step(int(t))[2:4]):
                break
    step_tps = tokens / (time.perf_counter() - start)
    start = time.perf_counter()
    tokens = sum(textenv.replay(env, s, r)["length"] for s, r in zip(samples, responses))
    return step_tps, tokens / (time.perf_counter() - start)


def replay_vs_generation(rounds: int = 10) -> tuple[float, float]:
    import ray

    from cluster.config import load_config
    from cluster.rollout import EngineOptions, RolloutGroup
    from cluster.run import prepare_policy

    cfg = load_config()
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = prepare_policy(cfg, Path(tmp))
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
        engine = EngineOptions(str(model_dir), "float32", 11, 256, 1.0, 1, 0.3, True, 0)
        group = RolloutGroup(1, cfg.env, engine, 0)
        gen, rep = [], []
        for i in range(rounds):
            out = group.sample(cfg.rollout.prompts_per_iteration, 1, seed=i, version=0)
            gen.append(out["generate_s"])
            rep.append(out["replay_s"])
        group.shutdown()
        ray.shutdown()
    return statistics.median(gen), statistics.median(rep)


def main() -> None:
    print("part 1: tokens/s, 2,048 episodes per task: env.step() (with observations) | textenv.replay (without)")
    for env_id in textenv.ENV_IDS:
        step_tps, replay_tps = step_throughput(env_id)
        print(f"  {env_id:24s} step {step_tps:>10,.0f} tokens/s   replay {replay_tps:>10,.0f} tokens/s")
    gen, rep = replay_vs_generation()
    print("part 2: default experiment, 256 prompts x 5 tokens, one vLLM actor, median of 10 rounds")
    print(f"  vLLM generate {gen * 1e3:8.1f} ms   env replay {rep * 1e3:8.1f} ms   replay/generate = {rep / gen:.3f}"
          f"  (goal <= 0.05)")


if __name__ == "__main__":
    main()
