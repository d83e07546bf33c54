"""textenv.verifiers: final-answer extraction and the numeric and exact verifiers."""

from __future__ import annotations

from fractions import Fraction

import pytest

from textenv.verifiers import (
    VERIFIERS,
    exact_verifier,
    extract_final_answer,
    normalize_text,
    numeric_verifier,
    parse_number,
)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("so the answer is #### 42", "42"),
        ("3 + 4 = 7\n#### 7", "7"),
        ("#### 1 then #### 2", "2"),  # the last mark wins
        ("#### $1,234.50 ", "$1,234.50"),
        ("####", None),  # nothing after the mark
        ("The answer is 42.", "42"),  # a trailing period is not a decimal point
        ("It costs $15 in total", "$15"),
        ("A total of 1,234 apples", "1,234"),
        ("It is 12,345,678", "12,345,678"),
        ("The temperature is -5 degrees", "-5"),
        ("So 10-3 is 7", "7"),
        ("5-3", "3"),  # a minus between operands is not a sign
        ("Growth was 12.5%", "12.5%"),
        ("about .5 of it", ".5"),
        ("first 3, then 2.25 and finally 8", "8"),
        ("1,2,3", "3"),  # not thousands separators
        ("no numbers here", None),
        ("", None),
    ],
)
def test_extract_final_answer(text, expected):
    assert extract_final_answer(text) == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("42", Fraction(42)),
        ("3.0", Fraction(3)),
        ("1,000", Fraction(1000)),
        ("$1,234.50", Fraction(246_900, 200)),
        ("-5", Fraction(-5)),
        ("12.5%", Fraction(25, 2)),
        ("42.", Fraction(42)),
        ("18 dollars", Fraction(18)),
        (".5", Fraction(1, 2)),
        ("$", None),
        ("seven", None),
        (None, None),
    ],
)
def test_parse_number(text, expected):
    assert parse_number(text) == expected


@pytest.mark.parametrize(
    ("response", "answer", "expected"),
    [
        ("so the answer is #### 42", "6 * 7 = 42\n#### 42", 1.0),
        ("#### 41", "6 * 7 = 42\n#### 42", 0.0),
        ("The answer is 42.", "#### 42", 1.0),  # no mark: the last number
        ("#### 3.0", "#### 3", 1.0),
        ("#### 1,000", "#### 1000", 1.0),
        ("#### $1,000.00", "#### 1000", 1.0),
        ("#### 0.1", "#### 0.100002", 0.0),  # outside the 1e-6 tolerance
        ("#### 0.1", "#### 0.1000000001", 1.0),  # inside it
        ("#### -7", "#### 7", 0.0),
        ("I do not know", "#### 42", 0.0),
        ("", "#### 42", 0.0),
        ("#### 42", "no number", 0.0),  # an answer without a number matches nothing
        ("#### 12345678901234567890", "#### 12345678901234567891", 0.0),  # exact, not float, arithmetic
    ],
)
def test_numeric_verifier(response, answer, expected):
    assert numeric_verifier(response, answer) == expected


@pytest.mark.parametrize(
    ("response", "answer", "expected"),
    [
        ("Paris", "paris", 1.0),
        ("  New   York\n", "new york", 1.0),
        ("New\tYork", "New York", 1.0),
        ("NewYork", "New York", 0.0),
        ("Paris.", "Paris", 0.0),
        ("", "", 1.0),
    ],
)
def test_exact_verifier(response, answer, expected):
    assert exact_verifier(response, answer) == expected


def test_normalize_text():
    assert normalize_text("  A  b\n\tC ") == "a b c"


def test_verifiers_registry_returns_floats():
    assert sorted(VERIFIERS) == ["exact", "numeric"]
    for fn in VERIFIERS.values():
        assert type(fn("#### 1", "#### 1")) is float and fn("#### 1", "#### 1") == 1.0
