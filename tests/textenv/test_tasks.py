"""textenv tasks (samplers and verifiers), make_task, and CharTokenizer."""

from __future__ import annotations

import re

import numpy as np
import pytest

import textenv
from textenv import CharTokenizer, Task, TaskSample, make_task
from textenv.tasks import AdditionTask, BracketTask, CountTask, ReverseTask, SortDigitsTask

N_DRAWS = 50
NO_ARGUMENT_TASKS = sorted(textenv.ENV_IDS.values())  # every built-in but "file", which needs a path


# ------------------------------------------------------------------------------------------------ verifiers
@pytest.mark.parametrize(
    ("response", "expected"),
    [("edcba", 1.0), ("edaba", 0.8), ("edcbx", 0.8), ("abcde", 0.2), ("", 0.0), ("ed", 0.4), ("edcbaa", 1.0)],
)
def test_reverse_verifier_is_fraction_of_positions(response, expected):
    task = ReverseTask()
    sample = TaskSample("abcde=", "edcba")
    assert task.score(sample, response) == pytest.approx(expected)
    assert task.partial_score(sample, response) == pytest.approx(expected)


@pytest.mark.parametrize(
    ("response", "expected"),
    [("11345", 1.0), ("11354", 0.6), ("113", 0.6), ("54311", 0.2), ("", 0.0), ("31415", 0.4)],
)
def test_sort_digits_verifier(response, expected):
    sample = TaskSample("31415:", "11345")
    assert SortDigitsTask().score(sample, response) == pytest.approx(expected)


@pytest.mark.parametrize(
    ("response", "expected"),
    [("46", 1.0), (" 46", 1.0), ("46 \n", 1.0), ("4", 0.0), ("460", 0.0), ("046", 0.0), ("64", 0.0), ("", 0.0),
     ("4 6", 0.0)],
)
def test_addition_verifier_is_exact_match_after_strip(response, expected):
    task = AdditionTask()
    sample = TaskSample("12+34=", "46", {"a": 12, "b": 34})
    assert task.score(sample, response) == expected
    assert task.partial_score(sample, response) == 0.0  # only the finished answer earns anything


@pytest.mark.parametrize(("response", "expected"), [("2", 1.0), (" 2 ", 1.0), ("3", 0.0), ("22", 0.0), ("", 0.0)])
def test_count_verifier(response, expected):
    assert CountTask().score(TaskSample("abcab,a=", "2"), response) == expected


@pytest.mark.parametrize(
    ("response", "expected"),
    [
        ("(abc)", 1.0),
        ("(abd)", 0.5),  # format right, content wrong
        ("()", 0.5),
        ("(abc)(", 0.0),
        ("abc", 0.0),
        ("(abc", 0.0),
        ("abc)", 0.0),
        ("(", 0.0),  # a lone "(" neither starts and ends a pair
        (")", 0.0),
        ("", 0.0),
    ],
)
def test_bracket_verifier_is_half_format_half_content(response, expected):
    assert BracketTask().score(TaskSample("abc!", "(abc)"), response) == expected


def test_bracket_stops_at_closing_parenthesis():
    task, sample = BracketTask(), TaskSample("abc!", "(abc)")
    assert task.stop(sample, "(ab)")
    assert task.stop(sample, ")")
    assert not task.stop(sample, "(ab")
    assert not task.stop(sample, "")


@pytest.mark.parametrize("task", [ReverseTask(), SortDigitsTask(), AdditionTask(), CountTask()])
def test_other_tasks_never_stop_on_their_own(task):
    sample = task.sample(np.random.default_rng(0))
    assert not task.stop(sample, sample.answer)
    assert not task.stop(sample, sample.answer + ")")


def test_positional_score_with_empty_answer_is_zero_not_an_error():
    # reset(options={"prompt": ...}) without an answer poses a sample whose answer is ""
    assert ReverseTask().score(TaskSample("abc=", ""), "cba") == 0.0
    assert SortDigitsTask().partial_score(TaskSample("31:", ""), "") == 0.0


