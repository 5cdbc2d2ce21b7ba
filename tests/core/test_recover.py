"""The recovery phase: its loss against a hand-computed T^2 * KL (+ CE), the token budget, the stage's
outputs; the pool sampler's ranking, general share and random twin."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from finescope_core.config import FinetuneConfig, RecoverConfig
from finescope_core.data import Record
from finescope_core.progress import no_progress
from finescope_core.recover import (
    POOL_FILE,
    SUMMARY_FILE,
    RecoverInputs,
    draw_pool,
    draw_random,
    packed_rows,
    recover_loss,
    run,
    train_phase,
)
from finescope_core.stage import StageContext
from finescope_core.tiny import byte_tokenizer, tiny_model


def _teacher() -> torch.nn.Module:
    model = tiny_model(seed=1)
    with torch.no_grad():
        model.lm_head.weight.mul_(10)  # peaked distributions: a KL far from 0
    return model


def _hand_loss(student, teacher, ids: torch.Tensor, temperature: float, ce_weight: float) -> float:
    """T^2 * sum_positions sum_v p_t (log p_t - log p_s), softened by T, + ce_weight * sum -log p(next)."""
    with torch.no_grad():
        s = student(input_ids=ids).logits.double()
        t = teacher(input_ids=ids).logits.double()
    total = 0.0
    for b in range(ids.shape[0]):
        for i in range(ids.shape[1] - 1):
            p_t = torch.softmax(t[b, i] / temperature, -1)
            log_s = torch.log_softmax(s[b, i] / temperature, -1)
            total += temperature**2 * float((p_t * (p_t.log() - log_s)).sum())
            total += ce_weight * float(-torch.log_softmax(s[b, i], -1)[ids[b, i + 1]])
    return total


@pytest.mark.parametrize(("temperature", "ce_weight"), [(1.0, 0.0), (2.0, 0.3)])
def test_loss_is_the_hand_computed_kl_plus_ce(temperature, ce_weight):
    student, teacher = tiny_model(seed=0), _teacher()
    ids = torch.randint(3, 259, (2, 12), generator=torch.Generator().manual_seed(0))
    terms = recover_loss(student, teacher, ids, temperature, ce_weight)
    assert terms.positions == 2 * 11
    expected = _hand_loss(student, teacher, ids, temperature, ce_weight)
    assert math.isclose(float(terms.total), expected, rel_tol=1e-4)
    assert terms.total.requires_grad  # the student learns from it; the teacher does not
    assert all(p.grad is None for p in teacher.parameters())


def test_rows_are_packed_texts_with_eos_and_the_stream_repeats():
    tok = byte_tokenizer()
    read = [0]
    rows = packed_rows(["ab", "cde"], tok, 4, read)
    first, second = next(rows), next(rows)
    eos = tok.eos_token_id
    ids = lambda text: tok(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    assert first + second == (ids("ab") + [eos] + ids("cde") + [eos] + ids("ab") + [eos] + ids("cde"))[:8]
    assert read[0] >= 3  # the second row reached into the second pass
    with pytest.raises(ValueError, match="no text"):
        next(packed_rows(["", ""], tok, 4, [0]))


def _phase_cfg(**kw) -> RecoverConfig:
    base = dict(tokens=200, max_length=16, batch_size=2, grad_accum=2, warmup_ratio=0.0, kd_temperature=1.0)
    return RecoverConfig(**{**base, **kw})


TEXTS = [f"record {i}: the sum of {i} and {i + 1} is {2 * i + 1}." for i in range(12)]


def test_the_phase_spends_its_budget_and_its_first_step_is_the_loss_on_the_first_rows():
    student, teacher = tiny_model(seed=0), _teacher()
    tok = byte_tokenizer()
    cfg = _phase_cfg()
    per_step = cfg.batch_size * cfg.max_length * cfg.grad_accum  # 64 tokens
    rows = packed_rows(TEXTS, tok, cfg.max_length, [0])
    first = [torch.tensor([next(rows) for _ in range(cfg.batch_size)]) for _ in range(cfg.grad_accum)]
    expected = sum(_hand_loss(student, teacher, b, 1.0, 0.0) for b in first) / (
        cfg.grad_accum * cfg.batch_size * (cfg.max_length - 1)
    )
    for p in student.parameters():
        p.requires_grad_(True)
    summary = train_phase(student, teacher, tok, TEXTS, cfg, 1e-3, no_progress)
    assert summary.steps == math.ceil(200 / per_step) == 4
    assert summary.tokens == 4 * per_step
    assert math.isclose(summary.loss[0], expected, rel_tol=1e-4)
    assert summary.loss[-1] < summary.loss[0]  # the student moves towards the teacher


@pytest.mark.parametrize("method", ["lora", "full"])
def test_the_stage_writes_a_plain_model_its_summary_and_the_pool(tmp_path: Path, method: str):
    student, teacher = tiny_model(seed=0), _teacher()
    before = {n: p.detach().clone() for n, p in student.named_parameters()}
    pool = [Record(id=f"r{i}", text=t, fields={"text": t}, origin="x") for i, t in enumerate(TEXTS)]
    inputs = RecoverInputs(
        model=student,
        tokenizer=byte_tokenizer(),
        teacher=teacher,
        pool=pool,
        general=frozenset({"r3"}),
        tuning=FinetuneConfig(method=method, rank=4, alpha=8, dropout=0.0),
        dtype=torch.float32,
    )
    info = run(inputs, _phase_cfg(lr=1e-3), StageContext("cpu", "float32", 0), tmp_path, no_progress)
    saved = AutoModelForCausalLM.from_pretrained(tmp_path / "model")
    assert not any("lora" in n for n, _ in saved.named_parameters())  # merged: `tuned` gets a plain model
    moved = {n for n, p in saved.named_parameters() if not torch.equal(p, before[n])}
    assert moved, "the recovered weights differ from the pruned ones"
    summary = json.loads((tmp_path / SUMMARY_FILE).read_text())
    assert summary["tokens"] == info["tokens"] == 256 and summary["steps"] == 4
    assert summary["method"] == method and len(summary["loss"]) == 4
    assert summary["nearest_read"] + summary["general_read"] == summary["records_read"]
    lines = [json.loads(line) for line in (tmp_path / POOL_FILE).read_text().splitlines()]
    assert [row["id"] for row in lines] == [r.id for r in pool]
    assert [row["id"] for row in lines if row["general"]] == ["r3"]


def test_tokens_zero_is_refused_by_the_stage(tmp_path: Path):
    inputs = RecoverInputs(
        tiny_model(), byte_tokenizer(), _teacher(), [], frozenset(), FinetuneConfig(), torch.float32
    )
    with pytest.raises(ValueError, match="recover.tokens is 0"):
        run(inputs, RecoverConfig(tokens=0), StageContext("cpu", "float32", 0), tmp_path, no_progress)


def _records(n: int) -> list[Record]:
    return [Record(id=f"r{i}", text=f"text {i}", fields={}, origin="x") for i in range(n)]


SCORES = {f"r{i}": float((i * 7) % 20) for i in range(20)}  # a permutation of 0..19


def test_the_pool_ranks_by_score_nearest_first():
    draw = draw_pool(_records(20), SCORES, 6, 0.0, seed=0)
    by_score = sorted(SCORES, key=lambda i: -SCORES[i])
    assert draw.ids == by_score[:6] and not draw.general


def test_the_general_share_comes_at_random_from_the_rest_and_is_spread_through_the_stream():
    draws = [draw_pool(_records(20), SCORES, 10, 0.3, seed=s) for s in range(5)]
    by_score = sorted(SCORES, key=lambda i: -SCORES[i])
    for draw in draws:
        assert len(draw.general) == 3
        assert [i for i in draw.ids if i not in draw.general] == by_score[:7]
        assert draw.general <= set(by_score[7:])
        positions = [k for k, i in enumerate(draw.ids) if i in draw.general]
        assert positions == [3, 6, 9]  # evenly: floor(0.3 * i) of the first i
    assert len({d.general for d in draws}) > 1  # drawn at random, by seed
    assert draw_pool(_records(20), SCORES, 10, 0.3, seed=3) == draws[3]  # deterministic


def test_auto_draws_the_whole_pool_and_unscored_records_rank_last():
    scores = {"r5": 2.0, "r9": 1.0}
    draw = draw_pool(_records(12), scores, None, 0.0, seed=0)
    assert draw.ids[:2] == ["r5", "r9"] and sorted(draw.ids) == sorted(r.id for r in _records(12))


def test_the_random_twin_draws_its_whole_pool_at_random():
    pool = _records(50)
    draw = draw_random(pool, 20, seed=4)
    assert draw.ids == [r.id for r in random.Random(4).sample(pool, 20)]
    assert draw_random(pool, 20, seed=5).ids != draw.ids
    top = sorted(SCORES, key=lambda i: -SCORES[i])[:20]
    assert draw.ids != top and not draw.general


def test_the_report_shows_each_variants_phase_only_when_it_ran():
    from finescope_core.report.sections import recovery_section

    assert recovery_section({}) == []
    info = {"tokens": 1024, "steps": 8, "seconds": 3.5, "loss_start": 2.0, "loss_end": 1.5}
    (section,) = recovery_section({"recovery": {"curated": {**info, "nearest_read": 30, "general_read": 7}}})
    assert section.heading == "Recovery over the corpus"
    assert "| curated | 1024 | 8 | 3.5 | 2 → 1.5 | 30 / 7 |" in section.body
