"""The final answer of a text: one parser for the teacher's answer check and the numeric metric.

The teacher's reject filter (`teacher.filter.wrong_answer`) and numeric exact match
(`evaluate.numeric`) both read a response's final number here, so a response the filter keeps as
right is one the metric scores as right, and the other way round.
"""

from __future__ import annotations

import re
from decimal import Decimal, InvalidOperation

_NUMBER_PATTERN = r"(?:(?<![\w.])[-−])?(?:\$[-−]?)?(?:\d+(?:,\d{3}(?!\d))*(?:\.\d+)?|\.\d+)"
_NUMBER = re.compile(_NUMBER_PATTERN)
"""A number as answers write it: "-" is a sign only when no word character comes before it ("3-4"
reads as 3 and 4), commas only between groups of three digits, an optional "$"."""
_BOXED = re.compile(r"\\boxed\{([^{}]*)\}")
_ENDS_WITH_NUMBER = re.compile(r"(" + _NUMBER_PATTERN + r")\s*[%$€£)*.!]*\s*$")


def final_answer(text: str, *, strict: bool = False) -> Decimal | None:
    """The final numeric answer of a text: GSM8K's `#### 42`, else the last `\\boxed{42}`, else a number.

    After the last "####", its first number; else the last number inside the last `\\boxed{}` that
    holds one; else the last number of the text. Commas between digit groups, "$" and a trailing "."
    are dropped, so "$1,234." reads as 1234.

    Args:
        strict: for references. Only a text that *ends* with a number (once `####` and `\\boxed` are
            ruled out) has a numeric answer, so an essay with a year in it has none. Not strict (for
            responses): the last number anywhere.

    Returns:
        The number as a Decimal (so "42.0" equals "42"), or None when the text has no numeric answer.
    """
    if "####" in text:
        found = _NUMBER.search(text.rsplit("####", 1)[1])
        if found is not None:
            return _to_decimal(found.group())
    boxed = [b for b in _BOXED.findall(text) if _NUMBER.search(b)]
    if boxed:
        return _to_decimal(_NUMBER.findall(boxed[-1])[-1])
    if strict:
        ending = _ENDS_WITH_NUMBER.search(text)
        return _to_decimal(ending.group(1)) if ending else None
    numbers = _NUMBER.findall(text)
    return _to_decimal(numbers[-1]) if numbers else None


def _to_decimal(token: str) -> Decimal:
    cleaned = token.replace("$", "").replace(",", "").replace("−", "-")
    try:
        return Decimal(cleaned)
    except InvalidOperation:  # "--5": two signs; the digits are still the answer
        return Decimal(cleaned.lstrip("-"))
