"""TokenEnv: the Gymnasium contract, determinism, episode ends, rewards, reward functions and bad input."""

from __future__ import annotations

import gymnasium as gym
import numpy as np
import pytest
from gymnasium.utils.env_checker import check_env

import reward_fns
import textenv
from textenv import EnvConfig, RewardError, TaskSample, TokenEnv, make_env, make_task, replay

ENV_IDS = sorted(textenv.ENV_IDS)
EOS = 1


def ids(env: TokenEnv, text: str) -> list[int]:
    return env.tokenizer.encode(text)


def random_actions(env: TokenEnv, rng: np.random.Generator, n: int) -> list[int]:
    """Valid actions, biased away from EOS so that episodes are not all one token long."""
    return [int(rng.integers(2, env.action_space.n)) if rng.random() > 0.1 else EOS for _ in range(n)]


def rollout(env: TokenEnv, actions: list[int]) -> list[tuple]:
    out = []
    for a in actions:
        obs, reward, terminated, truncated, info = env.step(a)
        out.append((obs["tokens"].tolist(), int(obs["length"]), reward, terminated, truncated, info))
        if terminated or truncated:
            break
    return out


# ------------------------------------------------------------------------------------------------ Gymnasium API
@pytest.mark.parametrize("env_id", ENV_IDS)
def test_check_env(env_id):
    env = gym.make(env_id)
    check_env(env.unwrapped, skip_render_check=True)
    assert isinstance(env.unwrapped, TokenEnv)
    assert env.unwrapped.task.name == textenv.ENV_IDS[env_id]


def test_check_env_user_task(monkeypatch, request):
    monkeypatch.syspath_prepend(str(request.path.parent))
    check_env(TokenEnv(task="user_tasks:EchoTask"), skip_render_check=True)


@pytest.mark.parametrize("env_id", ENV_IDS)
def test_reset_observation(env_id):
    env = gym.make(env_id).unwrapped
    obs, info = env.reset(seed=0)
    assert obs in env.observation_space
    prompt_ids = env.tokenizer.encode(info["prompt"])
    n = len(prompt_ids)
    assert int(obs["prompt_length"]) == int(obs["length"]) == n
    assert obs["tokens"][:n].tolist() == prompt_ids
    assert (obs["tokens"][n:] == env.tokenizer.pad_token_id).all()
    assert obs["tokens"].shape == (env.max_prompt_tokens + env.max_response_tokens,)
    assert env.sample == TaskSample(info["prompt"], info["answer"], env.sample.metadata)


def test_step_appends_the_token():
    env = TokenEnv("reverse")
    obs0, _ = env.reset(options={"prompt": "abcde=", "answer": "edcba"})
    obs, *_ = env.step(ids(env, "e")[0])
    assert obs["tokens"][:7].tolist() == ids(env, "abcde=e")
    assert int(obs["length"]) == 7 and int(obs["prompt_length"]) == 6
    assert obs0["tokens"][6] == env.tokenizer.pad_token_id  # the reset observation is a copy, not a view


def test_render_ansi():
    env = TokenEnv("reverse", render_mode="ansi")
    env.reset(options={"prompt": "abcde=", "answer": "edcba"})
    for t in ids(env, "ed"):
        env.step(t)
    assert env.render() == "abcde=ed"


# ------------------------------------------------------------------------------------------------ determinism
@pytest.mark.parametrize("env_id", ENV_IDS)
def test_seeded_rollout_is_deterministic(env_id):
    a, b = gym.make(env_id).unwrapped, gym.make(env_id).unwrapped
    rng = np.random.default_rng(1)
    for episode in range(4):
        seed = 1234 if episode == 0 else None  # later resets continue the seeded np_random
        obs_a, info_a = a.reset(seed=seed)
        obs_b, info_b = b.reset(seed=seed)
        assert info_a == info_b
        for key in obs_a:
            np.testing.assert_array_equal(obs_a[key], obs_b[key])
        actions = random_actions(a, rng, a.max_response_tokens)
        ra, rb = rollout(a, actions), rollout(b, actions)
        assert ra == rb
        assert ra[-1][3] or ra[-1][4]  # the episode ended within max_response_tokens valid actions


