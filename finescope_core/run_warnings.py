"""Warnings about data a run lost or measured too thinly: said in the log and on top of report.md.

Each function reads numbers the stages already record (the corpus stage's info, metrics.json's
`distillation` and `evaluation`) and returns one sentence per problem, naming the count, the share
and the setting to look at; an empty list when there is nothing to say.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

SMALL_EVAL_SET = 30
"""An evaluation set with fewer items than this gives intervals too wide to tell most models apart."""


def _share(part: int, whole: int) -> str:
    return f"{100 * part / whole:.0f} %" if whole > 0 else "n/a"


def duplicate_warnings(records: Mapping[str, Any], what: str = "corpus") -> list[str]:
    """Exact duplicates taken out of a record set, from its stage info (`records` kept, the
    `dropped_duplicates` ids)."""
    dropped = len(records.get("dropped_duplicates") or [])
    if dropped == 0:
        return []
    total = dropped + int(records.get("records", 0))
    return [
        f"{what}: {dropped} of {total} records ({_share(dropped, total)}) removed as exact duplicates "
        "(same text up to case and whitespace); the first copy of each was kept"
    ]


def fallback_warnings(distillation: Mapping[str, Mapping[str, Any]]) -> list[str]:
    """Per variant: records whose teacher response was rejected and replaced by the reference answer
    (or dropped, without one), with the share and the count by reason."""
    out = []
    for variant, info in distillation.items():
        fell_back, dropped = int(info.get("fell_back_to_reference", 0)), int(info.get("dropped", 0))
        if fell_back == 0 and dropped == 0:
            continue
        total = fell_back + dropped + int(info.get("kept_teacher", 0))
        reasons = _reasons(info.get("fell_back") or {}, info.get("dropped_by_reason") or {})
        out.append(
            f"teacher ({variant}): {fell_back} of {total} responses ({_share(fell_back, total)}) fell back "
            f"to the reference answer and {dropped} ({_share(dropped, total)}) were dropped; by reason: "
            f"{reasons} (see teacher.max_new_tokens, teacher.min_response_chars, teacher.check_answer)"
        )
    return out


def _reasons(fell_back: Mapping[str, int], dropped: Mapping[str, int]) -> str:
    counts = {k: fell_back.get(k, 0) + dropped.get(k, 0) for k in (*fell_back, *dropped)}
    ordered = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))  # most frequent first
    return ", ".join(f"{k} {v}" for k, v in ordered) or "none given"


def eval_set_warnings(evaluation: Mapping[str, Any]) -> list[str]:
    """Domain / general evaluation sets left with fewer than `SMALL_EVAL_SET` items after the
    contamination check."""
    out = []
    for name, fix in (
        ("domain", "evaluate.eval_file or a larger evaluate.split_fraction"),
        ("general", "evaluate.general_file or a larger evaluate.general_items"),
    ):
        info = evaluation.get(name)
        if not info or "kept" not in info:
            continue
        kept = int(info["kept"])
        if kept < SMALL_EVAL_SET:
            checked = info.get("checked", "?")
            out.append(
                f"evaluation: the {name} set has {kept} items (under {SMALL_EVAL_SET}; {checked} before the "
                f"contamination check): its intervals are wide and its numbers unreliable; give {fix}"
            )
    return out
