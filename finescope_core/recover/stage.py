"""The `recovered` stage's entry: distil the teacher into the pruned model over the drawn pool (LoRA,
merged at the end, or full, as `finetune.method` says) and write the plain model, `recover.json` and
the pool's ids."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from peft import PeftModel
from torch import nn
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from finescope_core.config import FinetuneConfig, RecoverConfig
from finescope_core.data import Record
from finescope_core.finetune.lora import attach_lora
from finescope_core.finetune.trainer import master_weights, private_rng
from finescope_core.io import write_atomic, write_jsonl
from finescope_core.progress import Progress
from finescope_core.recover.phase import PhaseSummary, train_phase
from finescope_core.stage import StageContext

MODEL_DIR = "model"
"""The recovered model as a plain transformers directory (with its tokenizer)."""
SUMMARY_FILE = "recover.json"
"""Tokens, steps, the loss at the start and end, seconds, and the records read (nearest / general)."""
POOL_FILE = "pool.jsonl"
"""The drawn pool in the order it is read: one `{"id", "general"}` line per record, for audit."""


@dataclass(frozen=True)
class RecoverInputs:
    """What the `recovered` stage reads, already loaded."""

    model: PreTrainedModel
    """The student (the pruned model), a private copy on its training device: trained in place."""
    tokenizer: PreTrainedTokenizerBase
    teacher: nn.Module
    """The model whose next-token distributions the student learns (same vocabulary)."""
    pool: list[Record]
    """The drawn pool, in reading order (`finescope_core.recover.sampler`)."""
    general: frozenset[str]
    """Ids of the pool's general records (drawn at random against forgetting)."""
    tuning: FinetuneConfig
    """The tuning method (`lora` or `full`) and the LoRA settings the phase trains with."""
    dtype: torch.dtype
    """The precision the recovered weights are stored in: the pruned checkpoint's."""


def run(
    inputs: RecoverInputs, section: RecoverConfig, ctx: StageContext, work_dir: Path, progress: Progress
) -> dict[str, Any]:
    """Distil over the pool until `section.tokens` are spent; write `model/`, `recover.json`, `pool.jsonl`.

    Raises:
        ValueError: `recover.tokens` is 0 (the stage does not run then) or the pool holds no text.
    """
    if section.tokens <= 0:
        raise ValueError("recover.tokens is 0: the recovered stage does not run; tune the pruned model")
    method = inputs.tuning.method
    teacher = inputs.teacher
    teacher.eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    texts = [r.text for r in inputs.pool]
    with private_rng(inputs.model.device):
        student = _trainable(inputs.model, inputs.tuning, ctx.seed)
        with master_weights(student, full=method == "full") as autocast:
            phase = train_phase(
                student,
                teacher,
                inputs.tokenizer,
                texts,
                section,
                section.learning_rate(method),
                progress,
                autocast,
            )
    merged: Any = student.merge_and_unload() if isinstance(student, PeftModel) else student
    if inputs.dtype != next(merged.parameters()).dtype:
        nn.Module.to(merged, inputs.dtype)  # transformers' wrapper of `to` hides its signature
    merged.save_pretrained(work_dir / MODEL_DIR, safe_serialization=True)
    inputs.tokenizer.save_pretrained(work_dir / MODEL_DIR)
    pool_rows = ({"id": r.id, "general": r.id in inputs.general} for r in inputs.pool)
    write_jsonl(pool_rows, work_dir / POOL_FILE, atomic=True)
    summary = _summary(phase, inputs, method)
    write_atomic(work_dir / SUMMARY_FILE, json.dumps(summary, indent=1))
    return {k: v for k, v in summary.items() if k != "loss"}


def _trainable(model: PreTrainedModel, tuning: FinetuneConfig, seed: int) -> nn.Module:
    """The model with LoRA adapters attached (seeded), or every weight trainable for full tuning."""
    if tuning.method == "lora":
        return attach_lora(model, tuning, seed)
    torch.manual_seed(seed)
    for p in model.parameters():
        p.requires_grad_(True)
    return model


def _summary(phase: PhaseSummary, inputs: RecoverInputs, method: str) -> dict[str, Any]:
    read = inputs.pool[: phase.records_read]
    general = sum(r.id in inputs.general for r in read)
    return {
        "method": method,
        "tokens": phase.tokens,
        "steps": phase.steps,
        "seconds": round(phase.seconds, 2),
        "tokens_per_second": round(phase.tokens / phase.seconds, 1) if phase.seconds else None,
        "loss_start": phase.loss[0] if phase.loss else None,
        "loss_end": phase.loss[-1] if phase.loss else None,
        "pool_records": len(inputs.pool),
        "pool_general": len(inputs.general),
        "records_read": phase.records_read,
        "nearest_read": len(read) - general,
        "general_read": general,
        "passes": round(phase.passes, 3),
        "pool_file": POOL_FILE,
        "loss": phase.loss,
    }