# ------------------------------------------------------------------------------------------------ samplers
def _draws(task: Task, seed: int = 0) -> list[TaskSample]:
    rng = np.random.default_rng(seed)
    return [task.sample(rng) for _ in range(N_DRAWS)]


@pytest.mark.parametrize("kwargs", [{}, {"length": 7, "letters": "xyz"}])
def test_reverse_samples(kwargs):
    task = ReverseTask(**kwargs)
    letters, length = kwargs.get("letters", "abcdefgh"), kwargs.get("length", 5)
    for s in _draws(task):
        body, eq = s.prompt[:-1], s.prompt[-1]
        assert eq == "=" and len(body) == length and set(body) <= set(letters)
        assert s.answer == body[::-1]
        assert task.score(s, s.answer) == 1.0


@pytest.mark.parametrize("length", [5, 9])
def test_sort_digits_samples(length):
    task = SortDigitsTask(length=length)
    for s in _draws(task):
        assert re.fullmatch(rf"[0-9]{{{length}}}:", s.prompt)
        assert s.answer == "".join(sorted(s.prompt[:-1]))
        assert task.score(s, s.answer) == 1.0


@pytest.mark.parametrize("digits", [1, 2, 4])
def test_addition_samples(digits):
    task = AdditionTask(digits=digits)
    draws = _draws(task)
    for s in draws:
        m = re.fullmatch(r"([0-9]+)\+([0-9]+)=", s.prompt)
        assert m, s.prompt
        a, b = int(m.group(1)), int(m.group(2))
        assert 0 <= a < 10**digits and 0 <= b < 10**digits
        assert s.answer == str(a + b)
        assert s.metadata == {"a": a, "b": b}
        assert task.score(s, s.answer) == 1.0
    assert len({s.prompt for s in draws}) > 1


@pytest.mark.parametrize("kwargs", [{}, {"length": 12, "letters": "ab"}])
def test_count_samples(kwargs):
    task = CountTask(**kwargs)
    letters, length = kwargs.get("letters", "abc"), kwargs.get("length", 8)
    for s in _draws(task):
        body, rest = s.prompt.split(",")
        target = rest[:-1]
        assert rest.endswith("=") and len(body) == length and set(body) <= set(letters) and target in letters
        assert s.answer == str(body.count(target))
        assert s.metadata == {"letter": target}


@pytest.mark.parametrize("length", [1, 3, 6])
def test_bracket_samples(length):
    task = BracketTask(length=length)
    for s in _draws(task):
        assert s.prompt.endswith("!") and len(s.prompt) == length + 1
        assert s.answer == f"({s.prompt[:-1]})"
        assert task.score(s, s.answer) == 1.0


ALL_TASK_CONFIGS = [
    ("reverse", {}),
    ("reverse", {"length": 9}),
    ("sort_digits", {}),
    ("addition", {}),
    ("addition", {"digits": 3}),
    ("count", {}),
    ("count", {"length": 10}),  # a two-digit count is possible
    ("bracket", {}),
]


@pytest.mark.parametrize(("name", "kwargs"), ALL_TASK_CONFIGS)
def test_prompts_and_answers_fit_the_task_limits(name, kwargs):
    task = make_task(name, **kwargs)
    tok = CharTokenizer(task.alphabet)
    for s in _draws(task, seed=7):
        assert len(tok.encode(s.prompt)) <= task.max_prompt_chars
        answer_ids = tok.encode(s.answer)  # the answer can be written with the alphabet
        # an exact-match answer must leave room for EOS; positional ones fill the limit
        needs_eos = name in ("addition", "count")
        assert len(answer_ids) + int(needs_eos) <= task.max_response_tokens


@pytest.mark.parametrize(("name", "kwargs"), ALL_TASK_CONFIGS)
def test_sampling_uses_only_the_given_rng(name, kwargs):
    task = make_task(name, **kwargs)
    assert _draws(task, seed=3) == _draws(task, seed=3)
    assert _draws(task, seed=3) != _draws(task, seed=4)


