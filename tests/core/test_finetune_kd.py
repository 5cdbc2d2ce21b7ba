"""Tests of logit distillation, the Trainer loop's best-epoch choice and `method: full` on tiny decoders."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch.testing import assert_close
from transformers import AutoModelForCausalLM, PreTrainedModel

from finescope_core.config import FinetuneConfig
from finescope_core.finetune import (
    FinetuneError,
    build_examples,
    distill_loss,
    evaluate_kd,
    evaluate_loss,
    kd_loss,
    lora_finetune,
    pad_batch,
    split_indices,
)
from finescope_core.tiny import byte_tokenizer, tiny_model
from tests.core.test_finetune import ROWS

SMALL = dict(
    method="lora",
    rank=4,
    alpha=8,
    dropout=0.0,
    batch_size=2,
    grad_accum=1,
    max_length=128,
    warmup_ratio=0.0,
    kd_weight=0.0,
)


def _expressive_tiny(seed: int = 0) -> PreTrainedModel:
    model = tiny_model(seed=seed)
    with torch.no_grad():
        model.lm_head.weight.mul_(10)
    return model


@torch.no_grad()
def _logits(model: torch.nn.Module) -> torch.Tensor:
    enc = byte_tokenizer()(["Add 2 and 3.", "Hello there, friend"], padding=True, return_tensors="pt")
    return model(**enc).logits


def test_kd_loss_matches_a_hand_computed_kl_and_scales_with_t_squared() -> None:
    student = torch.tensor([[1.0, 0.0, -1.0], [0.5, 0.5, 0.0]])
    teacher = torch.tensor([[0.0, 1.0, 0.0], [2.0, 0.0, 0.0]])
    for t in (1.0, 2.0):
        hand = 0.0
        for s_row, t_row in zip(student / t, teacher / t, strict=True):
            p, q = F.softmax(t_row, -1), F.softmax(s_row, -1)
            hand += float((p * (p.log() - q.log())).sum())
        assert_close(float(kd_loss(student, teacher, t)), t * t * hand, rtol=1e-5, atol=1e-6)
    with pytest.raises(FinetuneError, match="vocabulary"):
        kd_loss(student, teacher[:, :2])


def test_kd_term_is_zero_for_the_same_weights_and_positive_otherwise() -> None:
    tok = byte_tokenizer()
    batch = pad_batch(build_examples(tok, ROWS, 128).examples, tok.pad_token_id)
    student = _expressive_tiny(0).eval()
    same = copy.deepcopy(student)
    with torch.no_grad():
        parts = distill_loss(student, batch, same, 0.5, 2.0)
        assert abs(parts.kd) < 1e-6
        assert_close(float(parts.loss), 0.5 * parts.ce, rtol=1e-5, atol=1e-5)
        other = distill_loss(student, batch, _expressive_tiny(1).eval(), 0.5, 1.0)
    assert other.kd > 1e-3 and other.tokens == parts.tokens
    assert_close(float(other.loss), 0.5 * other.ce + 0.5 * other.kd, rtol=1e-5, atol=1e-5)


def test_training_with_kd_moves_the_student_towards_the_teacher(tmp_path: Path) -> None:
    tok = byte_tokenizer()
    teacher, student = _expressive_tiny(1).eval(), _expressive_tiny(0)
    examples = build_examples(tok, ROWS, 128).examples
    before = evaluate_kd(student, teacher, examples, 4, tok.pad_token_id)
    cfg = FinetuneConfig(
        **SMALL | {"epochs": 10, "lr": 1e-2, "eval_fraction": 0.0, "kd_weight": 0.9, "temperature": 2.0}
    )
    summary = lora_finetune(student, tok, ROWS, cfg, tmp_path / "out", teacher=teacher)
    after = evaluate_kd(student, teacher, examples, 4, tok.pad_token_id)
    assert after < 0.8 * before
    assert len(summary.train_kd) == summary.steps and summary.train_kd[-1] < summary.train_kd[0]
    assert (
        summary.kd_weight == 0.9
        and json.loads((tmp_path / "out" / "finetune.json").read_text())["kd_weight"] == 0.9
    )


def test_kd_without_a_teacher_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(FinetuneError, match="teacher"):
        lora_finetune(
            tiny_model(), byte_tokenizer(), ROWS, FinetuneConfig(**SMALL | {"kd_weight": 0.5}), tmp_path / "o"
        )


def test_kd_lowers_the_held_out_loss(tmp_path: Path) -> None:
    rows = ROWS * 3
    cfg = FinetuneConfig(**SMALL | {"epochs": 3, "lr": 5e-3, "eval_fraction": 0.25, "kd_weight": 0.5})
    summary = lora_finetune(
        _expressive_tiny(0), byte_tokenizer(), rows, cfg, tmp_path / "out", teacher=_expressive_tiny(0)
    )
    assert summary.eval_loss_before is not None and min(summary.eval_loss) < summary.eval_loss_before


def test_the_saved_model_is_the_best_epoch(tmp_path: Path) -> None:
    """A too-high learning rate makes later epochs worse; the saved weights are those of argmin(eval_loss)."""
    rows = [{"prompt": f"Question {i}: what is {i} plus {i}?", "response": f"{2 * i}"} for i in range(12)]
    epochs = 5
    base_cfg = SMALL | {"eval_fraction": 0.25, "lr": 1.0, "rank": 8, "max_grad_norm": 100.0, "epochs": epochs}
    full = lora_finetune(
        _expressive_tiny(0), byte_tokenizer(), rows, FinetuneConfig(**base_cfg), tmp_path / "a"
    )
    losses = full.eval_loss
    assert len(losses) == epochs
    best = min(range(epochs), key=lambda i: losses[i]) + 1
    assert full.best_epoch == best
    assert best < epochs, f"the test needs a later epoch that is worse: {losses}"
    # The saved model's held-out loss is the best epoch's, not the last one's.
    tok = byte_tokenizer()
    built = build_examples(tok, rows, 128).examples
    _, held_idx = split_indices(len(built), 0.25, 0)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "a" / "merged").eval()
    assert math.isclose(
        evaluate_loss(reloaded, [built[i] for i in held_idx], 2, tok.pad_token_id),
        losses[best - 1],
        rel_tol=1e-4,
    )


def test_method_full_saves_a_loadable_full_model_and_no_adapter(tmp_path: Path) -> None:
    model = _expressive_tiny(0)
    pruned_logits = _logits(model)
    cfg = FinetuneConfig(**SMALL | {"method": "full", "epochs": 2, "lr": 1e-3, "eval_fraction": 0.0})
    summary = lora_finetune(model, byte_tokenizer(), ROWS, cfg, tmp_path / "out")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["finetune.json", "merged"]
    assert summary.adapter_dir is None and summary.method == "full"
    assert summary.trainable_params == sum(p.numel() for p in model.parameters())
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out" / "merged").eval()
    assert_close(_logits(reloaded), _logits(model))
    assert not torch.allclose(_logits(reloaded), pruned_logits, atol=1e-3)


def test_lora_merged_logits_equal_the_adapter_applied_logits(tmp_path: Path) -> None:
    from peft import PeftModel

    base = _expressive_tiny(0)
    base.save_pretrained(tmp_path / "base")
    cfg = FinetuneConfig(**SMALL | {"epochs": 2, "lr": 1e-2, "eval_fraction": 0.0})
    lora_finetune(_expressive_tiny(0), byte_tokenizer(), ROWS, cfg, tmp_path / "out")
    applied = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(tmp_path / "base"), tmp_path / "out" / "adapter"
    ).eval()
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "out" / "merged").eval()
    assert_close(_logits(merged), _logits(applied), atol=1e-5, rtol=1e-4)
    assert not torch.allclose(_logits(merged), _logits(base.eval()), atol=1e-3)
    assert load_file(str(tmp_path / "out" / "adapter" / "adapter_model.safetensors"))


def test_kd_over_all_tokens_covers_every_real_position_and_matches_a_hand_kl() -> None:
    tok = byte_tokenizer()
    batch = pad_batch(build_examples(tok, ROWS, 128).examples, tok.pad_token_id)
    student, teacher = _expressive_tiny(0).eval(), _expressive_tiny(1).eval()
    with torch.no_grad():
        resp = distill_loss(student, batch, teacher, 0.5, 2.0, "response")
        every = distill_loss(student, batch, teacher, 0.5, 2.0, "all")
        same = distill_loss(student, batch, copy.deepcopy(student), 0.5, 2.0, "all")
        s_logits, t_logits = (
            student(**{k: batch[k] for k in ("input_ids", "attention_mask")}).logits,
            teacher(**{k: batch[k] for k in ("input_ids", "attention_mask")}).logits,
        )
    real = batch["attention_mask"][:, 1:].bool()
    assert every.kd_positions == int(real.sum()) > resp.kd_positions == resp.tokens
    assert every.tokens == resp.tokens and every.ce == resp.ce  # the CE term stays on the responses
    hand = kd_loss(s_logits[:, :-1][real], t_logits[:, :-1][real], 2.0)
    assert_close(every.kd, float(hand), rtol=1e-5, atol=1e-5)
    assert every.kd > resp.kd > 0 and abs(same.kd) < 1e-5
    # The mix divides each term by its own positions.
    assert_close(
        float(every.mixed(resp.tokens, every.kd_positions)),
        0.5 * every.ce / resp.tokens + 0.5 * every.kd / every.kd_positions,
    )
    with pytest.raises(FinetuneError, match="kd_tokens"):
        distill_loss(student, batch, teacher, 0.5, 1.0, "prompt")


@pytest.mark.parametrize("kd_tokens", ["response", "all"])
@pytest.mark.parametrize(("batch_size", "grad_accum"), [(4, 1), (1, 4), (2, 2)])
def test_a_step_averages_each_term_over_its_positions_in_the_whole_step(
    tmp_path: Path, kd_tokens: str, batch_size: int, grad_accum: int
) -> None:
    """The first step's loss (all 4 examples, whatever the micro-batches) is (1-w) CE / response
    tokens + w KD / KD positions of the step, computed by hand on the untrained student."""
    tok = byte_tokenizer()
    teacher = _expressive_tiny(1).eval()
    student = _expressive_tiny(0)
    examples = build_examples(tok, ROWS, 128).examples
    with torch.no_grad():
        parts = distill_loss(
            copy.deepcopy(student).eval(), pad_batch(examples, tok.pad_token_id), teacher, 0.7, 1.5, kd_tokens
        )
    hand = 0.3 * parts.ce / parts.tokens + 0.7 * parts.kd / parts.kd_positions
    cfg = FinetuneConfig(
        **SMALL
        | {"batch_size": batch_size, "grad_accum": grad_accum, "epochs": 1, "lr": 1e-3, "eval_fraction": 0.0}
        | {"kd_weight": 0.7, "temperature": 1.5, "kd_tokens": kd_tokens}
    )
    summary = lora_finetune(student, tok, ROWS, cfg, tmp_path / "out", teacher=teacher)
    assert summary.steps == 1 and summary.kd_tokens == kd_tokens
    assert_close(summary.train_loss[0], hand, rtol=1e-4, atol=1e-5)
    assert_close(summary.train_kd[0], parts.kd / parts.kd_positions, rtol=1e-4, atol=1e-5)


def test_kd_over_all_tokens_brings_the_prompt_distributions_closer_than_response_kd(tmp_path: Path) -> None:
    tok = byte_tokenizer()
    teacher = _expressive_tiny(1).eval()
    examples = build_examples(tok, ROWS, 128).examples
    after = {}
    for kd_tokens in ("response", "all"):
        cfg = FinetuneConfig(
            **SMALL
            | {"epochs": 10, "lr": 1e-2, "eval_fraction": 0.0, "kd_weight": 0.9, "kd_tokens": kd_tokens}
        )
        student = _expressive_tiny(0)
        lora_finetune(student, tok, ROWS, cfg, tmp_path / kd_tokens, teacher=teacher)
        after[kd_tokens] = evaluate_kd(student, teacher, examples, 4, tok.pad_token_id, kd_tokens="all")
    before = evaluate_kd(_expressive_tiny(0), teacher, examples, 4, tok.pad_token_id, kd_tokens="all")
    assert after["all"] < after["response"] < before
