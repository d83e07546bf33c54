"""Tasks: a prompt generator plus an exact verifier.

A task draws :class:`TaskSample` objects from a numpy ``Generator`` and scores responses with ``score`` (the
verifier, in [0, 1]). ``partial_score`` scores an unfinished response; the environment's per-token reward is the
change in ``partial_score`` from one token to the next, so the per-token rewards of a finished response add up to
exactly its final ``score`` (a potential-based shaping: it changes no optimal policy).
"""

from __future__ import annotations

import copy
import importlib
import operator
import re
import string
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

import numpy as np

from textenv.verifiers import numeric_verifier

LOWER = string.ascii_lowercase
DIGITS = string.digits


@dataclass(frozen=True)
class TaskSample:
    """One problem: the prompt shown to the policy, the reference answer, and free-form metadata."""

    prompt: str
    answer: str
    metadata: Mapping[str, Any] = field(default_factory=dict)


class Task:
    """Base class of a verifiable task. Subclasses set ``name``, ``alphabet`` and ``max_response_tokens``."""

    name: str = "task"
    alphabet: str = ""
    max_response_tokens: int = 16
    max_prompt_chars: int = 32
    failure_value: float = 0.0

    def sample(self, rng: np.random.Generator) -> TaskSample:
        """Draw one problem using only ``rng``."""
        raise NotImplementedError

    def score(self, sample: TaskSample, response: str) -> float:
        """Score a finished response, in [0, 1]."""
        raise NotImplementedError

    def partial_score(self, sample: TaskSample, response: str) -> float:
        """Score of an unfinished response; by default nothing is earned before the end."""
        return 0.0

    def stop(self, sample: TaskSample, response: str) -> bool:
        """The task's own stop condition, checked after every token (EOS and the length limit always stop)."""
        return False

    def heldout(self) -> Task:
        """The task that poses evaluation problems. A generated task poses its own: evaluation draws them from a seed
        stream that training never uses. A task with a fixed set of problems returns one over a held-out set."""
        return self

    @property
    def num_problems(self) -> int | None:
        """How many distinct problems the task holds when it is a fixed set (None: generated without limit)."""
        return None

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class DatasetTask(Task):
    """A task over a fixed, indexed set of problems (e.g. the rows of a data file).

    ``row(index)`` poses problem ``index``. A training run serves the rows in epochs through
    :class:`textenv.epochs.EpochOrder` (every row once per epoch, in index order or shuffled per epoch as
    ``shuffle`` says); ``sample(rng)`` is what an environment used on its own draws from.
    """

    shuffle: bool = True

    @property
    def num_rows(self) -> int:
        """How many problems there are."""
        raise NotImplementedError

    def row(self, index: int) -> TaskSample:
        """Problem ``index`` (0-based); a fresh sample whose metadata the caller may edit."""
        raise NotImplementedError


def _positional(answer: str, response: str) -> float:
    """Fraction of the answer's positions that the response gets right."""
    if not answer:  # e.g. reset(options={"prompt": ...}) without an answer
        return 0.0
    return sum(map(operator.eq, answer, response)) / len(answer)  # map stops at the shorter, as zip does


class _PositionalTask(Task):
    """A task whose answer has a fixed length and earns credit position by position."""

    def score(self, sample: TaskSample, response: str) -> float:
        return _positional(sample.answer, response)

    def partial_score(self, sample: TaskSample, response: str) -> float:
        return _positional(sample.answer, response)


class ReverseTask(_PositionalTask):
    """Reverse a random string: ``cafhb=`` -> ``bhfac``. Reward: fraction of positions right."""

    name = "reverse"

    def __init__(self, length: int = 5, letters: str = "abcdefgh") -> None:
        if length < 1 or not letters:
            raise ValueError(f"reverse: length must be >= 1 and letters non-empty; got {length}, {letters!r}")
        self.length, self.letters = length, letters
        self.alphabet = letters + "="
        self.max_response_tokens = length
        self.max_prompt_chars = length + 1

    def sample(self, rng: np.random.Generator) -> TaskSample:
        s = "".join(rng.choice(list(self.letters), size=self.length))
        return TaskSample(prompt=s + "=", answer=s[::-1])

    def __repr__(self) -> str:
        return f"ReverseTask(length={self.length}, letters={self.letters!r})"


class SortDigitsTask(_PositionalTask):
    """Sort random digits ascending: ``31415:`` -> ``11345``. Reward: fraction of positions right."""

    name = "sort_digits"

    def __init__(self, length: int = 5) -> None:
        if length < 1:
            raise ValueError(f"sort_digits: length must be >= 1; got {length}")
        self.length = length
        self.alphabet = DIGITS + ":"
        self.max_response_tokens = length
        self.max_prompt_chars = length + 1

    def sample(self, rng: np.random.Generator) -> TaskSample:
        digits = "".join(rng.choice(list(DIGITS), size=self.length))
        return TaskSample(prompt=digits + ":", answer="".join(sorted(digits)))


