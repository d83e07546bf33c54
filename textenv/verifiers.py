"""Verifiers for free-text answers, such as GSM8K's ``... #### 42``.

A verifier is ``fn(response: str, answer: str) -> float`` returning 1.0 for a correct response and 0.0 otherwise;
:data:`VERIFIERS` names them for task configs (``verifier: numeric``).
"""

from __future__ import annotations

import re
from fractions import Fraction
from typing import Callable

FINAL_ANSWER_MARK = "####"
NUMERIC_TOLERANCE = Fraction(1, 10**6)

# A number as written in prose: an optional minus sign (not one joining two operands, as in "5-3"), an optional
# "$", digits with or without thousands separators ("1,234"), an optional decimal part, an optional "%".
# A trailing period is left out because the decimal part needs a digit after the dot.
_NUMBER = re.compile(
    r"(?:(?<![\w.)])-)?\$?(?:\d{1,3}(?:,\d{3})+(?!\d)|\d+)(?:\.\d+)?%?"
    r"|(?:(?<![\w.)])-)?\$?\.\d+%?"
)


def extract_final_answer(text: str) -> str | None:
    """The final answer in ``text``: what follows the last ``####`` if there is one, else the last number.

    Returns the answer as written (e.g. ``"$1,234.50"``), or None when there is none.
    """
    if FINAL_ANSWER_MARK in text:
        tail = text.rsplit(FINAL_ANSWER_MARK, 1)[1].strip()
        return tail or None
    numbers = _NUMBER.findall(text)
    return numbers[-1] if numbers else None


def parse_number(text: str | None) -> Fraction | None:
    """The first number in ``text`` as an exact fraction (``"1,000"`` -> 1000, ``"3.0"`` -> 3, ``"$-"`` -> None).

    ``$`` and ``%`` signs, thousands separators and a trailing period are ignored.
    """
    if text is None:
        return None
    match = _NUMBER.search(text)
    if match is None:
        return None
    return Fraction(match.group().replace(",", "").replace("$", "").replace("%", ""))


def normalize_text(text: str) -> str:
    """``text`` stripped, lowercased, with every run of whitespace made one space."""
    return " ".join(text.split()).lower()


def numeric_verifier(response: str, answer: str) -> float:
    """1.0 when the final numbers of ``response`` and ``answer`` agree within 1e-6, else 0.0."""
    got, want = parse_number(extract_final_answer(response)), parse_number(extract_final_answer(answer))
    return float(got is not None and want is not None and abs(got - want) <= NUMERIC_TOLERANCE)


def exact_verifier(response: str, answer: str) -> float:
    """1.0 when ``response`` equals ``answer`` up to case and whitespace, else 0.0."""
    return float(normalize_text(response) == normalize_text(answer))


VERIFIERS: dict[str, Callable[[str, str], float]] = {
    "numeric": numeric_verifier,
    "exact": exact_verifier,
}
