"""Tests of finescope_core.teacher: prompts, the reject filter, batched generation and resume."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import PreTrainedModel

from finescope_core.config import TeacherConfig
from finescope_core.data import Record
from finescope_core.distilled import read_distilled
from finescope_core.teacher import (
    PLAIN_TEMPLATE,
    REWRITE_INSTRUCTION,
    TeacherError,
    by_prompt_length,
    distilled_line,
    encode_prompt,
    fit_prompt,
    format_prompt,
    generate_batch,
    generate_distilled,
    reject_reason,
    teacher_message,
    user_prompt,
)
from finescope_core.tiny import byte_tokenizer, tiny_model


def _record(i: int, **fields: str) -> Record:
    return Record(id=f"r{i}", text=" ".join(fields.values()), fields=dict(fields), origin=f"test:{i}")


def _records(n: int) -> list[Record]:
    """Instruction records with and without reference, with and without input, and plain texts."""
    out = []
    for i in range(n):
        kind = i % 4
        if kind == 0:
            out.append(_record(i, instruction=f"Add {i} and {i + 1}.", output=f"The sum is {2 * i + 1}."))
        elif kind == 1:
            out.append(_record(i, instruction="Name a prime number", input=f"above {i * 7}"))
        elif kind == 2:
            out.append(_record(i, text=f"Plain passage number {i} about cells" + "." * i))
        else:
            out.append(_record(i, instruction="Explain", input="why?", output="Because it is so, always."))
    return out


def _plain_tokenizer():
    tok = byte_tokenizer()
    tok.chat_template = None
    return tok


# -- prompts ----------------------------------------------------------------------------------------


def test_user_prompt_joins_instruction_and_input_and_uses_text_otherwise() -> None:
    assert (
        user_prompt(_record(0, instruction=" Sum these ", input=" 2 and 3 ", output="5"))
        == "Sum these\n\n2 and 3"
    )
    assert user_prompt(_record(1, instruction="Sum", input="", output="5")) == "Sum"
    assert user_prompt(_record(2, text="A passage.")) == "A passage."
    with pytest.raises(TeacherError, match="empty instruction"):
        user_prompt(_record(3, instruction=" ", input="", output="x"))


def test_rewrite_prompt_only_when_a_reference_exists() -> None:
    with_ref = _record(0, instruction="What is 2+2?", output="It is 4.")
    msg = teacher_message(with_ref)
    assert msg.startswith("What is 2+2?") and "It is 4." in msg and msg.endswith(REWRITE_INSTRUCTION)
    assert "do not mention the reference" in REWRITE_INSTRUCTION
    assert teacher_message(_record(1, instruction="What is 2+2?")) == "What is 2+2?"
    assert teacher_message(_record(2, instruction="What is 2+2?", output="  ")) == "What is 2+2?"


def test_chat_and_prompt_completion_records_ask_their_request_and_rewrite_their_reference() -> None:
    chat = Record(
        id="m",
        text="",
        origin="test:m",
        fields={
            "messages": [
                {"role": "system", "content": "Answer in French."},
                {"role": "user", "content": "Capital of Italy?"},
                {"role": "assistant", "content": "Rome."},
            ]
        },
    )
    assert user_prompt(chat) == "Answer in French.\n\nCapital of Italy?"
    msg = teacher_message(chat)
    assert (
        msg.startswith("Answer in French.\n\nCapital of Italy?")
        and "Rome." in msg
        and msg.endswith(REWRITE_INSTRUCTION)
    )
    line = distilled_line(chat, "", truncated=False, min_chars=1)
    assert (line["prompt"], line["response"], line["source"]) == (
        "Answer in French.\n\nCapital of Italy?",
        "Rome.",
        "reference",
    )
    pc = Record(id="p", text="", origin="test:p", fields={"prompt": "Tell a joke.", "completion": ""})
    assert user_prompt(pc) == teacher_message(pc) == "Tell a joke."
    with pytest.raises(
        TeacherError, match="test:q: record 'q' has an empty instruction and input \\(or an empty prompt"
    ):
        user_prompt(Record(id="q", text="x", origin="test:q", fields={"prompt": " ", "completion": "x"}))


def test_format_uses_the_chat_template_when_present_else_plain() -> None:
    tok = byte_tokenizer()
    assert format_prompt(tok, "hi") == "<s>user\nhi</s>\n<s>assistant\n"
    assert format_prompt(_plain_tokenizer(), "hi") == PLAIN_TEMPLATE.format(prompt="hi")
    ids = encode_prompt(tok, "hi")
    assert ids[0] == tok.bos_token_id and ids.count(tok.bos_token_id) == 2  # template tokens, none added
    assert tok.decode(encode_prompt(_plain_tokenizer(), "hi")) == PLAIN_TEMPLATE.format(prompt="hi")


# -- reject filter -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("response", "kw", "reason"),
    [
        ("   \n", {}, "empty"),
        ("A full and fine answer", {"truncated": True}, "truncated"),
        ("Four.", {}, "too_short"),
        ("Based on the Reference Answer, it is four.", {}, "mentions_scaffolding"),
        ("Here is my REWRITE: it is four.", {}, "mentions_scaffolding"),
        ("In my own words, it is four.", {}, "mentions_scaffolding"),
        ("### Response:\nit is four", {"rewrite": False}, "mentions_scaffolding"),
        ("What is two plus two in decimal arithmetic", {}, "copies_prompt"),
        ("Two plus two equals four, a basic fact.", {}, None),
        ("Here is a rewritten version of your response.", {"rewrite": False}, None),
        ("Four.", {"min_chars": 0}, None),
    ],
)
def test_reject_reason(response: str, kw: dict, reason: str | None) -> None:
    parts = ["What is two plus two in decimal arithmetic?", "It is 4."]
    assert reject_reason(response, parts, **kw) == reason


def test_scaffold_words_the_user_wrote_are_allowed() -> None:
    parts = ["Rewrite this sentence in the passive voice: the cat ate the fish."]
    assert reject_reason("The fish was eaten by the cat, rewrite done.", parts) is None
    assert (
        reject_reason("The fish was eaten by the cat, rewrite done.", ["Make it passive."])
        == "mentions_scaffolding"
    )


def test_rejected_response_falls_back_to_reference_or_drops() -> None:
    with_ref = _record(0, instruction="Add 2 and 3.", output="The sum is 5.")
    no_ref = _record(1, instruction="Add 2 and 3.")
    # (the numeric check would reject it: "five" is no number; tests/core/test_teacher_fixes.py covers it)
    kept = distilled_line(
        with_ref, " 2 plus 3 gives five. ", truncated=False, min_chars=8, check_answer=False
    )
    assert kept == {
        "id": "r0",
        "prompt": "Add 2 and 3.",
        "response": "2 plus 3 gives five.",
        "source": "teacher",
        "rejected": None,
    }
    back = distilled_line(with_ref, "The reference answer says 5.", truncated=False, min_chars=8)
    assert (back["response"], back["source"], back["rejected"]) == (
        "The sum is 5.",
        "reference",
        "mentions_scaffolding",
    )
    dropped = distilled_line(no_ref, "2 plus 3 gives", truncated=True, min_chars=8)
    assert (dropped["response"], dropped["source"], dropped["rejected"]) == (None, None, "truncated")


# -- generation --------------------------------------------------------------------------------------


def test_batched_left_padded_generation_equals_one_by_one() -> None:
    model, tok = tiny_model(), byte_tokenizer()
    prompts = [encode_prompt(tok, teacher_message(r)) for r in _records(5)]
    assert len({len(p) for p in prompts}) > 1
    seen: list[torch.Tensor] = []
    original = model.generate

    def spy(**kw):
        seen.append(kw["attention_mask"])
        return original(**kw)

    model.generate = spy
    batched = generate_batch(model, tok, prompts, max_new_tokens=12)
    single = [generate_batch(model, tok, [p], max_new_tokens=12)[0] for p in prompts]
    assert batched == single
    assert tok.padding_side == "right"
    mask = seen[0]
    assert (mask[:, -1] == 1).all() and (mask[:, 0] == 0).any()  # padding on the left
    assert all(len(g.token_ids) <= 12 for g in batched)
    assert all(g.truncated == (len(g.token_ids) == 12) for g in batched)


def test_generation_stops_at_eos() -> None:
    model, tok = tiny_model(), byte_tokenizer()
    with torch.no_grad():  # make EOS the argmax everywhere after the first step's token
        model.lm_head.weight[tok.eos_token_id] = 50 * model.lm_head.weight.mean(0)
    gens = generate_batch(model, tok, [encode_prompt(tok, "hi")], max_new_tokens=10)
    assert gens[0].truncated is False and len(gens[0].token_ids) < 10


def test_sampling_is_seeded_per_batch_and_leaves_the_global_rng_alone(tmp_path: Path) -> None:
    model, tok = tiny_model(), byte_tokenizer()
    cfg = TeacherConfig(max_new_tokens=6, batch_size=2, temperature=1.0, text_records="elaborate")
    outputs: list[torch.Tensor] = []
    original = model.generate

    def spy(**kw):
        outputs.append(original(**kw))
        return outputs[-1]

    model.generate = spy
    torch.manual_seed(123)
    state = torch.get_rng_state()
    for i, seed in enumerate((3, 3, 4)):
        generate_distilled(model, tok, _records(3), cfg, tmp_path / f"{i}.jsonl", seed=seed)
    assert torch.equal(torch.get_rng_state(), state)
    first, again, other = outputs[0:2], outputs[2:4], outputs[4:6]
    assert all(torch.equal(x, y) for x, y in zip(first, again, strict=True))
    assert not torch.equal(first[0], other[0])
    assert not torch.equal(first[0][:1], first[1][:1])  # batches draw different streams


def _finish_early(model: PreTrainedModel, step: int) -> list[int]:
    """Wrap model.generate so every row ends with EOS after `step` real greedy tokens (a random model
    never stops by itself); the returned list gets each call's batch size."""
    calls: list[int] = []
    original = model.generate

    def wrapped(**kw):
        calls.append(kw["input_ids"].shape[0])
        out = original(**kw).clone()
        if out.shape[1] > kw["input_ids"].shape[1] + step:  # else every row already stopped
            out[:, kw["input_ids"].shape[1] + step] = kw["generation_config"].eos_token_id[0]
        return out

    model.generate = wrapped
    return calls


