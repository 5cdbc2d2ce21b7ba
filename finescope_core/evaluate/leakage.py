"""The text of every kind of evaluation item, as the contamination check reads it.

Domain and general items are records with a text. Multiple-choice and numeric items, and lm-eval task
documents, are question-shaped objects: their text is everything a model could have memorised from
training data that holds the item, the question with its choices or its reference answer.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from finescope_core.evaluate.contamination import check_contamination

ITEM_KINDS = ("domain", "general", "mc", "numeric", "lm_eval")
"""Every kind of evaluation item, in report order."""


def mc_text(item: Mapping[str, Any]) -> str:
    """A `{question, choices, answer}` item: the question, then each choice on its own line."""
    return "\n".join([str(item["question"]), *(str(c) for c in item["choices"])])


def numeric_text(item: Mapping[str, Any]) -> str:
    """A `{question, answer}` item: the question, then its reference answer (a worked solution or a
    number)."""
    return f"{item['question']}\n{item['answer']}"


def document_text(doc: Mapping[str, Any]) -> str:
    """An lm-eval document of any task: every string in it (nested ones included), in field order."""
    parts: list[str] = []

    def walk(value: Any) -> None:
        if isinstance(value, str):
            parts.append(value)
        elif isinstance(value, Mapping):
            for v in value.values():
                walk(v)
        elif isinstance(value, list | tuple):
            for v in value:
                walk(v)

    walk(doc)
    return "\n".join(parts)


def pool_duplicates_by_kind(
    pool_texts: Sequence[str], kinds: Mapping[str, Sequence[str]]
) -> tuple[list[int], dict[str, int]]:
    """Which curation-pool records overlap an evaluation item (13-gram or near duplicate), and how many
    per kind.

    Args:
        pool_texts: the texts of the records that could reach curation.
        kinds: kind -> the texts of its evaluation items.

    Returns:
        The pool indices overlapping any item (sorted), and kind -> how many pool records overlap that
        kind's items (a record overlapping two kinds counts in both).
    """
    everything = [t for texts in kinds.values() for t in texts]
    if not everything:
        return [], {}
    found = check_contamination(pool_texts, everything)
    hits = sorted(found.ngram + found.near_duplicate)
    # Attributed on the (few) hits only: one pass over the whole pool, not one per kind.
    hit_texts = [pool_texts[i] for i in hits]
    counts = {kind: check_contamination(hit_texts, texts).dropped for kind, texts in kinds.items() if texts}
    return hits, counts
