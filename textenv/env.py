"""Text generation as a Gymnasium environment whose actions are tokens."""

from __future__ import annotations

from typing import Any, Callable, Literal, Sequence

import gymnasium as gym
import numpy as np
from gymnasium import spaces

from textenv.rewards import (
    BatchRewardFn, DeferredReward, RewardContext, RewardError, RewardMode, build_reward, checked_reward,
)
from textenv.tasks import MultiTurnTask, Task, TaskSample, import_object, make_task
from textenv.tokenizer import CharTokenizer, Tokenizer

Obs = dict[str, np.ndarray]


class TokenEnv(gym.Env[Obs, np.int64]):
    """A prompt is the reset observation; each step appends one token; EOS or a length limit ends the episode.

    Observation: ``{"tokens": int64[max_prompt_tokens + max_response_tokens], "prompt_length": int64,
    "length": int64}``: the prompt followed by the response so far, padded with the tokenizer's pad id.
    Action: ``Discrete(vocab_size)``, the next token id.
    Reward: from the reward function (by default the task's verifier, per token or at the end); ``batch_reward``
    (an object with ``score_batch``, e.g. a reward model) adds a batched terminal reward on top.
    ``terminated`` on EOS or the task's own stop condition; ``truncated`` at ``max_response_tokens``.

    ``reset(options=...)`` takes ``{"sample": TaskSample}`` or ``{"prompt": str, "answer": str}`` to pose a given
    problem instead of drawing one with ``self.np_random``.
    """

    metadata = {"render_modes": ["ansi"], "render_fps": 4}

    def __init__(
        self,
        task: str | Task | None = None,
        task_kwargs: dict[str, Any] | None = None,
        tokenizer: Tokenizer | None = None,
        reward_mode: RewardMode = "per_token",
        reward_fn: str | Callable[[RewardContext], float] | BatchRewardFn | None = None,
        batch_reward: BatchRewardFn | None = None,
        max_prompt_tokens: int | None = None,
        max_response_tokens: int | None = None,
        truncate_prompt: bool = False,
        on_reward_error: Literal["raise", "failure_value"] = "raise",
        render_mode: str | None = None,
        chat_template: bool = False,
        system_prompt: str | None = None,
    ) -> None:
        if task is None:
            raise ValueError("TokenEnv needs a task: a built-in name such as 'reverse', 'package.module:Class', or a Task")
        self.task: Task = make_task(task, **(task_kwargs or {})) if isinstance(task, str) else task
        self.tokenizer: Tokenizer = tokenizer if tokenizer is not None else CharTokenizer(self.task.alphabet)
        self.chat_template, self.system_prompt = bool(chat_template), system_prompt
        if system_prompt is not None and not chat_template:
            raise ValueError("env.system_prompt needs env.chat_template=true (the system turn is part of the chat template)")
        if chat_template:
            if isinstance(self.task, MultiTurnTask):
                raise ValueError(f"env.chat_template=true is not supported for the multi-turn task {self.task.name!r} "
                                 "yet (its replies are plain text); set env.chat_template=false")
            if not callable(getattr(self.tokenizer, "chat_prompt", None)):
                raise ValueError("env.chat_template=true needs a Hugging Face tokenizer with a chat template; the "
                                 f"tokenizer here is {self.tokenizer!r} (set policy.model_path to an instruct model)")
        if isinstance(reward_fn, str):
            reward_fn = import_object(reward_fn, "reward_fn")
        self.reward_fn = build_reward(reward_fn, reward_mode, batch_reward)
        if max_prompt_tokens is None:  # the task's longest prompt in characters (>= tokens), plus the chat template's own
            max_prompt_tokens = self.task.max_prompt_chars + (len(self._encode_prompt("")) if chat_template else 0)
        self.max_prompt_tokens = int(max_prompt_tokens)
        self.max_response_tokens = int(
            self.task.max_response_tokens if max_response_tokens is None else max_response_tokens
        )
        if self.max_prompt_tokens < 1 or self.max_response_tokens < 1:
            raise ValueError("max_prompt_tokens and max_response_tokens must be >= 1")
        if on_reward_error not in ("raise", "failure_value"):
            raise ValueError(f"on_reward_error must be 'raise' or 'failure_value'; got {on_reward_error!r}")
        self.truncate_prompt = truncate_prompt
        self.on_reward_error = on_reward_error
        self.render_mode = render_mode

        vocab = int(self.tokenizer.vocab_size)
        total = self.max_prompt_tokens + self.max_response_tokens
        self.action_space = spaces.Discrete(vocab)
        self.observation_space = spaces.Dict(
            {
                "tokens": spaces.Box(0, vocab - 1, shape=(total,), dtype=np.int64),
                "prompt_length": spaces.Box(0, total, shape=(), dtype=np.int64),
                "length": spaces.Box(0, total, shape=(), dtype=np.int64),
                # 1 where the policy chose the token (an action); 0 for the prompt, the environment's replies, padding
                "action_mask": spaces.Box(0, 1, shape=(total,), dtype=np.int8),
            }
        )
        self._tokens = np.full(total, self.tokenizer.pad_token_id, dtype=np.int64)
        self._action_mask = np.zeros(total, dtype=np.int8)
        self._turn_end_id = self._single_token(self.task.turn_end) if isinstance(self.task, MultiTurnTask) else None
        self._turns = 0
        self._sample: TaskSample | None = None
        self._prompt_ids: list[int] = []
        self._response_ids: list[int] = []
        # The response's bytes, a token at a time, when the tokenizer's decode is their concatenation (byte_pieces,
        # textenv/tokenizer.py): its text then costs one UTF-8 read per step, not a decode of the whole response.
        pieces = getattr(self.tokenizer, "byte_pieces", None)
        self._pieces: list[bytes] | None = pieces if pieces is not None and len(pieces) >= vocab else None
        self._response_bytes = bytearray()
        self._done = True

    # ----------------------------------------------------------------------------------------------- gym API
    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None) -> tuple[Obs, dict[str, Any]]:
        super().reset(seed=seed)
        self._sample = self._sample_from(options or {})
        prompt_ids = self._encode_prompt(self._sample.prompt)
        if len(prompt_ids) > self.max_prompt_tokens:
            if not self.truncate_prompt:
                raise ValueError(
                    f"prompt {self._sample.prompt[:40]!r} has {len(prompt_ids)} tokens, more than max_prompt_tokens="
                    f"{self.max_prompt_tokens}; raise max_prompt_tokens or set truncate_prompt=True"
                )
            prompt_ids = prompt_ids[-self.max_prompt_tokens :]  # keep the end, where the question is
        self._prompt_ids, self._response_ids = prompt_ids, []
        self._response_bytes.clear()
        self._tokens.fill(self.tokenizer.pad_token_id)
        self._tokens[: len(prompt_ids)] = prompt_ids
        self._action_mask.fill(0)
        self._turns = 0
        self.reward_fn.reset()
        self._done = False
        return self._obs(), {"prompt": self._sample.prompt, "answer": self._sample.answer}

    def step(self, action: Any) -> tuple[Obs, float, bool, bool, dict[str, Any]]:
        reward, terminated, truncated, info = self.advance(action)
        return self._obs(), reward, terminated, truncated, info

    def advance(self, action: Any, defer: bool = False) -> tuple[float, bool, bool, dict[str, Any]]:
        """``step`` without building the observation (what :func:`replay` uses): reward, terminated, truncated, info.

        With ``defer``, a batched terminal reward is left out of the last reward and ``info["pending"]`` holds the
        episode's final :class:`RewardContext` for the caller to score (see :func:`score_pending`).
        """
        if self._sample is None:
            raise RuntimeError("step() called before reset()")
        if self._done:
            raise RuntimeError("step() called after the episode ended (terminated or truncated); call reset() first")
        token = self._check_action(action)
        self._append(token, is_action=True)
        text = self._response_text()
        terminated = token == self.tokenizer.eos_token_id or self.task.stop(self._sample, text)
        info: dict[str, Any] = {}
        if not terminated and token == self._turn_end_id:  # a multi-turn task answers the policy's turn
            terminated, text, info = self._env_turn(text)
        truncated = not terminated and len(self._response_ids) >= self.max_response_tokens
        self._done = terminated or truncated
        reward, pending = self._reward(text, defer)
        if pending is not None:
            info["pending"] = pending
        if reward is None:
            reward = self.task.failure_value
            info["reward_error"] = True
        if self._done:
            info.update(response=text, score=self.task.score(self._sample, text) if "reward_error" not in info else reward)
        return reward, terminated, truncated, info

    def render(self) -> str | None:
        if self.render_mode != "ansi" or self._sample is None:
            return None
        return f"{self._sample.prompt}{self.tokenizer.decode(self._response_ids)}"

    # ----------------------------------------------------------------------------------------------- helpers
    @property
    def sample(self) -> TaskSample | None:
        """The problem posed at the last reset."""
        return self._sample

    @property
    def prompt_ids(self) -> list[int]:
        """The prompt's token ids at the last reset (after truncation, if the config allows it)."""
        return list(self._prompt_ids)

    def prompt_text(self, prompt: str) -> str:
        """The text the model is given for the task's ``prompt``: the prompt itself, or with ``chat_template`` the
        chat-formatted conversation (system prompt, user turn, the assistant's turn opened)."""
        if not self.chat_template:
            return prompt
        return self.tokenizer.chat_prompt(prompt, self.system_prompt)  # type: ignore[attr-defined]

    def _encode_prompt(self, prompt: str) -> list[int]:
        return self.tokenizer.encode(self.prompt_text(prompt))

    def _sample_from(self, options: dict[str, Any]) -> TaskSample:
        if "sample" in options:
            sample = options["sample"]
            if not isinstance(sample, TaskSample):
                raise TypeError(f"options['sample'] must be a textenv.TaskSample; got {type(sample).__name__}")
            return sample
        if "prompt" in options:
            return TaskSample(str(options["prompt"]), str(options.get("answer", "")), options.get("metadata", {}))
        return self.task.sample(self.np_random)

    def _append(self, token: int, is_action: bool) -> None:
        self._response_ids.append(token)
        if self._pieces is not None:
            self._response_bytes += self._pieces[token]
        position = len(self._prompt_ids) + len(self._response_ids) - 1
        self._tokens[position] = token
        self._action_mask[position] = int(is_action)

    def _env_turn(self, text: str) -> tuple[bool, str, dict[str, Any]]:
        """The environment's reply to a finished policy turn, appended as observation tokens that are not actions."""
        self._turns += 1
        reply = self.task.reply(self._sample, text, self._turns)
        if reply is None or self._turns >= self.task.max_turns:
            return True, text, {"turns": self._turns}
        reply_ids = self.tokenizer.encode(reply)[: self.max_response_tokens - len(self._response_ids)]
        for token in reply_ids:
            self._append(token, is_action=False)
        return False, self._response_text(), {"env_tokens": reply_ids, "turns": self._turns}

    def _response_text(self) -> str:
        """``tokenizer.decode(response ids)``: read from the response's bytes when the tokenizer allows it, except
        while they end inside a character (a token of part of one), where the tokenizer decodes."""
        if self._pieces is not None:
            try:
                return self._response_bytes.decode("utf-8")
            except UnicodeDecodeError:
                pass
        return self.tokenizer.decode(self._response_ids)

    def _single_token(self, text: str) -> int:
        ids = self.tokenizer.encode(text)
        if len(ids) != 1:
            raise ValueError(f"task {self.task.name!r}: turn_end {text!r} must be one token; the tokenizer gives {ids}")
        return ids[0]

    @property
    def turn_end_id(self) -> int | None:
        """The token that ends a policy turn in a multi-turn task (None for single-turn tasks)."""
        return self._turn_end_id

    def _check_action(self, action: Any) -> int:
        if type(action) is int and 0 <= action < self.action_space.n:  # the common case (replay), checked first
            return action
        if isinstance(action, np.ndarray) and action.shape == ():
            action = action.item()
        if isinstance(action, (bool, np.bool_)) or not isinstance(action, (int, np.integer)):
            raise TypeError(f"action must be an integer token id; got {action!r} of type {type(action).__name__}")
        if not 0 <= int(action) < self.action_space.n:
            raise ValueError(f"action {int(action)} is outside the vocabulary Discrete({self.action_space.n})")
        return int(action)

    def _reward(self, text: str, defer: bool) -> tuple[float | None, RewardContext | None]:
        """This step's reward (None: the reward function failed and the config allows it) and, when the batched
        part of a terminal reward is deferred, the context it is to be scored on."""
        ctx = RewardContext(self.task, self._sample, self._prompt_ids, tuple(self._response_ids), text, self._done)
        try:
            if defer and ctx.done and isinstance(self.reward_fn, DeferredReward):
                return self.reward_fn.step_reward(ctx), ctx
            return checked_reward(self.reward_fn, ctx), None
        except RewardError:
            if self.on_reward_error == "raise":
                raise
            return None, None

    def _obs(self) -> Obs:
        return {
            "tokens": self._tokens.copy(),
            "prompt_length": np.array(len(self._prompt_ids), dtype=np.int64),
            "length": np.array(len(self._prompt_ids) + len(self._response_ids), dtype=np.int64),
            "action_mask": self._action_mask.copy(),
        }


