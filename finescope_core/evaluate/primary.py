"""The run's primary metric: the one number a user and a benchmark read first, chosen by the domain items.

A domain of requests with reference answers is headlined by `chat_perplexity`, the perplexity of the
references' tokens after the chat prompt (what tuning learns from). A plain-text domain (items without
a request and a reference) has no response to score, so its chat perplexity is not measured at all,
and it is headlined by `perplexity`, the raw-text perplexity of the items (what a text row teaches).
metrics.json states the choice as `primary: {metric, why}`; the report opens with it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

CHAT = "chat_perplexity"
"""The primary metric of a domain whose items are mostly requests with reference answers."""
RAW_TEXT = "perplexity"
"""The primary metric of a plain-text domain."""
PRIMARY_METRICS = (CHAT, RAW_TEXT)


def primary_metric(models: Mapping[str, Mapping[str, Any]]) -> dict[str, str]:
    """`{"metric", "why"}` for metrics.json's `models`: chat perplexity when it was scored on at least
    half of the domain items (its `n` against raw text's), else raw-text perplexity.

    Chat perplexity is scored on the items with a request and a reference answer whose prompt fits
    `evaluate.max_length`. Every model is scored on the same items, so the counts are the first model's.
    """
    counts = next(iter(models.values()), {}).get("n") or {}
    items, chat = int(counts.get("perplexity", 0)), int(counts.get("chat") or 0)
    if chat and 2 * chat >= items:
        why = (
            f"{chat} of the {items} domain items are requests with a reference answer: the perplexity of "
            "the reference's tokens after the chat prompt, the tokens tuning learns from"
        )
        return {"metric": CHAT, "why": why}
    if chat:
        why = (
            f"only {chat} of the {items} domain items are requests with a reference answer (the others are "
            "plain text): the raw-text perplexity of every item"
        )
    else:
        why = (
            f"none of the {items} domain items is a request with a reference answer (a plain-text domain, "
            "or requests longer than evaluate.max_length): the raw-text perplexity of the items, the text "
            "a plain-text record teaches; chat perplexity does not apply"
        )
    return {"metric": RAW_TEXT, "why": why}
