"""Text rows (plain-text records under `teacher.text_records: text`) are learned as text: one sequence,
no chat template, every token a loss token for CE and for KD, beside chat rows in one mixed set."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch.testing import assert_close
from transformers import PreTrainedModel

from finescope_core.config import FinetuneConfig
from finescope_core.finetune import build_examples, evaluate_loss, lora_finetune
from finescope_core.prompts import encode_prompt
from finescope_core.tiny import byte_tokenizer, tiny_model
from tests.core.test_finetune import ROWS

TEXTS = [
    "A lease is a contract granting use of property for a term.",
    "Tort: a civil wrong causing harm.",
    "Estoppel bars a party from denying what it earlier asserted.",
]
TEXT_ROWS = [{"id": f"t{i}", "text": t, "source": "text"} for i, t in enumerate(TEXTS)]
ONE_STEP = dict(
    rank=4, alpha=8, dropout=0.0, batch_size=8, grad_accum=1, max_length=128, warmup_ratio=0.0
) | {"method": "lora", "epochs": 1, "lr": 1e-3, "eval_fraction": 0.0}


def _expressive(seed: int) -> PreTrainedModel:
    model = tiny_model(seed=seed)
    with torch.no_grad():
        model.lm_head.weight.mul_(10)
    return model


def _text_ids(text: str) -> list[int]:
    tok = byte_tokenizer()
    return list(tok(text)["input_ids"]) + [tok.eos_token_id]


@torch.no_grad()
def _logits(model: torch.nn.Module, ids: list[int]) -> torch.Tensor:
    """Logits of one unpadded sequence, [len, vocab]."""
    return model(input_ids=torch.tensor([ids])).logits[0].float()


def _hand_ce(model: torch.nn.Module, ids: list[int], start: int) -> tuple[float, int]:
    """Summed NLL of ids[start:] each given the tokens before it, and their count (start >= 1)."""
    logp = F.log_softmax(_logits(model, ids), -1)
    return -sum(float(logp[i - 1, ids[i]]) for i in range(start, len(ids))), len(ids) - start


def _hand_kl(student: torch.nn.Module, teacher: torch.nn.Module, ids: list[int], t: float) -> float:
    """T^2 * sum over every position predicting a token of KL(p_teacher^T || p_student^T)."""
    p = F.softmax(_logits(teacher, ids)[:-1] / t, -1)
    q = F.softmax(_logits(student, ids)[:-1] / t, -1)
    return t * t * float((p * (p.log() - q.log())).sum())


def test_a_text_row_is_one_sequence_with_every_token_a_label_and_no_chat_template() -> None:
    tok = byte_tokenizer()
    built = build_examples(tok, TEXT_ROWS, 128)
    assert [e["input_ids"] for e in built.examples] == [_text_ids(t) for t in TEXTS]
    assert all(e["labels"] == e["input_ids"] for e in built.examples)
    assert all("assistant" not in tok.decode(e["input_ids"]) for e in built.examples)  # the template's role
    cut = build_examples(tok, TEXT_ROWS, 10)
    assert cut.truncated == 3 and all(len(e["input_ids"]) == 10 for e in cut.examples)


def test_a_text_rows_loss_is_the_token_averaged_ce_over_all_its_tokens(tmp_path: Path) -> None:
    """The first step's loss (CE only) equals a hand-computed CE over every token after the first."""
    student = _expressive(0)
    sums = [_hand_ce(student, _text_ids(t), 1) for t in TEXTS]
    hand = sum(s for s, _ in sums) / sum(n for _, n in sums)
    cfg = FinetuneConfig(**ONE_STEP | {"kd_weight": 0.0})
    summary = lora_finetune(student, byte_tokenizer(), TEXT_ROWS, cfg, tmp_path / "out")
    assert summary.steps == 1 and summary.train_examples == 3
    assert_close(summary.train_loss[0], hand, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("kd_tokens", ["response", "all"])
def test_the_kd_term_of_a_text_row_covers_all_its_positions(tmp_path: Path, kd_tokens: str) -> None:
    """(1 - w) CE / tokens + w KD / positions, with KD a hand KL over every position of every text,
    whatever `kd_tokens` says: for a text row the whole text is the response."""
    student, teacher = _expressive(0), _expressive(1).eval()
    ids = [_text_ids(t) for t in TEXTS]
    n = sum(len(x) - 1 for x in ids)
    ce = sum(_hand_ce(student, x, 1)[0] for x in ids)
    kd = sum(_hand_kl(student, teacher, x, 1.5) for x in ids)
    cfg = FinetuneConfig(**ONE_STEP | {"kd_weight": 0.7, "kd_temperature": 1.5, "kd_tokens": kd_tokens})
    summary = lora_finetune(student, byte_tokenizer(), TEXT_ROWS, cfg, tmp_path / "out", teacher=teacher)
    assert_close(summary.train_kd[0], kd / n, rtol=1e-4, atol=1e-5)
    assert_close(summary.train_loss[0], 0.3 * ce / n + 0.7 * kd / n, rtol=1e-4, atol=1e-5)


def test_a_mixed_set_learns_chat_rows_on_their_responses_and_text_rows_on_all_their_tokens(
    tmp_path: Path,
) -> None:
    tok = byte_tokenizer()
    student = _expressive(0)
    sums = [_hand_ce(student, _text_ids(t), 1) for t in TEXTS]
    for row in ROWS:
        prompt = encode_prompt(tok, row["prompt"])
        response = list(tok(row["response"], add_special_tokens=False)["input_ids"]) + [tok.eos_token_id]
        sums.append(_hand_ce(student, prompt + response, len(prompt)))
    hand = sum(s for s, _ in sums) / sum(n for _, n in sums)
    rows = [*TEXT_ROWS, *ROWS]
    first = lora_finetune(
        copy.deepcopy(student), tok, rows, FinetuneConfig(**ONE_STEP | {"kd_weight": 0.0}), tmp_path / "a"
    )
    assert_close(first.train_loss[0], hand, rtol=1e-4, atol=1e-5)

    # Trained on the mixed set, the student's loss falls on both kinds.
    text_ex, chat_ex = build_examples(tok, TEXT_ROWS, 128).examples, build_examples(tok, ROWS, 128).examples
    before = [evaluate_loss(student, ex, 4, tok.pad_token_id) for ex in (text_ex, chat_ex)]
    cfg = FinetuneConfig(**ONE_STEP | {"kd_weight": 0.0, "epochs": 8, "lr": 1e-2, "batch_size": 2})
    lora_finetune(student, tok, rows, cfg, tmp_path / "b")
    after = [evaluate_loss(student, ex, 4, tok.pad_token_id) for ex in (text_ex, chat_ex)]
    assert after[0] < 0.8 * before[0] and after[1] < 0.8 * before[1]