class AdditionTask(Task):
    """Add two numbers of ``digits`` digits: ``12+34=`` -> ``46`` then EOS. Reward: 1 for the right sum.

    ``template`` poses the problem from ``{a}`` and ``{b}`` (e.g. ``"What is {a} + {b}?"`` for an instruct model);
    ``verifier`` is ``"exact"`` (the response is the sum and nothing else) or ``"numeric"`` (the response's final
    number is the sum, as in :func:`textenv.verifiers.numeric_verifier`: ``"The answer is 46."`` scores 1).

    ``eval_fraction`` > 0 sets that fraction of the (a, b) pairs aside (a fixed choice by a hash of the pair, the
    same every run): training never poses them and evaluation (:meth:`heldout`) poses only them. With 0, evaluation
    draws from a seed stream of its own, which with few digits repeats problems that training has seen.
    """

    name = "addition"

    def __init__(
        self, digits: int = 2, template: str = "{a}+{b}=", verifier: str = "exact", eval_fraction: float = 0.0,
    ) -> None:
        if digits < 1:
            raise ValueError(f"addition: digits must be >= 1; got {digits}")
        if verifier not in ("exact", "numeric"):
            raise ValueError(f"addition: verifier must be 'exact' or 'numeric'; got {verifier!r}")
        try:
            template.format(a=0, b=0)
        except (KeyError, IndexError, ValueError) as err:
            raise ValueError(f"addition: template {template!r} must name only {{a}} and {{b}}: {err}") from None
        if not 0.0 <= eval_fraction < 1.0:
            raise ValueError(f"addition: eval_fraction must be in [0, 1); got {eval_fraction}")
        self.digits, self.template, self.verifier = digits, template, verifier
        self.eval_fraction, self._pose_heldout = eval_fraction, False
        self.alphabet = DIGITS + "".join(dict.fromkeys(template.replace("{a}", "").replace("{b}", "")))
        self.max_response_tokens = digits + 2  # the sum has at most digits+1 characters, then EOS
        self.max_prompt_chars = len(template.format(a=10**digits - 1, b=10**digits - 1))

    def sample(self, rng: np.random.Generator) -> TaskSample:
        hi = 10**self.digits
        while True:
            a, b = (int(x) for x in rng.integers(0, hi, size=2))
            if self.eval_fraction == 0.0 or self.is_heldout(a, b) == self._pose_heldout:
                return TaskSample(prompt=self.template.format(a=a, b=b), answer=str(a + b), metadata={"a": a, "b": b})

    def is_heldout(self, a: int, b: int) -> bool:
        """Whether the pair (a, b) is set aside for evaluation (Knuth's multiplicative hash of the pair's index)."""
        index = a * 10**self.digits + b
        return (index * 2654435761 % 2**32) / 2**32 < self.eval_fraction

    def heldout(self) -> Task:
        if self.eval_fraction == 0.0:
            return self
        task = copy.copy(self)
        task._pose_heldout = True
        return task

    def score(self, sample: TaskSample, response: str) -> float:
        if self.verifier == "numeric":
            return numeric_verifier(response, sample.answer)
        return float(response.strip() == sample.answer)

    def __repr__(self) -> str:
        return (f"AdditionTask(digits={self.digits}, template={self.template!r}, verifier={self.verifier!r}, "
                f"eval_fraction={self.eval_fraction})")


class CountTask(Task):
    """Count a letter in a string: ``abcab,a=`` -> ``2``. Reward: 1 for the exact count."""

    name = "count"

    def __init__(self, length: int = 8, letters: str = "abc") -> None:
        if length < 1 or len(letters) < 1:
            raise ValueError(f"count: length must be >= 1 and letters non-empty; got {length}, {letters!r}")
        self.length, self.letters = length, letters
        self.alphabet = letters + DIGITS + ",="
        self.max_response_tokens = len(str(length)) + 1
        self.max_prompt_chars = length + 3

    def sample(self, rng: np.random.Generator) -> TaskSample:
        s = "".join(rng.choice(list(self.letters), size=self.length))
        target = str(rng.choice(list(self.letters)))
        return TaskSample(prompt=f"{s},{target}=", answer=str(s.count(target)), metadata={"letter": target})

    def score(self, sample: TaskSample, response: str) -> float:
        return float(response.strip() == sample.answer)