@pytest.mark.parametrize("env_id", ENV_IDS)
def test_different_seeds_give_different_problems(env_id):
    env = gym.make(env_id).unwrapped
    problem = lambda info: (info["prompt"], info["answer"])  # noqa: E731  (GuessNumber's prompt is fixed; its secret is not)
    problems = [problem(env.reset(seed=seed)[1]) for seed in range(20)]
    assert len(set(problems)) >= (6 if env_id == "textenv/GuessNumber-v0" else 15)  # 10 secrets, 20 draws
    assert [problem(env.reset(seed=seed)[1]) for seed in range(20)] == problems


def test_sync_vector_env():
    n = 3
    envs = gym.vector.SyncVectorEnv([lambda: gym.make("textenv/Reverse-v0") for _ in range(n)])
    single = envs.single_observation_space["tokens"].shape[0]
    assert single == 6 + 5
    obs, infos = envs.reset(seed=7)
    assert obs["tokens"].shape == (n, single) and obs["tokens"].dtype == np.int64
    assert obs["prompt_length"].shape == (n,) and (obs["prompt_length"] == 6).all()
    assert len(infos["prompt"]) == n
    envs.action_space.seed(7)
    for step in range(1, 5):
        actions = envs.action_space.sample()
        assert actions.shape == (n,)
        obs, rewards, terminated, truncated, infos = envs.step(actions)
        assert obs["tokens"].shape == (n, single)
        assert rewards.shape == terminated.shape == truncated.shape == (n,)
        assert terminated.dtype == truncated.dtype == np.bool_
        assert np.isfinite(rewards).all()
    # same seed, same prompts
    _, infos2 = envs.reset(seed=7)
    assert list(infos2["prompt"]) == list(gym.vector.SyncVectorEnv(
        [lambda: gym.make("textenv/Reverse-v0") for _ in range(n)]).reset(seed=7)[1]["prompt"])
    envs.close()


# ------------------------------------------------------------------------------------------------ episode ends
def test_eos_terminates():
    env = TokenEnv("reverse")
    env.reset(options={"prompt": "abcde=", "answer": "edcba"})
    for t in ids(env, "ed"):
        assert env.step(t)[2:4] == (False, False)
    _, reward, terminated, truncated, info = env.step(EOS)
    assert (terminated, truncated) == (True, False)
    assert info["response"] == "ed" and info["score"] == pytest.approx(0.4)
    assert reward == pytest.approx(0.0)  # per-token: "ed" was already paid for


def test_length_limit_truncates():
    env = TokenEnv("reverse")
    env.reset(options={"prompt": "abcde=", "answer": "edcba"})
    results = [env.step(t) for t in ids(env, "aaaaa")]
    assert [r[2] for r in results] == [False] * 5
    assert [r[3] for r in results] == [False] * 4 + [True]
    assert results[-1][4]["response"] == "aaaaa"


def test_max_response_tokens_override_truncates():
    env = TokenEnv("reverse", max_response_tokens=2)
    env.reset(options={"prompt": "abcde=", "answer": "edcba"})
    assert env.step(2)[2:4] == (False, False)
    assert env.step(2)[2:4] == (False, True)


def test_eos_at_the_length_limit_is_terminated_not_truncated():
    env = TokenEnv("reverse")
    env.reset(options={"prompt": "abcde=", "answer": "edcba"})
    for t in ids(env, "edcb"):
        env.step(t)
    assert env.step(EOS)[2:4] == (True, False)


def test_bracket_stops_itself_at_closing_parenthesis():
    env = gym.make("textenv/Bracket-v0").unwrapped
    env.reset(options={"sample": TaskSample("abc!", "(abc)")})
    out = [env.step(t) for t in ids(env, "(ab)")]
    assert [(o[2], o[3]) for o in out] == [(False, False)] * 3 + [(True, False)]
    assert out[-1][4] == {"response": "(ab)", "score": 0.5}
    assert sum(o[1] for o in out) == pytest.approx(0.5)
    with pytest.raises(RuntimeError):
        env.step(ids(env, "c")[0])