class Killed(RuntimeError):
    pass


def test_resume_after_kill_equals_uninterrupted_run(tmp_path: Path) -> None:
    model, tok = tiny_model(), byte_tokenizer()
    cfg = TeacherConfig(max_new_tokens=12, batch_size=3, min_response_chars=1, text_records="elaborate")
    records = _records(10)  # batches of 3, 3, 3, 1
    calls = _finish_early(model, step=6)
    full = tmp_path / "full.jsonl"
    summary = generate_distilled(model, tok, records, cfg, full)
    assert summary.total == summary.generated == 10 and summary.resumed_from == 0
    assert summary.fell_back_to_reference + summary.dropped + summary.kept_teacher == 10
    assert summary.kept_teacher >= 3 and 0 < summary.new_tokens <= 60

    part = tmp_path / "part.jsonl"

    def kill_after_two(done: int, total: int) -> None:
        if done == 6:
            raise Killed

    with pytest.raises(Killed):
        generate_distilled(model, tok, records, cfg, part, progress=kill_after_two)
    lines = part.read_text().splitlines(keepends=True)
    assert len(lines) == 6
    full_lines = full.read_text().splitlines(keepends=True)
    assert [json.loads(line)["id"] for line in full_lines] == [
        r.id for r in records
    ]  # finished: the records' order
    # Until then lines are in generation order (longest prompt first).
    order = [r.id for r in by_prompt_length(tok, records, cfg.max_prompt_length)]
    assert order != [r.id for r in records]
    by_id = {json.loads(line)["id"]: line for line in full_lines}
    generated_order = [by_id[i] for i in order]
    assert lines == generated_order[:6]
    # A kill in the middle of the third batch's write leaves one complete line and a partial one.
    with part.open("a") as f:
        f.write(generated_order[6] + generated_order[7][:9])

    calls.clear()
    resumed = generate_distilled(model, tok, records, cfg, part)
    assert part.read_bytes() == full.read_bytes()
    assert resumed.resumed_from == 7 and resumed.generated == 3
    assert calls == [2, 1]  # the rest of batch 3, then batch 4
    keep = ("total", "kept_teacher", "fell_back_to_reference", "dropped", "rejected")
    assert {k: getattr(resumed, k) for k in keep} == {k: getattr(summary, k) for k in keep}

    assert generate_distilled(model, tok, records, cfg, part).generated == 0
    assert calls == [2, 1]


