"""The distillation phase: the student learns the teacher's next-token distributions over a stream of
packed pool texts, until the token budget is spent.

The texts are tokenised as they are read and packed (each followed by EOS) into rows of `max_length`
tokens, so every position is a real token and every micro-batch weighs the same. The teacher's logits
are computed per micro-batch under `inference_mode` and dropped after its loss: memory holds one
micro-batch's logits, whatever the budget.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import PreTrainedTokenizerBase, get_cosine_schedule_with_warmup

from finescope_core.config import RecoverConfig
from finescope_core.finetune.losses import kd_loss
from finescope_core.progress import Progress

MAX_GRAD_NORM = 1.0
"""Gradient clipping (global L2 norm), as in the tuning stage's default."""


@dataclass
class PhaseSummary:
    """What the phase did (`recover.json`)."""

    tokens: int = 0
    """Tokens the student trained on (every packed position)."""
    steps: int = 0
    """Optimiser steps."""
    records_read: int = 0
    """Pool records read at least once (the stream repeats the pool when the budget exceeds it)."""
    passes: float = 0.0
    """Records read over the pool's size: above 1 when the budget repeats the pool."""
    loss: list[float] = field(default_factory=list)
    """Per-token loss of every optimiser step, in order."""
    seconds: float = 0.0


@dataclass(frozen=True)
class LossTerms:
    """One micro-batch's loss, summed over its positions."""

    total: Tensor
    """`T^2 * KL(teacher || student) + ce_weight * CE`, summed (carries the gradient)."""
    kd: float
    ce: float
    positions: int
    """Positions that predict a next token: rows x (length - 1)."""


def recover_loss(
    student: nn.Module, teacher: nn.Module, input_ids: Tensor, temperature: float, ce_weight: float
) -> LossTerms:
    """The phase's loss on packed rows (every token real): T^2 * KL over every position that predicts a
    next token, plus `ce_weight` times the cross entropy of those next tokens."""
    logits = student(input_ids=input_ids).logits[:, :-1]
    with torch.inference_mode():
        t_logits = teacher(input_ids=input_ids.to(_device(teacher))).logits[:, :-1]
    # Cloned out of inference mode: the KL's backward saves it.
    t_flat = t_logits.reshape(-1, t_logits.shape[-1]).to(logits.device).float().clone()
    s_flat = logits.reshape(-1, logits.shape[-1]).float()
    kd = kd_loss(s_flat, t_flat, temperature)
    total = kd
    ce_value = 0.0
    if ce_weight > 0:
        ce = F.cross_entropy(s_flat, input_ids[:, 1:].reshape(-1), reduction="sum")
        total = kd + ce_weight * ce
        ce_value = float(ce.detach())
    return LossTerms(total, float(kd.detach()), ce_value, int(s_flat.shape[0]))


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def packed_rows(
    texts: Sequence[str], tokenizer: PreTrainedTokenizerBase, max_length: int, read: list[int]
) -> Iterator[list[int]]:
    """Rows of `max_length` token ids from `texts` read in order and again from the start, each text
    followed by EOS; `read[0]` counts the texts read so far. Endless (the caller stops at its budget).

    Raises:
        ValueError: no text has a token.
    """
    eos = tokenizer.eos_token_id
    buffer: list[int] = []
    while True:
        added = 0
        for text in texts:
            read[0] += 1
            ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
            buffer.extend(ids + ([int(eos)] if eos is not None else []))
            added += len(ids)
            while len(buffer) >= max_length:
                yield buffer[:max_length]
                buffer = buffer[max_length:]
        if added == 0:  # a whole pass without a token: the stream would never fill a row
            raise ValueError("the recovery pool holds no text: no training-pool record to distil on")


def train_phase(
    student: nn.Module,
    teacher: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    texts: Sequence[str],
    cfg: RecoverConfig,
    lr: float,
    progress: Progress,
    autocast: torch.dtype | None = None,
) -> PhaseSummary:
    """Train `student` (its parameters that require grad) for `ceil(tokens / tokens per step)` optimiser
    steps of AdamW with warm-up and cosine decay, on packed rows of `texts`.

    Each step's loss is its micro-batches' summed loss over the step's positions, so every token weighs
    the same. `autocast`: the 16-bit dtype the matmuls run in over float32 master weights (full tuning).
    """
    per_step = cfg.batch_size * cfg.max_length * cfg.grad_accum
    steps = max(1, math.ceil(cfg.tokens / per_step))
    params = [p for p in student.parameters() if p.requires_grad]
    optimiser = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    schedule = get_cosine_schedule_with_warmup(optimiser, math.ceil(cfg.warmup_ratio * steps), steps)
    device = _device(student)
    read = [0]
    rows = packed_rows(texts, tokenizer, cfg.max_length, read)
    summary = PhaseSummary()
    start = time.perf_counter()
    teacher.eval()
    student.train()
    for step in range(1, steps + 1):
        step_loss = 0.0
        for _ in range(cfg.grad_accum):
            batch = torch.tensor([next(rows) for _ in range(cfg.batch_size)], device=device)
            with _autocast(device, autocast):
                terms = recover_loss(student, teacher, batch, cfg.kd_temperature, cfg.ce_weight)
            # Every micro-batch has the same positions: the step's mean is the sum over all of them.
            norm = terms.positions * cfg.grad_accum
            torch.autograd.backward(terms.total / norm)  # Tensor.backward is untyped
            step_loss += float(terms.total.detach()) / norm
            summary.tokens += int(batch.numel())
        torch.nn.utils.clip_grad_norm_(params, MAX_GRAD_NORM)
        optimiser.step()
        schedule.step()
        optimiser.zero_grad(set_to_none=True)
        summary.loss.append(step_loss)
        summary.steps = step
        progress(step, steps, loss=step_loss)
    student.eval()
    summary.records_read = min(read[0], len(texts))
    summary.passes = read[0] / len(texts) if texts else 0.0
    summary.seconds = time.perf_counter() - start
    return summary


def _autocast(device: torch.device, dtype: torch.dtype | None) -> contextlib.AbstractContextManager[None]:
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)