def test_bracket_correct_answer_via_replay():
    env = gym.make("textenv/Bracket-v0").unwrapped
    sample = TaskSample("abc!", "(abc)")
    r = replay(env, sample, ids(env, "(abc)") + ids(env, "aa"))  # tokens after ")" are not consumed
    assert (r["length"], r["terminated"], r["truncated"], r["score"]) == (5, True, False, 1.0)
    assert r["rewards"].sum() == pytest.approx(1.0)


# ------------------------------------------------------------------------------------------------ rewards
def test_reverse_correct_answer_earns_point_two_per_token():
    env = gym.make("textenv/Reverse-v0").unwrapped
    r = replay(env, TaskSample("abcde=", "edcba"), ids(env, "edcba"))
    np.testing.assert_allclose(r["rewards"], [0.2] * 5, atol=1e-6)
    assert r["rewards"].sum() == pytest.approx(1.0)
    assert r["score"] == pytest.approx(1.0)
    assert (r["length"], r["terminated"], r["truncated"], r["reward_errors"]) == (5, False, True, 0)


@pytest.mark.parametrize(
    ("mode", "expected"), [("per_token", [0.2, 0.2, 0.0, 0.2, 0.2]), ("terminal", [0.0, 0.0, 0.0, 0.0, 0.8])]
)
def test_reverse_hand_computed_rewards(mode, expected):
    env = TokenEnv("reverse", reward_mode=mode)
    r = replay(env, TaskSample("abcde=", "edcba"), ids(env, "edaba"))
    np.testing.assert_allclose(r["rewards"], expected, atol=1e-6)
    assert r["score"] == pytest.approx(0.8)


@pytest.mark.parametrize("env_id", ENV_IDS)
def test_per_token_and_terminal_returns_agree(env_id):
    per_token = gym.make(env_id).unwrapped
    terminal = gym.make(env_id, reward_mode="terminal").unwrapped
    rng = np.random.default_rng(0)
    per_token.reset(seed=0)
    for _ in range(25):
        per_token.reset()
        sample = per_token.sample
        n = per_token.max_response_tokens
        # half the time the right answer (with EOS when there is room), else random tokens
        if rng.random() < 0.5:
            response = ids(per_token, sample.answer)[:n] + [EOS]
        else:
            response = [int(t) for t in rng.integers(0, per_token.action_space.n, size=n)]
        rp, rt = replay(per_token, sample, response), replay(terminal, sample, response)
        assert rp["length"] == rt["length"] and rp["score"] == rt["score"]
        assert rp["rewards"].sum() == pytest.approx(rt["rewards"].sum(), abs=1e-6)
        assert rp["rewards"].sum() == pytest.approx(rp["score"], abs=1e-6)
        assert (rt["rewards"][:-1] == 0).all()
        assert rt["rewards"][-1] == pytest.approx(rt["score"])
        assert 0.0 <= rp["score"] <= 1.0


@pytest.mark.parametrize("env_id", ENV_IDS)
def test_correct_answer_scores_one(env_id):
    env = gym.make(env_id).unwrapped
    env.reset(seed=3)
    for _ in range(5):
        env.reset()
        r = replay(env, env.sample, ids(env, env.sample.answer) + [EOS])
        assert r["score"] == 1.0 and r["rewards"].sum() == pytest.approx(1.0)


def test_bad_reward_mode():
    with pytest.raises(ValueError, match="reward mode"):
        TokenEnv("reverse", reward_mode="sometimes")


# ------------------------------------------------------------------------------------------------ reward functions
@pytest.mark.parametrize("how", ["callable", "import_path"])
def test_user_reward_fn(monkeypatch, request, how):
    monkeypatch.syspath_prepend(str(request.path.parent))
    fn = reward_fns.exact if how == "callable" else "reward_fns:exact"
    env = TokenEnv("reverse", reward_fn=fn)
    sample = TaskSample("abcde=", "edcba")
    right = replay(env, sample, ids(env, "edcba"))
    np.testing.assert_array_equal(right["rewards"], [0, 0, 0, 0, 1])
    wrong = replay(env, sample, ids(env, "edaba"))
    np.testing.assert_array_equal(wrong["rewards"], [0, 0, 0, 0, 0])
    assert wrong["score"] == pytest.approx(0.8)  # the score is still the task's verifier


