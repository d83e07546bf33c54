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
# The same game, except that a secret written "fail" makes the task raise in the middle of its episode.
FAILING = EnvConfig(id=ENV.id, task="tests.multiturn_reference:GuessOrFailTask", task_kwargs=ENV.task_kwargs)


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


def test_each_episode_of_a_batch_is_the_one_played_alone(ray_session, guess_model: Path) -> None:
    """Turns are scheduled per episode (a turn joins the engine as soon as its episode's last turn is stepped),
    which changes when a turn runs, never what it samples: every episode of a batch is token for token the same
    episode played alone, one ``LLM.generate`` call per turn. A task that raises mid-rollout leaves no request
    behind in the engine: the next calls run as if it had not happened."""
    import ray

    from tests.multiturn_reference import AloneRolloutActor

    engine = EngineOptions(str(guess_model), "float32", 64, 64, 1.0, 1, 0.3, True, 0)
    actor = ray.remote(num_cpus=1)(AloneRolloutActor).remote(0, FAILING, engine)
    try:
        ray.get(actor.ready.remote())
        batched = ray.get(actor.sample.remote(16, 2, 5, 0))
        posed = [TaskSample("0-9:", "fail")] + [TaskSample("0-9:", str(d)) for d in range(10)]
        with pytest.raises(ray.exceptions.RayTaskError, match="failed on purpose"):
            ray.get(actor.respond.remote(posed, 1.0, 0, 0))
        again = ray.get(actor.sample.remote(16, 2, 5, 0))
        alone = ray.get(actor.play_alone.remote(16, 2, 5))
    finally:
        ray.kill(actor)
    turns = [ep["turn_lengths"] for ep in alone]
    assert len({len(t) for t in turns}) > 1 and len({t[0] for t in turns}) > 1, turns  # lock-step would differ
    for key in ("response_ids", "action_mask", "sampling_logp", "rewards", "score"):
        np.testing.assert_array_equal(again[key], batched[key], err_msg=key)
    for n, ep in enumerate(alone):
        L = batched["response_length"][n]
        assert batched["response_ids"][n, :L].tolist() == ep["tokens"], n
        assert batched["action_mask"][n, :L].tolist() == ep["actions"], n
        np.testing.assert_array_equal(batched["sampling_logp"][n, :L], np.float32(ep["logp"]), err_msg=str(n))
        np.testing.assert_array_equal(batched["rewards"][n, :L][batched["action_mask"][n, :L] > 0],
                                      np.float32(ep["rewards"]), err_msg=str(n))
        assert batched["score"][n] == ep["score"], n
