"""Property test: any sequence of actions, valid or not, either steps or raises one of the documented errors."""

from __future__ import annotations

import math

import gymnasium as gym
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import textenv

ENV_IDS = sorted(textenv.ENV_IDS)
MAX_VOCAB = max(gym.make(i).unwrapped.action_space.n for i in ENV_IDS)

NON_INTS = st.sampled_from([1.5, "a", None, True, np.float32(2.0), np.array([2]), [3], b"\x02"])
INTS = st.integers(-3, MAX_VOCAB + 3)
ACTIONS = st.lists(st.one_of(INTS, INTS.map(np.int64), NON_INTS), min_size=1, max_size=40)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(env_id=st.sampled_from(ENV_IDS), seed=st.integers(0, 2**31), actions=ACTIONS)
def test_any_action_sequence(env_id, seed, actions):
    env = gym.make(env_id).unwrapped
    n = env.action_space.n
    obs, info = env.reset(seed=seed)
    assert obs in env.observation_space
    prompt_len, steps, done, episodes = int(obs["prompt_length"]), 0, False, 0
    for action in actions:
        if done:
            with pytest.raises(RuntimeError, match="after the episode ended"):
                env.step(action)
            obs, info = env.reset()
            assert obs in env.observation_space
            prompt_len, steps, done = int(obs["prompt_length"]), 0, False
            episodes += 1
            continue
        if isinstance(action, bool) or not isinstance(action, (int, np.integer)):
            with pytest.raises(TypeError):
                env.step(action)
        elif not 0 <= action < n:
            with pytest.raises(ValueError, match=rf"action {int(action)}\b.*Discrete\({n}\)"):
                env.step(action)
        else:
            result = env.step(action)
            assert isinstance(result, tuple) and len(result) == 5
            obs, reward, terminated, truncated, info = result
            at = prompt_len + steps  # where this action landed; a multi-turn reply follows it as non-action tokens
            steps += 1 + len(info.get("env_tokens", []))
            assert obs in env.observation_space
            assert int(obs["length"]) == prompt_len + steps and obs["tokens"][at] == action
            assert obs["action_mask"][at] == 1 and not obs["action_mask"][at + 1 : prompt_len + steps].any()
            assert isinstance(reward, float) and math.isfinite(reward)
            assert isinstance(terminated, bool) and isinstance(truncated, bool) and not (terminated and truncated)
            if action == env.tokenizer.eos_token_id:
                assert terminated
            assert truncated == (not terminated and steps >= env.max_response_tokens)
            done = terminated or truncated
            if done:
                assert 0.0 <= info["score"] <= 1.0 and info["response"] == env.tokenizer.decode(
                    obs["tokens"][prompt_len : prompt_len + steps].tolist()
                )
    # whatever happened, the env can start over
    obs, _ = env.reset(seed=seed)
    assert obs in env.observation_space
