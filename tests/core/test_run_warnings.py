"""Warnings about data a run lost or measured thinly: one sentence each, with counts, shares and reasons."""

from __future__ import annotations

from finescope_core.data import Record, RecordSet, deduplicate
from finescope_core.run_warnings import (
    SMALL_EVAL_SET,
    duplicate_warnings,
    eval_set_warnings,
    fallback_warnings,
)


def test_duplicates_removed_are_counted_against_the_whole_corpus():
    texts = ["a b", "A  b", "c", "a b", "d"]  # two copies of "a b" up to case and whitespace
    records = [Record(id=str(i), text=t, fields={}, origin=f"x:{i}") for i, t in enumerate(texts)]
    prepared = deduplicate(RecordSet(records))
    info = {"records": len(prepared.corpus), "dropped_duplicates": prepared.dropped_duplicates}
    [line] = duplicate_warnings(info)
    assert line.startswith("corpus: 2 of 5 records (40 %) removed as exact duplicates")
    assert duplicate_warnings({"records": 5, "dropped_duplicates": []}) == []


def test_teacher_fallbacks_give_count_share_and_reasons_per_variant():
    distillation = {
        "curated": {
            "kept_teacher": 2,
            "fell_back_to_reference": 6,
            "dropped": 0,
            "fell_back": {"truncated": 4, "wrong_answer": 2},
            "dropped_by_reason": {},
        },
        "random": {"kept_teacher": 8, "fell_back_to_reference": 0, "dropped": 0},
    }
    [line] = fallback_warnings(distillation)
    assert line.startswith(
        "teacher (curated): 6 of 8 responses (75 %) fell back to the reference answer and 0 "
    )
    assert "by reason: truncated 4, wrong_answer 2" in line


def test_dropped_responses_count_with_their_reasons():
    [line] = fallback_warnings(
        {
            "curated": {
                "kept_teacher": 1,
                "fell_back_to_reference": 0,
                "dropped": 3,
                "dropped_by_reason": {"empty": 3},
            }
        }
    )
    assert "0 of 4 responses (0 %) fell back" in line and "3 (75 %) were dropped; by reason: empty 3" in line


def test_evaluation_sets_under_the_threshold_are_named_with_the_fix():
    small = {
        "domain": {"kept": SMALL_EVAL_SET - 1, "checked": 40},
        "general": {"kept": 0, "checked": 0},
        "split": {"records": 10},
    }
    lines = eval_set_warnings(small)
    assert len(lines) == 2
    expected = f"evaluation: the domain set has {SMALL_EVAL_SET - 1} items (under {SMALL_EVAL_SET}; 40 "
    assert lines[0].startswith(expected)
    assert "evaluate.eval_file" in lines[0] and "the general set has 0 items" in lines[1]
    assert eval_set_warnings({"domain": {"kept": SMALL_EVAL_SET, "checked": SMALL_EVAL_SET}}) == []
