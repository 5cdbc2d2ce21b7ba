"""The tuning losses: cross entropy on the response tokens and logit distillation (KL) from the
teacher, summed over their positions, and their per-token means over held-out examples."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from finescope_core.finetune.errors import FinetuneError
from finescope_core.finetune.examples import IGNORE, Example, pad_batch


def response_loss(model: nn.Module, batch: dict[str, Tensor]) -> tuple[Tensor, int]:
    """Summed next-token cross entropy over the labelled (response) positions, and their number.

    Summing (not averaging) lets gradient accumulation weight every response token equally however
    the tokens fall into micro-batches.
    """
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    targets = batch["labels"][:, 1:]
    loss = F.cross_entropy(
        logits[:, :-1].float().reshape(-1, logits.shape[-1]),
        targets.reshape(-1),
        ignore_index=IGNORE,
        reduction="sum",
    )
    return loss, int((targets != IGNORE).sum())


def _shifted(logits: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    """Logits of the positions that predict a labelled token, [n, vocab], and those targets, [n]."""
    targets = labels[:, 1:]
    keep = targets != IGNORE
    return logits[:, :-1][keep].float(), targets[keep]


def kd_loss(student_logits: Tensor, teacher_logits: Tensor, temperature: float = 1.0) -> Tensor:
    """Summed `T^2 * KL(p_teacher^T || p_student^T)` over positions, each a row of `[n, vocab]` logits.

    Args:
        student_logits: the student's logits at the positions that carry loss.
        teacher_logits: the teacher's logits at the same positions (same vocabulary).
        temperature: softens both distributions; T^2 keeps the gradient scale comparable to CE.

    Returns:
        A scalar: the sum over positions (0 for no positions).
    """
    if student_logits.shape != teacher_logits.shape:
        raise FinetuneError(
            f"student logits {tuple(student_logits.shape)} and teacher logits "
            f"{tuple(teacher_logits.shape)} differ; "
            "the teacher must share the student's vocabulary (the pruned model keeps the base model's)"
        )
    log_s = F.log_softmax(student_logits.float() / temperature, dim=-1)
    log_t = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    kl = F.kl_div(log_s, log_t, log_target=True, reduction="sum")
    return kl * temperature**2


@dataclass
class LossParts:
    """Summed loss terms of one batch: CE over its response tokens, KD over its KD positions."""

    ce_sum: Tensor
    """Cross entropy summed over the response tokens (carries the gradient)."""
    kd_sum: Tensor | None
    """`T^2 * KL(teacher || student)` summed over the KD positions (carries the gradient); None without KD."""
    tokens: int
    """Response tokens (the positions of the CE term)."""
    kd_positions: int
    """Positions of the KD term: the response tokens (`kd_tokens: response`) or every position that
    predicts a real token, prompt included (`kd_tokens: all`); 0 without KD."""
    kd_weight: float = 0.0
    """w of the mix (0 without KD)."""

    @property
    def ce(self) -> float:
        return float(self.ce_sum.detach())

    @property
    def kd(self) -> float:
        return float(self.kd_sum.detach()) if self.kd_sum is not None else 0.0

    def mixed(self, ce_norm: float, kd_norm: float) -> Tensor:
        """`(1 - w) * CE / ce_norm + w * KD / kd_norm`: each term per token of its own positions when the
        norms are the step's counts of them (the step's response tokens for both when
        `kd_tokens: response`)."""
        if self.kd_sum is None or self.kd_weight == 0:
            return self.ce_sum / ce_norm
        return (1 - self.kd_weight) * self.ce_sum / ce_norm + self.kd_weight * self.kd_sum / kd_norm

    @property
    def loss(self) -> Tensor:
        """`(1 - w) * CE + w * KD`, both summed over their own positions."""
        return self.mixed(1.0, 1.0)


def kd_position_mask(batch: dict[str, Tensor], kd_tokens: str) -> Tensor:
    """[batch, len - 1] bool: the positions whose next-token distributions the KD term compares.

    `response`: those that predict a labelled (response) token; `all`: those that predict any real
    (non-padding) token, so the student also learns the teacher's distributions over the prompt.
    """
    if kd_tokens == "response":
        return batch["labels"][:, 1:] != IGNORE
    if kd_tokens == "all":
        return batch["attention_mask"][:, 1:].bool() & batch["attention_mask"][:, :-1].bool()
    raise FinetuneError(f"unknown finetune.kd_tokens {kd_tokens!r}; choose response or all")


def distill_loss(
    model: nn.Module,
    batch: dict[str, Tensor],
    teacher: nn.Module | None = None,
    kd_weight: float = 0.0,
    temperature: float = 1.0,
    kd_tokens: str = "response",
) -> LossParts:
    """Summed CE over the batch's response tokens and, with a teacher and `kd_weight` > 0, summed
    `T^2 * KL(teacher || student)` over its KD positions (`kd_position_mask`)."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    student, targets = _shifted(logits, batch["labels"])
    ce = F.cross_entropy(student, targets, reduction="sum")
    if teacher is None or kd_weight == 0:
        return LossParts(ce, None, int(targets.numel()), 0)
    keep = kd_position_mask(batch, kd_tokens)
    t_sel = _teacher_logits(teacher, batch, keep, logits.device)
    kd = kd_loss(logits[:, :-1][keep].float(), t_sel, temperature)
    return LossParts(ce, kd, int(targets.numel()), int(keep.sum()), kd_weight)


