"""A user task and a non-task, loaded by ``make_task("user_tasks:<Name>")`` in the textenv tests."""

from __future__ import annotations

import numpy as np

from textenv import Task, TaskSample


class EchoTask(Task):
    """Repeat a random letter string: ``abq?`` -> ``abq``; 1.0 for the exact string."""

    name = "echo"

    def __init__(self, length: int = 3) -> None:
        self.length = length
        self.alphabet = "abcq?"
        self.max_response_tokens = length + 1
        self.max_prompt_chars = length + 1

    def sample(self, rng: np.random.Generator) -> TaskSample:
        s = "".join(rng.choice(list("abcq"), size=self.length))
        return TaskSample(prompt=s + "?", answer=s)

    def score(self, sample: TaskSample, response: str) -> float:
        return float(response == sample.answer)


class NotATask:
    """Has the right shape of constructor but is no :class:`textenv.Task`."""

    def __init__(self, **kwargs: object) -> None:
        self.kwargs = kwargs
