"""Batched terminal rewards (the protocol a reward model plugs into), with fake scorers and no Ray.

``replay(..., defer=True)`` followed by one ``score_pending`` call must give exactly the rewards that stepping the
environment alone gives (one ``score_batch([ctx])`` per episode), including the error paths.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from gymnasium.utils.env_checker import check_env

from textenv import (
    DeferredReward, RewardContext, RewardError, RewardServiceError, TaskSample, TokenEnv, make_task, replay, score_pending,
)

SAMPLE = TaskSample("abcde=", "edcba")
RESPONSES = ["edcba", "edc", "eaaaa", "h", "edcbaab"]  # right, short (EOS), wrong, one letter, truncated


class FakeScorer:
    """A fake batched reward: 0.1 per response character; records the size of every call."""

    def __init__(self) -> None:
        self.calls: list[int] = []

    def score_batch(self, ctxs: list[RewardContext]) -> list[float]:
        assert all(c.done for c in ctxs)  # only finished episodes are scored
        self.calls.append(len(ctxs))
        return [0.1 * len(c.response_text) for c in ctxs]


class FakeFlakyScorer(FakeScorer):
    """A fake that returns NaN for responses starting with 'h'."""

    def score_batch(self, ctxs: list[RewardContext]) -> list[float]:
        scores = super().score_batch(ctxs)
        return [math.nan if c.response_text.startswith("h") else s for s, c in zip(scores, ctxs)]


class FakeBrokenScorer(FakeScorer):
    """A fake whose every call fails, or returns one score too few."""

    def __init__(self, how: str) -> None:
        super().__init__()
        self.how = how

    def score_batch(self, ctxs: list[RewardContext]) -> list[float]:
        if self.how == "raise":
            raise ConnectionError("scorer unreachable")
        return super().score_batch(ctxs)[:-1]


def tokens(env: TokenEnv, text: str) -> list[int]:
    return env.tokenizer.encode(text) + ([env.tokenizer.eos_token_id] if len(text) < 5 else [])


def replay_all(env: TokenEnv, defer: bool) -> list[dict]:
    return [replay(env, SAMPLE, tokens(env, text), defer=defer) for text in RESPONSES]


def test_deferred_batch_equals_per_episode_scoring() -> None:
    scorer = FakeScorer()
    env = TokenEnv("reverse", batch_reward=scorer)
    plain = replay_all(TokenEnv("reverse"), defer=False)

    one_by_one = replay_all(env, defer=False)
    assert scorer.calls == [1] * len(RESPONSES) and all(ep["pending"] is None for ep in one_by_one)

    scorer.calls.clear()
    batched = replay_all(env, defer=True)
    assert scorer.calls == [] and all(isinstance(ep["pending"], RewardContext) for ep in batched)
    assert score_pending(env, batched) == len(RESPONSES)
    assert scorer.calls == [len(RESPONSES)]  # one call for every episode

    for text, p, a, b in zip(RESPONSES, plain, one_by_one, batched):
        bonus = 0.1 * len(text[:5])  # the response text the scorer saw: EOS is not text, truncation stops at 5
        np.testing.assert_allclose(a["rewards"], b["rewards"], atol=1e-6)
        np.testing.assert_allclose(b["rewards"][:-1], p["rewards"][:-1])  # the task's per-token rewards are kept
        assert b["rewards"][-1] == pytest.approx(p["rewards"][-1] + bonus, abs=1e-6)
        assert a["score"] == b["score"] == p["score"]  # the score stays the task's verifier
        assert b["pending"] is None and b["reward_errors"] == 0
    assert score_pending(env, batched) == 0  # nothing left to score


def test_step_alone_scores_each_episode() -> None:
    scorer = FakeScorer()
    env = TokenEnv("reverse", reward_mode="terminal", batch_reward=scorer)
    check_env(env, skip_render_check=True)
    scorer.calls.clear()
    env.reset(options={"sample": SAMPLE})
    rewards = [env.step(t)[1] for t in env.tokenizer.encode("edcba")]
    assert rewards[:-1] == [0.0] * 4 and rewards[-1] == pytest.approx(1.0 + 0.5)
    assert scorer.calls == [1]


def test_batched_reward_fn_replaces_the_task_reward() -> None:
    scorer = FakeScorer()
    env = TokenEnv("reverse", reward_fn=scorer)
    assert isinstance(env.reward_fn, DeferredReward) and env.reward_fn.base is None
    eps = replay_all(env, defer=True)
    score_pending(env, eps)
    for text, ep in zip(RESPONSES, eps):
        expected = np.zeros(ep["length"])
        expected[-1] = 0.1 * len(text[:5])
        np.testing.assert_allclose(ep["rewards"], expected, atol=1e-6)
    with pytest.raises(ValueError, match="already a batched reward"):
        TokenEnv("reverse", reward_fn=scorer, batch_reward=FakeScorer())
    with pytest.raises(TypeError, match="score_batch"):
        DeferredReward(object())  # type: ignore[arg-type]


def test_non_finite_batched_score_raises_naming_task_function_and_prompt() -> None:
    env = TokenEnv("reverse", batch_reward=FakeFlakyScorer())
    eps = replay_all(env, defer=True)
    before = [ep["rewards"].copy() for ep in eps]
    with pytest.raises(RewardError, match="not a finite number") as err:
        score_pending(env, eps)
    msg = str(err.value)
    assert "FakeFlakyScorer" in msg and "'reverse'" in msg and "'abcde='" in msg
    for b, ep in zip(before, eps):  # nothing was changed before raising
        np.testing.assert_array_equal(b, ep["rewards"])
    with pytest.raises(RewardError, match="FakeFlakyScorer"):  # the per-episode path raises the same error
        replay(env, SAMPLE, tokens(env, "h"))


def test_failure_value_only_for_the_failed_episode() -> None:
    task = make_task("reverse")
    task.failure_value = -1.0
    env = TokenEnv(task, batch_reward=FakeFlakyScorer(), on_reward_error="failure_value")
    batched = replay_all(env, defer=True)
    score_pending(env, batched)
    one_by_one = replay_all(env, defer=False)
    for text, a, b in zip(RESPONSES, one_by_one, batched):
        np.testing.assert_allclose(a["rewards"], b["rewards"], atol=1e-6)
        assert (a["score"], a["reward_errors"]) == (b["score"], b["reward_errors"])
        if text == "h":
            assert b["rewards"][-1] == -1.0 and b["score"] == -1.0 and b["reward_errors"] == 1
        else:
            assert b["reward_errors"] == 0 and b["score"] >= 0


@pytest.mark.parametrize("how", ["raise", "short"])
def test_a_failed_batch_call_fails_every_episode(how: str) -> None:
    task = make_task("reverse")
    task.failure_value = -1.0
    env = TokenEnv(task, batch_reward=FakeBrokenScorer(how), on_reward_error="failure_value")
    eps = replay_all(env, defer=True)
    score_pending(env, eps)
    assert [ep["reward_errors"] for ep in eps] == [1] * len(RESPONSES)
    assert all(ep["rewards"][-1] == -1.0 for ep in eps)

    strict = TokenEnv("reverse", batch_reward=FakeBrokenScorer(how))
    expected = "raised ConnectionError: scorer unreachable" if how == "raise" else "returned 4 scores for 5 episodes"
    with pytest.raises(RewardError, match=expected):
        score_pending(strict, replay_all(strict, defer=True))


def test_a_batched_reward_is_named_by_its_name_attribute_else_its_class() -> None:
    named = FakeBrokenScorer("raise")
    named.name = "reward model 'models/rm'"  # what cluster.reward_model.RewardModelReward calls itself
    for scorer, where in ((named, "reward model 'models/rm'"),
                          (FakeBrokenScorer("raise"), f"batched reward {__name__}:FakeBrokenScorer")):
        env = TokenEnv("reverse", batch_reward=scorer)
        with pytest.raises(RewardError) as err:
            score_pending(env, replay_all(env, defer=True))
        assert str(err.value) == (f"{where} of task 'reverse' raised ConnectionError: scorer unreachable on prompt "
                                  "'abcde='")


class FakeLostService(FakeScorer):
    """A fake batched reward whose service is gone (as a lost reward-model actor is)."""

    def score_batch(self, ctxs: list[RewardContext]) -> list[float]:
        raise RewardServiceError("the reward service was lost")


@pytest.mark.parametrize("on_error", ["raise", "failure_value"])
def test_a_lost_reward_service_is_neither_a_reward_error_nor_a_failure_value(on_error: str) -> None:
    # The caller (cluster/: the rollout group) recovers from it: it waits for the service and redoes the rollout.
    env = TokenEnv("reverse", batch_reward=FakeLostService(), on_reward_error=on_error)
    with pytest.raises(RewardServiceError, match="was lost"):
        score_pending(env, replay_all(env, defer=True))
    with pytest.raises(RewardServiceError, match="was lost"):
        replay_all(env, defer=False)  # scored episode by episode: the same