def test_user_reward_fn_from_config(monkeypatch, request):
    monkeypatch.syspath_prepend(str(request.path.parent))
    cfg = EnvConfig(id="textenv/Reverse-v0", reward_fn="reward_fns:length_bonus", max_response_tokens=3)
    env = make_env(cfg).unwrapped
    r = replay(env, TaskSample("abcde=", "edcba"), ids(env, "edcba"))
    np.testing.assert_allclose(r["rewards"], [0, 0, 0.75])
    assert r["truncated"]


def test_config_rejects_unknown_id():
    with pytest.raises(ValueError, match="not registered"):
        EnvConfig(id="textenv/Nope-v0")
    with pytest.raises(ValueError, match="textenv id"):
        EnvConfig(id="CartPole-v1")


@pytest.mark.parametrize("path", ["reward_fns:missing", "reward_fns", "no_such_module_xyz:fn"])
def test_bad_reward_fn_import_path(monkeypatch, request, path):
    monkeypatch.syspath_prepend(str(request.path.parent))
    with pytest.raises(ValueError, match="reward_fn"):
        TokenEnv("reverse", reward_fn=path)


def test_raising_reward_fn_names_task_function_and_prompt():
    env = TokenEnv("reverse", reward_fn=reward_fns.raising)
    env.reset(options={"prompt": "abcde=", "answer": "edcba"})
    for t in ids(env, "edcb"):
        env.step(t)  # a user function is called only at the end
    with pytest.raises(RewardError) as err:
        env.step(ids(env, "a")[0])
    msg = str(err.value)
    assert msg == ("reward function reward_fns:raising of task 'reverse' raised KeyError: 'verifier exploded' on "
                   "prompt 'abcde='")  # the function by its import path, as a config names it
    assert isinstance(err.value.__cause__, KeyError)


def test_a_raising_verifier_is_named_by_its_task_class(monkeypatch):
    env = TokenEnv("reverse")

    def broken(sample, response):
        raise ZeroDivisionError("division by zero")

    monkeypatch.setattr(env.task, "partial_score", broken)
    env.reset(options={"prompt": "abcde=", "answer": "edcba"})
    with pytest.raises(RewardError) as err:
        env.step(ids(env, "e")[0])
    assert str(err.value) == ("the verifier (textenv.tasks:ReverseTask) of task 'reverse' raised ZeroDivisionError: "
                              "division by zero on prompt 'abcde='")


@pytest.mark.parametrize(
    "fn", [reward_fns.returns_nan, reward_fns.returns_inf, reward_fns.returns_none, reward_fns.returns_str,
           reward_fns.returns_bool]
)
def test_reward_fn_returning_a_non_number_raises(fn):
    env = TokenEnv("reverse", reward_fn=fn)
    env.reset(options={"prompt": "abcde=", "answer": "edcba"})
    with pytest.raises(RewardError, match="not a finite number") as err:
        env.step(EOS)
    assert fn.__name__ in str(err.value) and "'abcde='" in str(err.value)


@pytest.mark.parametrize("fn", [reward_fns.raising, reward_fns.returns_nan, reward_fns.returns_none])
def test_on_reward_error_failure_value(fn):
    task = make_task("reverse")
    task.failure_value = -1.0
    env = TokenEnv(task, reward_fn=fn, on_reward_error="failure_value")
    env.reset(options={"prompt": "abcde=", "answer": "edcba"})
    for t in ids(env, "edcb"):
        _, reward, _, _, info = env.step(t)
        assert reward == 0.0 and "reward_error" not in info
    _, reward, terminated, truncated, info = env.step(ids(env, "a")[0])
    assert reward == -1.0 and info["reward_error"] is True and truncated and not terminated
    assert info["score"] == -1.0
    r = replay(env, TaskSample("abcde=", "edcba"), ids(env, "edcba"))
    assert r["reward_errors"] == 1
    np.testing.assert_array_equal(r["rewards"], [0, 0, 0, 0, -1])
    ok = replay(TokenEnv(task, reward_fn=reward_fns.exact, on_reward_error="failure_value"),
                TaskSample("abcde=", "edcba"), ids(env, "edcba"))
    assert ok["reward_errors"] == 0