def test_output_lines_and_read_distilled(tmp_path: Path) -> None:
    model, tok = tiny_model(), byte_tokenizer()
    records = _records(4)
    out = tmp_path / "d.jsonl"
    cfg = TeacherConfig(max_new_tokens=4, batch_size=4, text_records="elaborate")
    summary = generate_distilled(model, tok, records, cfg, out)
    lines = [json.loads(x) for x in out.read_text().splitlines()]
    assert [x["id"] for x in lines] == [r.id for r in records]
    assert [x["prompt"] for x in lines] == [user_prompt(r) for r in records]
    assert all(REWRITE_INSTRUCTION not in x["prompt"] for x in lines)
    # A random tiny model's 4 tokens are never a usable answer (cut off, or an immediate EOS).
    assert [x["source"] for x in lines] == ["reference", None, None, "reference"]
    assert all(x["rejected"] in ("empty", "truncated") for x in lines)
    assert (
        sum(summary.rejected.values()) == 4 and summary.dropped == 2 and summary.fell_back_to_reference == 2
    )
    assert 0 < summary.new_tokens <= 16
    rows = read_distilled(out)
    assert [(r["id"], r["response"]) for r in rows] == [
        ("r0", "The sum is 1."),
        ("r3", "Because it is so, always."),
    ]