class BracketTask(Task):
    """Follow a format: wrap the word in parentheses, ``cab!`` -> ``(cab)``.

    Reward: 0.5 for the format (starts with ``(`` and ends with ``)``) plus 0.5 for the exact content. The task stops
    the episode itself at the closing parenthesis.
    """

    name = "bracket"

    def __init__(self, length: int = 3, letters: str = "abcdefgh") -> None:
        if length < 1 or not letters:
            raise ValueError(f"bracket: length must be >= 1 and letters non-empty; got {length}, {letters!r}")
        self.length, self.letters = length, letters
        self.alphabet = letters + "!()"
        self.max_response_tokens = length + 3
        self.max_prompt_chars = length + 1

    def sample(self, rng: np.random.Generator) -> TaskSample:
        s = "".join(rng.choice(list(self.letters), size=self.length))
        return TaskSample(prompt=s + "!", answer=f"({s})")

    def score(self, sample: TaskSample, response: str) -> float:
        fmt = response.startswith("(") and response.endswith(")") and len(response) >= 2
        return 0.5 * fmt + 0.5 * (response == sample.answer)

    def stop(self, sample: TaskSample, response: str) -> bool:
        return response.endswith(")")


class MultiTurnTask(Task):
    """A task in which the environment answers each of the policy's turns.

    A policy turn ends with the single token ``turn_end``; the environment then calls ``reply`` and appends the
    reply's tokens to the observation (they are not actions: no reward, no loss). ``reply`` returning None, or
    ``max_turns`` turns, ends the episode.
    """

    turn_end: str = ";"
    max_turns: int = 4

    def reply(self, sample: TaskSample, transcript: str, turn: int) -> str | None:
        """The environment's answer to turn ``turn`` (1-based); ``transcript`` is the response so far, replies included."""
        raise NotImplementedError


class GuessNumberTask(MultiTurnTask):
    """Guess a secret number in 0..high; after each guess (digits then ``;``) the environment answers ``<`` (the
    secret is lower), ``>`` (higher) or ``?`` (not a number), and the episode ends on the right guess.
    Transcript example for secret 3: ``5;<2;>3;``. Reward: 1 for finding it within ``max_turns`` guesses.
    """

    name = "guess_number"

    def __init__(self, high: int = 9, max_turns: int = 4) -> None:
        if high < 1 or max_turns < 1:
            raise ValueError(f"guess_number: high and max_turns must be >= 1; got {high}, {max_turns}")
        self.high, self.max_turns = high, max_turns
        self.alphabet = DIGITS + ";<>?-:"
        self.max_response_tokens = max_turns * (len(str(high)) + 2)  # digits, ';', the one-character reply
        self.max_prompt_chars = len(f"0-{high}:")

    def sample(self, rng: np.random.Generator) -> TaskSample:
        return TaskSample(prompt=f"0-{self.high}:", answer=str(int(rng.integers(0, self.high + 1))))

    def reply(self, sample: TaskSample, transcript: str, turn: int) -> str | None:
        guess = re.split(r"[<>?]", transcript[: -len(self.turn_end)])[-1]
        if not guess.isdigit():
            return "?"
        secret = int(sample.answer)
        return None if int(guess) == secret else ("<" if secret < int(guess) else ">")

    def score(self, sample: TaskSample, response: str) -> float:
        return float(any(int(g) == int(sample.answer) for g in re.findall(r"(?:^|[<>?])(\d+)(?:;|$)", response)))


TASKS: dict[str, Callable[..., Task]] = {
    cls.name: cls for cls in (ReverseTask, SortDigitsTask, AdditionTask, CountTask, BracketTask, GuessNumberTask)
}


def import_object(path: str, what: str) -> Any:
    """Import ``package.module:attribute``; the error names ``what`` and the path."""
    module_name, sep, attr = path.partition(":")
    if not sep or not module_name or not attr:
        raise ValueError(f"{what} {path!r} is not an import path of the form 'package.module:name'")
    try:
        return getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as err:
        raise ValueError(f"{what} {path!r} cannot be imported: {err}") from None


def make_task(name: str, **kwargs: Any) -> Task:
    """A built-in task by name (``reverse``, ``sort_digits``, ...) or a user task by import path ``pkg.mod:Cls``."""
    factory = TASKS.get(name) or (import_object(name, "task") if ":" in name else None)
    if factory is None:
        raise ValueError(f"unknown task {name!r}; built-in tasks: {sorted(TASKS)}, or give 'package.module:Class'")
    try:
        task = factory(**kwargs)
    except TypeError as err:
        raise ValueError(f"task {name!r} rejected its arguments {kwargs}: {err}") from None
    if not isinstance(task, Task):
        raise ValueError(f"task {name!r} built {type(task).__name__}, which is not a textenv.tasks.Task")
    return task
