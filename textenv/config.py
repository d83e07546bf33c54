"""The ``env`` section of an experiment config."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

import gymnasium as gym

from textenv.tokenizer import Tokenizer


@dataclass(frozen=True)
class EnvConfig:
    """Which registered environment to run, and its options."""

    id: str = "textenv/Reverse-v0"  # a registered textenv id (`tokengym envs` lists them)
    task: str | None = None  # a built-in task name or "package.module:Class", replacing the id's own task
    task_kwargs: dict[str, Any] = field(default_factory=dict)  # the task's own knobs, e.g. {length: 5}
    reward_mode: Literal["per_token", "terminal"] = "per_token"  # per_token: each token earns the change in the
    #   task's partial score (they add up to the final score); terminal: the whole reward on the last token
    reward_fn: str | None = None  # "package.module:function", called with a RewardContext at the episode's end
    max_response_tokens: int | None = None  # default: the task's own limit
    max_prompt_tokens: int | None = None  # default: the task's longest prompt (+ the chat template's tokens)
    truncate_prompt: bool = False  # cut longer prompts to their last max_prompt_tokens tokens instead of failing
    on_reward_error: Literal["raise", "failure_value"] = "raise"  # a reward function that raises or returns
    #   a non-finite value stops the run, or scores the task's failure_value (counted in reward/errors)
    chat_template: bool = False  # pose prompts as a user turn in the model tokenizer's chat template
    system_prompt: str | None = None  # with chat_template: the system turn (None: the template's own default)

    def __post_init__(self) -> None:
        for name in ("max_response_tokens", "max_prompt_tokens"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"env.{name} must be >= 1 or null (the task's own limit); got {getattr(self, name)}")
        if self.system_prompt is not None and not self.chat_template:
            raise ValueError("env.system_prompt needs env.chat_template=true (the system turn is part of the chat template)")
        if not self.id.startswith("textenv/"):
            raise ValueError(f"env.id must be a registered textenv id such as 'textenv/Reverse-v0'; got {self.id!r}")
        if self.id not in gym.registry:
            import textenv  # noqa: F401  (registers the ids)
        if self.id not in gym.registry:
            known = sorted(k for k in gym.registry if k.startswith("textenv/"))
            raise ValueError(f"env.id {self.id!r} is not registered; known ids: {known}")
        if self.id == "textenv/Custom-v0" and self.task is None:
            raise ValueError("env.id 'textenv/Custom-v0' needs env.task: a built-in task name or 'package.module:Class'")
        if self.id == "textenv/File-v0" and self.task is None and "path" not in self.task_kwargs:
            raise ValueError("env.id 'textenv/File-v0' needs env.task_kwargs.path: the .jsonl, .csv or .parquet file")


def make_env(cfg: EnvConfig, tokenizer: Tokenizer | None = None, **extra: Any) -> gym.Env:
    """Build the environment ``cfg`` describes (through ``gymnasium.make``)."""
    kwargs: dict[str, Any] = dict(
        reward_mode=cfg.reward_mode,
        reward_fn=cfg.reward_fn,
        max_response_tokens=cfg.max_response_tokens,
        max_prompt_tokens=cfg.max_prompt_tokens,
        truncate_prompt=cfg.truncate_prompt,
        on_reward_error=cfg.on_reward_error,
        chat_template=cfg.chat_template,
        system_prompt=cfg.system_prompt,
        **extra,
    )
    if cfg.task is not None:
        kwargs["task"] = cfg.task
    if cfg.task_kwargs:
        kwargs["task_kwargs"] = dict(cfg.task_kwargs)
    if tokenizer is not None:
        kwargs["tokenizer"] = tokenizer
    return gym.make(cfg.id, **kwargs)
