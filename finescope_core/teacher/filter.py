"""The teacher's reject filter: which responses the student may learn from, and what replaces the rest.

It catches empty, cut-off, too-short and scaffold-parroting responses, and (for numeric domains)
responses whose final answer differs from the reference's (read by `finescope_core.answers`, the
parser numeric exact match scores with): the reference answer is kept instead when there is one, and
the record is dropped when there is not.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

from finescope_core.answers import final_answer
from finescope_core.data import Record
from finescope_core.teacher.prompts import REWRITE_INSTRUCTION, user_prompt

REWRITE_PHRASES = (
    "reference answer",
    "your response",
    "your own response",
    "own words",
    "rewrite",
    "rewritten",
    "rephrase",
    "paraphrase",
    "original text",
    "original answer",
    "given answer",
    "provided answer",
    "this answer",
    REWRITE_INSTRUCTION.lower(),
)
"""Phrases of the rewrite scaffolding, looked for only in replies to a rewrite prompt. The last few
catch a small teacher's habit of grading the reference ("This answer is incorrect.") after answering."""
FORMAT_PHRASES = ("### instruction", "### response")
"""Markers of the Alpaca prompt format, which small models copy from their training data; looked for
in every reply."""
COPY_THRESHOLD = 0.8
"""A response whose word trigrams come from the prompt at least this often is a copy of it."""


def _words(text: str) -> list[str]:
    return re.findall(r"\w+", text.lower())


def _ngrams(words: list[str], n: int) -> set[tuple[str, ...]]:
    return {tuple(words[i : i + n]) for i in range(len(words) - n + 1)}


def copied_share(response: str, prompt_parts: Sequence[str], n: int = 3) -> float:
    """Share of the response's word n-grams that also occur in the prompt parts (0 for no words)."""
    words = _words(response)
    if not words:
        return 0.0
    n = min(n, len(words))
    source: set[tuple[str, ...]] = set()
    for part in prompt_parts:
        source |= _ngrams(_words(part), n)
    grams = [tuple(words[i : i + n]) for i in range(len(words) - n + 1)]
    return sum(g in source for g in grams) / len(grams)


def reject_reason(
    response: str,
    prompt_parts: Sequence[str],
    *,
    min_chars: int = 8,
    truncated: bool = False,
    rewrite: bool = True,
) -> str | None:
    """Why a teacher response is unusable, or None when it is kept.

    Args:
        response: the decoded response (special tokens removed).
        prompt_parts: the user's texts the teacher was shown (instruction, input, reference). A
            scaffold phrase these already contain is allowed (the user asked for a "rewrite").
        min_chars: shortest acceptable response, in characters after stripping.
        truncated: generation hit max_new_tokens without an end-of-sequence token.
        rewrite: the teacher saw the rewrite scaffolding (a reference answer). Without it, words like
            "rewrite" or "your response" are ordinary language and only format markers count.

    Returns:
        `empty`, `truncated`, `too_short`, `mentions_scaffolding`, `copies_prompt`, or None.
    """
    text = response.strip()
    if not text:
        return "empty"
    if truncated:
        return "truncated"
    if len(text) < min_chars:
        return "too_short"
    lowered = text.lower()
    user_text = "\n".join(prompt_parts).lower()
    phrases = FORMAT_PHRASES + (REWRITE_PHRASES if rewrite else ())
    if any(p in lowered and p not in user_text for p in phrases):
        return "mentions_scaffolding"
    if copied_share(text, prompt_parts) >= COPY_THRESHOLD:
        return "copies_prompt"
    return None


def final_number(text: str, *, strict: bool = False) -> float | None:
    """The final numeric answer of a text as a float (`finescope_core.answers.final_answer`).

    Args:
        strict: for references: only a text that ends with a number (or has `####` / `\\boxed`) has one.
    """
    answer = final_answer(text, strict=strict)
    return None if answer is None else float(answer)


def wrong_answer(response: str, reference: str | None) -> bool:
    """True when the reference has a numeric final answer and the response's differs (or is missing).

    Compared as numeric exact match compares (`final_answer`, equal as decimals), so a response kept
    here is one the metric scores as right.
    """
    if reference is None:
        return False
    expected = final_answer(reference, strict=True)
    if expected is None:
        return False
    return final_answer(response) != expected


def distilled_line(
    record: Record, response: str, truncated: bool, min_chars: int, *, check_answer: bool = True
) -> dict[str, Any]:
    """The output line of one record: the teacher's response, the reference, or a drop (response None).

    With `check_answer`, a response whose final number differs from the reference's numeric final
    answer is rejected as `wrong_answer` (the reference is kept).
    """
    parts = [p for p in (user_prompt(record), record.reference) if p]
    rewrite = record.reference is not None
    reason = reject_reason(response, parts, min_chars=min_chars, truncated=truncated, rewrite=rewrite)
    if reason is None and check_answer and wrong_answer(response, record.reference):
        reason = "wrong_answer"
    return output_line(record, response, reason)


def output_line(record: Record, response: str, reason: str | None) -> dict[str, Any]:
    """The line of a record whose response was kept (`reason` None), replaced by the reference, or
    dropped (no reference)."""
    line: dict[str, Any] = {"id": record.id, "prompt": user_prompt(record)}
    if reason is None:
        return line | {"response": response.strip(), "source": "teacher", "rejected": None}
    if record.reference is not None:
        return line | {"response": record.reference, "source": "reference", "rejected": reason}
    return line | {"response": None, "source": None, "rejected": reason}