def _teacher_logits(
    teacher: nn.Module, batch: dict[str, Tensor], keep: Tensor, device: torch.device
) -> Tensor:
    """The teacher's float32 logits at the KD positions, on the student's device.

    Inference mode keeps no autograd state for the teacher's forward pass; the selected rows are
    cloned out of it, because the KD loss's backward saves them (an inference tensor cannot be saved).
    The teacher may sit on another device or spread over several (`teacher.device_map: auto`).
    """
    with torch.inference_mode():
        out = teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        t_logits: Tensor = out.logits
        selected = t_logits[:, :-1][keep.to(t_logits.device)].float()
    return selected.to(device).clone()


@torch.no_grad()
def evaluate_kd(
    model: nn.Module,
    teacher: nn.Module,
    examples: Sequence[Example],
    batch_size: int,
    pad_id: int,
    temperature: float = 1.0,
    kd_tokens: str = "response",
) -> float:
    """Mean `T^2 * KL(teacher || student)` per KD position (`kd_position_mask`) over `examples`, NaN
    when there are none."""

    def kd_sum(batch: dict[str, Tensor]) -> tuple[float, int]:
        parts = distill_loss(model, batch, teacher, 1.0, temperature, kd_tokens)
        return parts.kd, parts.kd_positions

    return _per_token_mean(model, examples, batch_size, pad_id, kd_sum)


def _per_token_mean(
    model: nn.Module,
    examples: Sequence[Example],
    batch_size: int,
    pad_id: int,
    summed: Callable[[dict[str, Tensor]], tuple[float, int]],
) -> float:
    """`summed` (a batch's loss sum and its token count) over `examples` in padded batches, per token,
    with dropout off; NaN when there are no tokens."""
    was_training = model.training
    model.eval()
    total, tokens = 0.0, 0
    device = next(model.parameters()).device
    for start in range(0, len(examples), batch_size):
        batch = {k: v.to(device) for k, v in pad_batch(examples[start : start + batch_size], pad_id).items()}
        value, n = summed(batch)
        total, tokens = total + value, tokens + n
    model.train(was_training)
    return total / tokens if tokens else math.nan


@torch.no_grad()
def evaluate_loss(model: nn.Module, examples: Sequence[Example], batch_size: int, pad_id: int) -> float:
    """Mean cross entropy per response token over `examples` (dropout off), NaN when there are none."""

    def ce_sum(batch: dict[str, Tensor]) -> tuple[float, int]:
        loss, n = response_loss(model, batch)
        return float(loss), n

    return _per_token_mean(model, examples, batch_size, pad_id, ce_sum)