def test_resume_refuses_another_runs_file_and_duplicate_ids(tmp_path: Path) -> None:
    model, tok = tiny_model(), byte_tokenizer()
    out = tmp_path / "d.jsonl"
    out.write_text(json.dumps({"id": "elsewhere", "prompt": "p", "response": None}) + "\n")
    with pytest.raises(TeacherError, match="another run"):
        generate_distilled(model, tok, _records(2), TeacherConfig(), out)
    recs = _records(2)
    with pytest.raises(TeacherError, match="appears twice"):
        generate_distilled(model, tok, [recs[0], recs[0]], TeacherConfig(), tmp_path / "e.jsonl")


def test_a_request_too_long_for_the_prompt_budget_is_skipped_not_cut(tmp_path: Path) -> None:
    model, tok = tiny_model(), byte_tokenizer()
    long = _record(0, instruction="x" * 300 + " end", output="ref")
    calls: list[torch.Tensor] = []
    original = model.generate

    def spy(**kw):
        calls.append(kw["input_ids"])
        return original(**kw)

    model.generate = spy
    summary = generate_distilled(
        model, tok, [long], TeacherConfig(max_new_tokens=2, max_prompt_length=16), tmp_path / "d.jsonl"
    )
    assert calls == [] and summary.fell_back == {"prompt_too_long": 1}
    assert read_distilled(tmp_path / "d.jsonl")[0]["response"] == "ref"


