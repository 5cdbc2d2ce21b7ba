"""Tests of the one generation loop (`finescope_core.generate`) and the one answer parser
(`finescope_core.answers`): the same tokens as the teacher's and the numeric metric's former loops,
and the same final answer in the teacher's filter and the metric."""

from __future__ import annotations

import copy
from decimal import Decimal

import pytest
import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from finescope_core.data import Record
from finescope_core.evaluate import extract_number, generate_answers, numeric_hits
from finescope_core.generate import generate_batch
from finescope_core.prompts import encode_prompt, format_prompt
from finescope_core.teacher import distilled_line, final_number, wrong_answer
from finescope_core.tiny import byte_tokenizer, tiny_model

QUESTIONS = ["What is 2 + 2?", "Hi", "How many eggs does Janet sell every day at the market?"]


@torch.no_grad()
def _old_teacher_loop(
    model: PreTrainedModel, tok: PreTrainedTokenizerBase, prompts: list[list[int]], max_new_tokens: int
) -> list[list[int]]:
    """The teacher's former `generate_batch` (greedy), new tokens cut at the first EOS."""
    eos = [model.generation_config.eos_token_id, tok.eos_token_id]
    tok.padding_side = "left"
    enc = tok.pad({"input_ids": prompts}, padding=True, return_tensors="pt")
    tok.padding_side = "right"
    gen = copy.deepcopy(model.generation_config)
    gen.max_new_tokens, gen.max_length, gen.pad_token_id, gen.eos_token_id = max_new_tokens, None, 0, eos
    gen.do_sample, gen.temperature, gen.top_p, gen.top_k = False, None, None, None
    out = model.generate(**enc, generation_config=gen).tolist()
    rows = [row[enc["input_ids"].shape[1] :] for row in out]
    return [row[: next((i for i, t in enumerate(row) if t in eos), len(row))] for row in rows]


@torch.no_grad()
def _old_numeric_loop(
    model: PreTrainedModel, tok: PreTrainedTokenizerBase, questions: list[str], max_new_tokens: int
) -> list[str]:
    """Numeric exact match's former `_generate_batch`: text prompts, decoded new tokens."""
    templated = bool(tok.chat_template)
    texts = [format_prompt(tok, q) for q in questions]
    enc = tok(texts, padding=True, padding_side="left", add_special_tokens=not templated, return_tensors="pt")
    out = model.generate(
        input_ids=enc["input_ids"],
        attention_mask=enc["attention_mask"],
        max_new_tokens=max_new_tokens,
        do_sample=False,
        pad_token_id=tok.pad_token_id,
    )
    return tok.batch_decode(out[:, enc["input_ids"].shape[1] :], skip_special_tokens=True)


@pytest.mark.parametrize("chat", [True, False])
def test_generate_batch_gives_the_teacher_loops_tokens(chat: bool) -> None:
    model, tok = tiny_model().eval(), byte_tokenizer()
    if not chat:
        tok.chat_template = None
    prompts = [encode_prompt(tok, q) for q in QUESTIONS]
    new = [g.token_ids for g in generate_batch(model, tok, prompts, max_new_tokens=12)]
    assert new == _old_teacher_loop(model, tok, prompts, 12)


@pytest.mark.parametrize("chat", [True, False])
def test_numeric_answers_are_the_numeric_loops_texts(chat: bool) -> None:
    model, tok = tiny_model().eval(), byte_tokenizer()
    if not chat:
        tok.chat_template = None
    order = sorted(QUESTIONS, key=lambda q: -len(format_prompt(tok, q)))  # one batch, as both run it
    old = _old_numeric_loop(model, tok, order, 12)
    new = generate_answers(model, tok, order, max_new_tokens=12, batch_size=len(order))
    assert new == [text.split("\nQuestion:", 1)[0] for text in old]


BOXED = "Step 1: 3 apples, then 12 more, 15 in all.\nSo the answer is \\boxed{42}, not 7 or 99."


def test_the_teachers_filter_and_the_numeric_metric_read_the_same_final_answer() -> None:
    assert final_number(BOXED) == 42.0 and extract_number(BOXED) == Decimal(42)
    record = Record(
        id="r", text="", origin="test:r", fields={"instruction": "Add.", "output": "So 40 + 2 = 42\n#### 42"}
    )
    assert not wrong_answer(BOXED, record.reference)
    assert distilled_line(record, BOXED, False, 8)["source"] == "teacher"
    assert wrong_answer(BOXED.replace("42", "43"), record.reference)


class _Canned(torch.nn.Module):
    """A fake LM whose generate() appends one fixed reply to every prompt."""

    def __init__(self, tok: PreTrainedTokenizerBase, reply: str) -> None:
        super().__init__()
        self.anchor = torch.nn.Parameter(torch.zeros(1))
        self.new = tok(reply, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]

    def generate(self, input_ids: torch.Tensor, **_: object) -> torch.Tensor:
        return torch.cat([input_ids, torch.tensor([self.new] * len(input_ids))], dim=1)


def test_the_metric_scores_right_what_the_filter_keeps() -> None:
    tok = byte_tokenizer()
    hits = numeric_hits(_Canned(tok, BOXED), tok, [{"question": "Add.", "answer": 42}], max_new_tokens=200)
    assert hits == [1]
