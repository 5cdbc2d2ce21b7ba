"""Tests of the teacher's domain-fitted budget, request-keeping prompts, numeric answer check and counts."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from finescope_core.config import TeacherConfig
from finescope_core.data import Record
from finescope_core.teacher import (
    REWRITE_INSTRUCTION,
    auto_max_new_tokens,
    distilled_line,
    encode_prompt,
    final_number,
    fit_prompt,
    generate_distilled,
    resolve_max_new_tokens,
)
from finescope_core.tiny import byte_tokenizer, tiny_model


def _record(i: int, **fields: str) -> Record:
    return Record(id=f"r{i}", text=" ".join(fields.values()), fields=dict(fields), origin=f"test:{i}")


def test_auto_max_new_tokens_is_1_25_times_the_95th_percentile_of_reference_lengths_clamped() -> None:
    tok = byte_tokenizer()  # one token per byte
    records = [_record(i, instruction="q", output="a" * (10 * (i + 1))) for i in range(20)]  # 10..200 bytes
    lengths = sorted(len(tok(r.reference, add_special_tokens=False)["input_ids"]) + 1 for r in records)
    assert (
        lengths[18] == 191 and auto_max_new_tokens(tok, records) == 239
    )  # p95 of 20 = the 19th; ceil(1.25 * 191)
    assert auto_max_new_tokens(tok, records[:1]) == 32  # clamped up
    assert auto_max_new_tokens(tok, [_record(0, instruction="q", output="a" * 5000)]) == 1024  # clamped down
    assert auto_max_new_tokens(tok, [_record(0, text="no reference")]) == 128
    assert resolve_max_new_tokens(tok, records, TeacherConfig(max_new_tokens=7)) == 7
    assert resolve_max_new_tokens(tok, records, TeacherConfig()) == auto_max_new_tokens(tok, records)


def test_a_long_rewrite_prompt_keeps_the_question_and_shortens_the_reference() -> None:
    tok = byte_tokenizer()
    question = "QUESTION: how many apples does Ann have at the start?"
    record = _record(0, instruction=question, output="step " * 200 + "#### 5")
    ids = fit_prompt(tok, record, 400)
    assert ids is not None and len(ids) <= 400
    text = tok.decode(ids)
    assert question in text and REWRITE_INSTRUCTION in text and "..." in text
    assert fit_prompt(tok, record, 4000) == encode_prompt(
        tok, f"{question}\n\nReference answer:\n{record.reference}\n\n{REWRITE_INSTRUCTION}"
    )
    assert fit_prompt(tok, _record(1, instruction="x" * 400), 100) is None  # the request alone does not fit


@pytest.mark.parametrize(
    ("text", "strict", "number"),
    [
        ("so 3 + 4 = 7\n#### 7", True, 7.0),
        ("He pays $1,200 in total.\n#### 1,200", True, 1200.0),
        ("the answer is \\boxed{42}.", True, 42.0),
        ("The total is 18.", True, 18.0),
        ("In 1990 the city grew, and it is large now.", True, None),
        ("In 1990 the city grew, and it is large now.", False, 1990.0),
        ("no numbers here", False, None),
    ],
)
def test_final_number(text: str, strict: bool, number: float | None) -> None:
    assert final_number(text, strict=strict) == number


def test_a_wrong_final_number_falls_back_to_the_reference_as_wrong_answer() -> None:
    record = _record(0, instruction="Ann has 3 apples and buys 4. How many?", output="3 + 4 = 7\n#### 7")
    wrong = distilled_line(record, "She has 3 and buys 4 more, so she has 8 apples.", False, 8)
    assert (wrong["source"], wrong["rejected"], wrong["response"]) == (
        "reference",
        "wrong_answer",
        record.reference,
    )
    right = distilled_line(record, "She has 3 and buys 4 more, so she has 7 apples.", False, 8)
    assert (right["source"], right["rejected"]) == ("teacher", None)
    off = distilled_line(
        record, "She has 3 and buys 4 more, so she has 8 apples.", False, 8, check_answer=False
    )
    assert off["source"] == "teacher"
    essay = _record(1, instruction="Tell me about the city.", output="It was founded in 1990 and grew fast.")
    assert distilled_line(essay, "A city with a long history of growth.", False, 8)["source"] == "teacher"


def test_fallback_counts_by_reason_are_in_the_summary(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import finescope_core.teacher as teacher
    import finescope_core.teacher.backends as backends

    records = [
        _record(0, instruction="Add 3 and 4.", output="3 + 4 = 7\n#### 7"),
        _record(1, instruction="Add 1 and 1.", output="1 + 1 = 2\n#### 2"),
        _record(2, instruction="Say hi at length.", output="Hello there, my friend."),
        _record(3, instruction="x" * 400, output="ref"),
    ]
    replies = {"r0": "Adding them gives 8 in total.", "r1": "Adding them gives 2 in total.", "r2": "Hi"}

    def fake_generate(model, tok, prompts, *, max_new_tokens, temperature=0.0):
        seen.append(max_new_tokens)
        texts = [
            next(v for k, v in replies.items() if tok.decode(p).find(records[int(k[1])].prompt) >= 0)
            for p in prompts
        ]
        return [
            teacher.Generation(list(tok(t, add_special_tokens=False)["input_ids"]), truncated=False)
            for t in texts
        ]

    seen: list[int] = []
    monkeypatch.setattr(backends, "generate_batch", fake_generate)  # the HF backend generates
    summary = generate_distilled(
        tiny_model(), byte_tokenizer(), records, TeacherConfig(max_prompt_length=256), tmp_path / "d.jsonl"
    )
    assert summary.fell_back == {"prompt_too_long": 1, "too_short": 1, "wrong_answer": 1}
    assert (
        summary.rejected == summary.fell_back
        and summary.kept_teacher == 1
        and summary.dropped_by_reason == {}
    )
    assert summary.max_new_tokens_used == seen[0] == auto_max_new_tokens(byte_tokenizer(), records)
    info = summary.to_dict()
    assert info["fell_back"]["wrong_answer"] == 1 and info["max_new_tokens_used"] == seen[0]
    lines = [json.loads(x) for x in (tmp_path / "d.jsonl").read_text().splitlines()]
    assert [x["rejected"] for x in lines] == ["wrong_answer", None, "too_short", "prompt_too_long"]