# ------------------------------------------------------------------------------------------------ make_task
@pytest.mark.parametrize("name", NO_ARGUMENT_TASKS)
def test_make_task_builds_each_builtin(name):
    task = make_task(name)
    assert isinstance(task, Task) and task.name == name


def test_env_ids_cover_every_builtin_task():
    # "file" has its own id, textenv/File-v0, outside ENV_IDS because it cannot be built without a path
    assert sorted(textenv.ENV_IDS.values()) == sorted(set(textenv.TASKS) - {"file"})


def test_make_task_unknown_name_lists_builtins():
    with pytest.raises(ValueError, match="unknown task 'nope'") as err:
        make_task("nope")
    for name in textenv.TASKS:
        assert name in str(err.value)


@pytest.mark.parametrize(
    ("name", "kwargs", "match"),
    [
        ("reverse", {"colour": "red"}, "rejected its arguments"),
        ("addition", {"digits": 2, "extra": 1}, "rejected its arguments"),
        ("reverse", {"length": 0}, "length must be >= 1"),
        ("addition", {"digits": 0}, "digits must be >= 1"),
        ("count", {"letters": ""}, "letters non-empty"),
    ],
)
def test_make_task_bad_kwargs(name, kwargs, match):
    with pytest.raises(ValueError, match=match):
        make_task(name, **kwargs)


def test_make_task_from_import_path(monkeypatch, request):
    monkeypatch.syspath_prepend(str(request.path.parent))
    task = make_task("user_tasks:EchoTask", length=4)
    assert type(task).__name__ == "EchoTask" and task.length == 4
    s = task.sample(np.random.default_rng(0))
    assert s.prompt == s.answer + "?" and task.score(s, s.answer) == 1.0


@pytest.mark.parametrize(
    ("path", "match"),
    [
        ("user_tasks:NotATask", "not a textenv.tasks.Task"),
        ("user_tasks:Missing", "cannot be imported"),
        ("no_such_module_xyz:Task", "cannot be imported"),
        ("user_tasks:", "import path"),
    ],
)
def test_make_task_bad_import_path(monkeypatch, request, path, match):
    monkeypatch.syspath_prepend(str(request.path.parent))
    with pytest.raises(ValueError, match=match):
        make_task(path)


def test_make_task_import_path_bad_kwargs(monkeypatch, request):
    monkeypatch.syspath_prepend(str(request.path.parent))
    with pytest.raises(ValueError, match="rejected its arguments"):
        make_task("user_tasks:EchoTask", size=3)


# ------------------------------------------------------------------------------------------------ tokenizer
def test_char_tokenizer_round_trip_and_ids():
    tok = CharTokenizer("abcab=")  # duplicates are dropped, order kept
    assert (tok.pad_token_id, tok.eos_token_id, tok.vocab_size) == (0, 1, 6)
    assert tok.encode("abc=") == [2, 3, 4, 5]
    for text in ["", "a", "cab=", "==ab", "abcabc"]:
        assert tok.decode(tok.encode(text)) == text
    assert tok.decode([0, 2, 1, 3, 0]) == "ab"  # pad and eos are dropped
    assert isinstance(tok, textenv.Tokenizer)


@pytest.mark.parametrize("name", NO_ARGUMENT_TASKS)
def test_char_tokenizer_round_trips_task_samples(name):
    task = make_task(name)
    tok = CharTokenizer(task.alphabet)
    for s in _draws(task)[:10]:
        assert tok.decode(tok.encode(s.prompt)) == s.prompt
        assert tok.decode(tok.encode(s.answer)) == s.answer


def test_char_tokenizer_unknown_char_names_it():
    tok = CharTokenizer("abc")
    with pytest.raises(ValueError, match=r"character 'z'"):
        tok.encode("abz")


def test_char_tokenizer_needs_an_alphabet():
    with pytest.raises(ValueError, match="non-empty alphabet"):
        CharTokenizer("")
