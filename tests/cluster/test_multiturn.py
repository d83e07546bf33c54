"""Multi-turn rollouts: vLLM plays the policy's turns, the environment's replies are context, not actions."""

from __future__ import annotations

from pathlib import Path

import gymnasium as gym
import numpy as np
import pytest

from cluster.rollout import EngineOptions, RolloutGroup
from cluster.trainer import build_batch
from policies.columns import ATTENTION_MASK, OLD_LOGP, RESPONSE_MASK, SAMPLING_LOGP
from policies.config import AlgorithmConfig, PolicyConfig
from policies.learner import build_learner_group, group_rollout_stats
from policies.models import save_tiny_policy
from tests.conftest import TINY
from textenv import EnvConfig, TaskSample

pytestmark = [pytest.mark.ray, pytest.mark.vllm]
ENV = EnvConfig(id="textenv/GuessNumber-v0", task_kwargs={"high": 9, "max_turns": 4})


@pytest.fixture(scope="module")
def guess_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    alphabet = gym.make(ENV.id).unwrapped.task.alphabet
    return save_tiny_policy(tmp_path_factory.mktemp("guess"), alphabet, seed=0, arch="llama", **TINY)


@pytest.fixture(scope="module")
def rollouts(ray_session, guess_model: Path) -> dict:
    engine = EngineOptions(str(guess_model), "float32", 64, 64, 1.0, 1, 0.3, True, 0)
    group = RolloutGroup(1, ENV, engine, 0)
    try:
        return group.sample(24, 2, seed=0, version=0)
    finally:
        group.shutdown()


def test_replies_are_the_environments_and_not_actions(rollouts: dict, guess_model: Path) -> None:
    from policies.models import load_tokenizer
    from textenv import HFTokenizerAdapter

    tok = HFTokenizerAdapter(load_tokenizer(guess_model))
    env = gym.make(ENV.id, tokenizer=tok).unwrapped
    saw_reply = False
    for n in range(len(rollouts["score"])):
        L = rollouts["response_length"][n]
        tokens, actions = rollouts["response_ids"][n, :L], rollouts["action_mask"][n, :L].astype(bool)
        prompt = tok.decode(rollouts["prompt_ids"][n, -rollouts["prompt_length"][n]:].tolist())
        # Replay the policy's tokens alone through a fresh environment, for every secret: the ones that reproduce the
        # recorded reply tokens are consistent with it, and the recorded rewards must be those of one of them.
        candidates = []
        for secret in range(10):
            env.reset(options={"sample": TaskSample(prompt, str(secret))})
            replayed, rewards = [], []
            for t in tokens[actions]:
                _, r, term, trunc, info = env.step(int(t))
                replayed += [int(t), *info.get("env_tokens", [])]
                rewards.append(r)
                if term or trunc:
                    break
            if replayed == tokens.tolist():
                candidates.append(np.asarray(rewards, np.float32))
        assert candidates, f"row {n}: no secret reproduces {tok.decode(tokens.tolist())!r}"
        assert any(np.allclose(rollouts["rewards"][n, :L][actions], c, atol=1e-6) for c in candidates)
        saw_reply |= bool((~actions).any())
        assert (rollouts["rewards"][n, :L][~actions] == 0).all()
        assert rollouts["rewards"][n].sum() == pytest.approx(rollouts["score"][n])
        assert (rollouts["sampling_logp"][n, :L][~actions] == 0).all()
    assert saw_reply, "some episodes must have had at least one environment reply"


def test_learner_sees_the_same_context_as_vllm(rollouts: dict, guess_model: Path) -> None:
    batch = build_batch(rollouts)
    mask = batch[RESPONSE_MASK] > 0
    real = batch[ATTENTION_MASK][:, -mask.shape[1]:] > 0
    assert (mask <= real).all() and (real & ~mask).any()  # replies are attended to but are not actions
    group = build_learner_group(AlgorithmConfig(), PolicyConfig(), str(guess_model), 0, 0)
    stats = group_rollout_stats(group, batch, 64)
    group.shutdown()
    assert np.abs(stats[OLD_LOGP] - batch[SAMPLING_LOGP])[mask].mean() < 1e-3
