"""textenv: text generation as token-level Gymnasium environments.

Importing the package registers every environment under the ``textenv/`` namespace::

    import gymnasium as gym, textenv
    env = gym.make("textenv/Reverse-v0")
"""

from __future__ import annotations

import gymnasium as gym

from textenv.config import EnvConfig, make_env
from textenv.env import TokenEnv, replay, score_pending
from textenv.epochs import EpochOrder
from textenv.file_task import DataFileError, FileTask
from textenv.rewards import (
    BatchRewardFn, DeferredReward, RewardContext, RewardError, RewardFn, RewardServiceError, TaskReward,
)
from textenv.tasks import TASKS, DatasetTask, MultiTurnTask, Task, TaskSample, make_task
from textenv.tokenizer import CharTokenizer, HFTokenizerAdapter, Tokenizer

ENV_IDS: dict[str, str] = {
    "textenv/Reverse-v0": "reverse",
    "textenv/SortDigits-v0": "sort_digits",
    "textenv/Addition-v0": "addition",
    "textenv/Count-v0": "count",
    "textenv/Bracket-v0": "bracket",
    "textenv/GuessNumber-v0": "guess_number",  # multi-turn: the environment answers each guess
}


def _register() -> None:
    for env_id, task in ENV_IDS.items():
        if env_id not in gym.registry:
            gym.register(id=env_id, entry_point="textenv.env:TokenEnv", kwargs={"task": task})
    if "textenv/Custom-v0" not in gym.registry:  # a user task given by import path: gym.make(..., task="pkg.mod:Cls")
        gym.register(id="textenv/Custom-v0", entry_point="textenv.env:TokenEnv")
    if "textenv/File-v0" not in gym.registry:  # needs task_kwargs={"path": ...}, so it is not in ENV_IDS
        gym.register(id="textenv/File-v0", entry_point="textenv.env:TokenEnv", kwargs={"task": FileTask.name})


_register()

__all__ = [
    "ENV_IDS",
    "TASKS",
    "BatchRewardFn",
    "CharTokenizer",
    "DataFileError",
    "DatasetTask",
    "DeferredReward",
    "EnvConfig",
    "EpochOrder",
    "FileTask",
    "HFTokenizerAdapter",
    "RewardContext",
    "RewardError",
    "RewardServiceError",
    "RewardFn",
    "MultiTurnTask",
    "Task",
    "TaskReward",
    "TaskSample",
    "TokenEnv",
    "Tokenizer",
    "make_env",
    "make_task",
    "replay",
    "score_pending",
]
