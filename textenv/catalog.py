"""What ``tokengym envs`` lists: every registered ``textenv/`` environment, its task in one line, and its knobs."""

from __future__ import annotations

import inspect
import re
from dataclasses import dataclass
from typing import Any, Callable

import gymnasium as gym

from textenv.file_task import FileTask
from textenv.tasks import TASKS, Task, import_object

USER_TASK = "your own task: env.task names a built-in task or 'package.module:Class', env.task_kwargs its knobs"


@dataclass(frozen=True)
class EnvInfo:
    """One registered environment: its id, what its task asks in one line, and the task's keyword arguments
    (``env.task_kwargs``) with their defaults (``inspect.Parameter.empty`` where there is none)."""

    id: str
    description: str
    knobs: dict[str, Any]


def registered_envs() -> list[EnvInfo]:
    """Every environment registered under ``textenv/``, by id."""
    import textenv  # noqa: F401  (registers the ids)

    return [env_info(env_id) for env_id in sorted(gym.registry) if env_id.startswith("textenv/")]


def env_info(env_id: str) -> EnvInfo:
    """The :class:`EnvInfo` of a registered id; an id without a task of its own takes the user's (Custom-v0)."""
    task = gym.spec(env_id).kwargs.get("task")
    if task is None:
        return EnvInfo(env_id, USER_TASK, {})
    factory = task_factory(task)
    return EnvInfo(env_id, one_line(factory.__doc__ or ""), task_knobs(factory))


def task_factory(task: str | Task) -> Callable[..., Task]:
    """The class (or function) that builds a task given by name, import path or instance."""
    if isinstance(task, Task):
        return type(task)
    return {**TASKS, FileTask.name: FileTask}.get(task) or import_object(task, "task")


def task_knobs(factory: Callable[..., Task]) -> dict[str, Any]:
    """The keyword arguments a task takes, with their defaults."""
    params = inspect.signature(factory).parameters.values()
    return {p.name: p.default for p in params if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)}


def one_line(doc: str) -> str:
    """A docstring's first line, continued to the end of its sentence when the line breaks one off."""
    paragraph = " ".join(inspect.cleandoc(doc).split("\n\n")[0].split())
    first = inspect.cleandoc(doc).split("\n")[0].rstrip()
    end = re.compile(r"\.(\s|$)")
    match = end.search(paragraph, max(len(first) - 1, 0))
    text = paragraph[: match.start() + 1] if match else paragraph
    return text.replace("``", "`")