@pytest.mark.slow
def test_default_model_batched_generation_equals_one_by_one() -> None:
    """The real teacher (SmolLM2-135M-Instruct, sdpa attention, chat template) under left padding."""
    from finescope_core.model import load_model

    model, tok = load_model("default", Path(__file__).resolve().parents[2] / ".finescope-cache", device="cpu")
    records = [
        _record(0, instruction="What is 7 times 8?", output="7 * 8 = 56."),
        _record(1, instruction="Name the largest planet of the solar system."),
        _record(2, text="Photosynthesis converts light energy into chemical energy."),
    ]
    prompts = [encode_prompt(tok, teacher_message(r)) for r in records]
    batched = generate_batch(model, tok, prompts, max_new_tokens=24)
    single = [generate_batch(model, tok, [p], max_new_tokens=24)[0] for p in prompts]
    assert batched == single
    assert tok.decode(prompts[1]).startswith("<|im_start|>system")


def test_generation_order_is_longest_prompt_first_ties_in_input_order() -> None:
    tok = byte_tokenizer()
    records = _records(12)
    ordered = by_prompt_length(tok, records, 512)
    lengths = [len(fit_prompt(tok, r, 512) or ()) for r in ordered]
    assert lengths == sorted(lengths, reverse=True) and sorted(r.id for r in ordered) == sorted(
        r.id for r in records
    )
    for a, b in zip(ordered, ordered[1:], strict=False):
        if len(fit_prompt(tok, a, 512) or ()) == len(fit_prompt(tok, b, 512) or ()):
            assert records.index(a) < records.index(b)


# -- plain-text records learned as text (teacher.text_records) ----------------------------------------


def test_text_records_become_text_lines_without_the_teacher_and_requests_stay_as_before(
    tmp_path: Path,
) -> None:
    model, tok = tiny_model(), byte_tokenizer()
    records = _records(8)  # two of them plain texts (kind 2)
    texts = {r.id for r in records if r.prompt is None}
    asked: list[list[int]] = []
    original = model.generate

    def spy(**kw):
        asked.extend(kw["input_ids"].tolist())
        return original(**kw)

    model.generate = spy
    cfg = TeacherConfig(max_new_tokens=6, batch_size=3, min_response_chars=1)
    summary = generate_distilled(model, tok, records, cfg, tmp_path / "text.jsonl")
    lines = {x["id"]: x for x in map(json.loads, (tmp_path / "text.jsonl").read_text().splitlines())}
    assert len(texts) == 2 and len(asked) == len(records) - 2  # the teacher never saw a plain text
    for r in records:
        if r.id in texts:
            assert lines[r.id] == {"id": r.id, "text": r.text, "source": "text", "rejected": None}
    assert summary.kept_text == 2 and summary.generated == 6 and summary.total == 8
    assert summary.kept_teacher + summary.fell_back_to_reference + summary.dropped == 6

    old = generate_distilled(
        model, tok, records, cfg.model_copy(update={"text_records": "elaborate"}), tmp_path / "old.jsonl"
    )
    old_lines = {x["id"]: x for x in map(json.loads, (tmp_path / "old.jsonl").read_text().splitlines())}
    assert all(old_lines[i] == lines[i] for i in lines if i not in texts)  # requests: as before
    assert all("prompt" in old_lines[i] for i in texts) and old.kept_text == 0 and len(asked) == 6 + 8

    rows = {row["id"]: row for row in read_distilled(tmp_path / "text.jsonl")}
    assert all(rows[i] == {"id": i, "text": lines[i]["text"], "source": "text"} for i in texts)


def test_all_text_records_need_no_teacher_model_and_requests_do(tmp_path: Path) -> None:
    tok = byte_tokenizer()
    records = [r for r in _records(12) if r.prompt is None]
    summary = generate_distilled(None, tok, records, TeacherConfig(), tmp_path / "d.jsonl")
    assert summary.kept_text == summary.total == 3 and summary.generated == 0
    assert [row["text"] for row in read_distilled(tmp_path / "d.jsonl")] == [r.text for r in records]
    with pytest.raises(TeacherError, match="need the teacher model"):
        generate_distilled(None, tok, _records(3), TeacherConfig(), tmp_path / "e.jsonl")