def replay(env: TokenEnv, sample: TaskSample, response_ids: Sequence[int], defer: bool = False) -> dict[str, Any]:
    """Replay a generated response through ``env`` token by token.

    Returns the per-token ``rewards`` (float32, one per replayed token), how many tokens were consumed
    (``length``: fewer than given when the episode ends early, e.g. on the task's stop condition),
    ``terminated``/``truncated``, the final ``score``, and ``reward_errors`` (0 or 1). For a multi-turn task the
    response holds the policy's tokens only, and the environment's replies are returned in ``env_tokens``
    (a list, one per turn) — the multi-turn rollout in ``cluster/`` steps turn by turn instead.
    With ``defer``, a batched terminal reward is left out of the last reward and ``pending`` holds the final
    :class:`RewardContext` for :func:`score_pending` to score with others in one call; otherwise ``pending`` is None.
    """
    env.reset(options={"sample": sample})
    rewards: list[float] = []
    terminated = truncated = False
    errors, info, env_tokens = 0, {}, []
    for token in response_ids:
        reward, terminated, truncated, info = env.advance(int(token), defer=defer)
        rewards.append(reward)
        errors += int(info.get("reward_error", False))
        if "env_tokens" in info:
            env_tokens.append(info["env_tokens"])
        if terminated or truncated:
            break
    return {
        "rewards": np.asarray(rewards, dtype=np.float32),
        "length": len(rewards),
        "env_tokens": env_tokens,
        "terminated": terminated,
        "truncated": truncated,
        "score": float(info.get("score", 0.0)),
        "reward_errors": errors,
        "pending": info.get("pending"),
    }


def score_pending(env: TokenEnv, episodes: Sequence[dict[str, Any]]) -> int:
    """Add the batched terminal rewards that ``replay(env, ..., defer=True)`` left pending, scored in one call.

    Each episode's last reward then equals what ``replay`` without ``defer`` gives. A failed score follows
    ``env.on_reward_error``: raise (before changing any episode), or the task's ``failure_value`` as that episode's
    last reward and score, counted in its ``reward_errors``. Returns how many episodes were scored.
    """
    waiting = [ep for ep in episodes if ep["pending"] is not None]
    if not waiting:
        return 0
    if not isinstance(env.reward_fn, DeferredReward):
        raise ValueError("episodes with pending rewards must be scored with the environment that replayed them")
    results = env.reward_fn.score([ep["pending"] for ep in waiting])
    failed = [r for r in results if isinstance(r, RewardError)]
    if failed and env.on_reward_error == "raise":
        raise failed[0]
    for ep, result in zip(waiting, results):
        ep["pending"] = None
        if isinstance(result, RewardError):
            ep["rewards"][-1] = ep["score"] = env.task.failure_value
            ep["reward_errors"] += 1
        else:
            ep["rewards"][-1] += result
    return len(waiting)