def test_bad_on_reward_error():
    with pytest.raises(ValueError, match="on_reward_error"):
        TokenEnv("reverse", on_reward_error="ignore")


# ------------------------------------------------------------------------------------------------ bad input
@pytest.mark.parametrize("action", [-1, 11, 12, 10**9, np.int64(11), np.int32(-5)])
def test_action_outside_vocabulary(action):
    env = TokenEnv("reverse")  # Discrete(11)
    env.reset(seed=0)
    with pytest.raises(ValueError, match=rf"action {int(action)}\b.*Discrete\(11\)"):
        env.step(action)
    obs, *_ = env.step(10)  # the bad action changed nothing
    assert int(obs["length"]) == 7


@pytest.mark.parametrize("action", [1.0, 2.5, "a", None, True, np.bool_(False), np.float32(2), np.array([2]),
                                    np.array(2.0), [2]])
def test_non_integer_action(action):
    env = TokenEnv("reverse")
    env.reset(seed=0)
    with pytest.raises(TypeError, match="integer token id"):
        env.step(action)


@pytest.mark.parametrize("action", [2, np.int64(2), np.uint8(2), np.array(2), np.array(2, dtype=np.int32)])
def test_integer_like_actions_are_accepted(action):
    env = TokenEnv("reverse")
    env.reset(seed=0)
    obs, reward, *_ = env.step(action)
    assert obs["tokens"][6] == 2 and isinstance(reward, float)


def test_step_before_reset_and_after_end():
    env = TokenEnv("reverse")
    with pytest.raises(RuntimeError, match="before reset"):
        env.step(2)
    env.reset(seed=0)
    env.step(EOS)
    with pytest.raises(RuntimeError, match="after the episode ended"):
        env.step(2)
    env.reset()
    assert env.step(2)[2:4] == (False, False)


def test_prompt_longer_than_max_prompt_tokens():
    env = TokenEnv("reverse", max_prompt_tokens=4)
    with pytest.raises(ValueError, match=r"max_prompt_tokens=4"):
        env.reset(options={"prompt": "abcdefgh=", "answer": "hgfedcba"})
    env.reset(options={"prompt": "abc=", "answer": "cba"})  # exactly at the limit is fine


def test_prompt_is_truncated_to_its_last_tokens():
    env = TokenEnv("reverse", max_prompt_tokens=4, truncate_prompt=True)
    obs, info = env.reset(options={"prompt": "abcdefgh="})
    assert env.prompt_ids == ids(env, "fgh=")
    assert obs["tokens"][:4].tolist() == ids(env, "fgh=") and int(obs["prompt_length"]) == 4
    assert obs in env.observation_space
    assert info["prompt"] == "abcdefgh="
    # an answerless prompt can still be stepped through; it scores 0
    r = [env.step(2) for _ in range(env.max_response_tokens)]
    assert r[-1][3] and r[-1][4]["score"] == 0.0


def test_prompt_outside_the_alphabet():
    env = TokenEnv("reverse")
    with pytest.raises(ValueError, match="'z'"):
        env.reset(options={"prompt": "abz="})


def test_bad_sample_option():
    env = TokenEnv("reverse")
    with pytest.raises(TypeError, match="TaskSample"):
        env.reset(options={"sample": ("abc=", "cba")})


@pytest.mark.parametrize("kwargs", [{"max_response_tokens": 0}, {"max_prompt_tokens": 0}, {"max_response_tokens": -1}])
def test_bad_limits(kwargs):
    with pytest.raises(ValueError, match=">= 1"):
        TokenEnv("reverse", **kwargs)


def test_limits_default_to_the_task_and_can_be_overridden():
    env = TokenEnv("reverse", max_prompt_tokens=None, max_response_tokens=None)
    assert (env.max_prompt_tokens, env.max_response_tokens) == (6, 5)
    assert TokenEnv("reverse", max_prompt_tokens=9).observation_space["tokens"].shape == (9 + 5,)
