"""The training loop: a transformers `Trainer` whose loss weighs every token the same across
gradient accumulation, per-epoch held-out loss with the best epoch's weights kept, and float32 master
weights for full tuning of a 16-bit model."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from transformers import (
    PrinterCallback,
    Trainer,
    TrainerCallback,
    TrainerControl,
    TrainerState,
    TrainingArguments,
)

from finescope_core.config import FinetuneConfig
from finescope_core.finetune.examples import IGNORE, Example, pad_batch
from finescope_core.finetune.losses import distill_loss, evaluate_loss, kd_position_mask
from finescope_core.finetune.summary import FinetuneSummary
from finescope_core.progress import Progress


class _ListDataset(torch.utils.data.Dataset[Example]):
    def __init__(self, examples: list[Example]) -> None:
        self.examples = examples

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, i: int) -> Example:
        return self.examples[i]


class _DistillTrainer(Trainer):
    """`Trainer` whose loss is `(1 - w) * CE + w * KD`, each term summed over its positions in the
    micro-batch and divided by its positions in the whole accumulated step, so every token weighs the
    same however tokens fall into micro-batches."""

    def __init__(
        self,
        *args: Any,
        teacher: nn.Module | None,
        kd_weight: float,
        temperature: float,
        kd_tokens: str = "response",
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        self.teacher = teacher
        self.kd_weight, self.temperature, self.kd_tokens = kd_weight, temperature, kd_tokens
        self.loss_is_scaled_for_ga = True  # compute_loss divides by the whole step's token counts
        self.step_kd_positions = 0  # KD positions of the current accumulated step
        # loss, ce, kd (per token of the step), non-padding tokens of the step
        self.step_sums = [0.0, 0.0, 0.0, 0]

    def _get_num_items_in_batch(self, batch_samples: list[dict[str, Tensor]], device: torch.device) -> Tensor:
        """Response tokens that carry loss over the whole accumulated step (the first position predicts
        nothing); the step's KD positions are kept beside it for `compute_loss`."""
        self.step_kd_positions = sum(int(kd_position_mask(b, self.kd_tokens).sum()) for b in batch_samples)
        return torch.tensor(
            sum(int((b["labels"][:, 1:] != IGNORE).sum()) for b in batch_samples), device=device
        )

    def compute_loss(
        self,
        model: nn.Module,
        inputs: dict[str, Tensor],
        return_outputs: bool = False,
        num_items_in_batch: Any = None,
    ) -> Any:
        parts = distill_loss(model, inputs, self.teacher, self.kd_weight, self.temperature, self.kd_tokens)
        if num_items_in_batch is not None:
            ce_norm, kd_norm = max(int(num_items_in_batch), 1), max(self.step_kd_positions, 1)
        else:
            ce_norm, kd_norm = max(parts.tokens, 1), max(parts.kd_positions, 1)
        loss = parts.mixed(ce_norm, kd_norm)
        s = self.step_sums
        s[0], s[1], s[2] = s[0] + float(loss.detach()), s[1] + parts.ce / ce_norm, s[2] + parts.kd / kd_norm
        s[3] += int(inputs["attention_mask"].sum())
        return (loss, None) if return_outputs else loss


class _EpochCallback(TrainerCallback):
    """Per-step progress and losses; per-epoch held-out loss and a copy of the best epoch's weights."""

    def __init__(
        self,
        trainer_ref: list[_DistillTrainer],
        summary: FinetuneSummary,
        held: list[Example],
        batch_size: int,
        pad_id: int,
        progress: Progress | None,
    ) -> None:
        self.trainer_ref, self.summary, self.held = trainer_ref, summary, held
        self.batch_size, self.pad_id, self.progress = batch_size, pad_id, progress
        self.best: dict[str, Tensor] | None = None
        self.best_loss = math.inf

    def on_step_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kw: Any
    ) -> None:
        trainer = self.trainer_ref[0]
        loss, _, kd, seen = trainer.step_sums
        trainer.step_sums = [0.0, 0.0, 0.0, 0]
        s = self.summary
        s.train_loss.append(loss)
        if trainer.teacher is not None and trainer.kd_weight > 0:
            s.train_kd.append(kd)
        s.steps, s.tokens = state.global_step, s.tokens + int(seen)
        if self.progress is not None:
            self.progress(state.global_step, state.max_steps, loss=loss)

    def on_epoch_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kw: Any
    ) -> None:
        model = self.trainer_ref[0].model
        assert model is not None
        epoch = len(self.summary.eval_loss) + 1 if self.held else round(state.epoch or 0)
        if self.held:
            loss = evaluate_loss(model, self.held, self.batch_size, self.pad_id)
            self.summary.eval_loss.append(loss)
            better = loss < self.best_loss
        else:
            better = True  # no held-out split: the last epoch
        if better:
            self.best_loss = self.summary.eval_loss[-1] if self.held else math.inf
            self.summary.best_epoch = epoch
            self.best = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def _training_args(
    cfg: FinetuneConfig,
    n_train: int,
    seed: int,
    work: Path,
    device: torch.device,
    autocast: torch.dtype | None = None,
) -> TrainingArguments:
    per_epoch = math.ceil(math.ceil(n_train / cfg.batch_size) / cfg.grad_accum)
    return TrainingArguments(
        output_dir=str(work),
        per_device_train_batch_size=cfg.batch_size,
        gradient_accumulation_steps=cfg.grad_accum,
        num_train_epochs=cfg.epochs,
        learning_rate=cfg.learning_rate(),
        weight_decay=0.0,
        lr_scheduler_type="cosine",
        warmup_steps=math.ceil(cfg.warmup_ratio * per_epoch * cfg.epochs),
        max_grad_norm=cfg.max_grad_norm,
        optim="adamw_torch",
        seed=seed,
        data_seed=seed,
        save_strategy="no",
        eval_strategy="no",
        logging_strategy="no",
        report_to="none",
        disable_tqdm=True,
        dataloader_num_workers=0,
        remove_unused_columns=False,
        use_cpu=device.type == "cpu",
        bf16=autocast == torch.bfloat16,
        fp16=autocast == torch.float16,
        activation_checkpointing=cfg.gradient_checkpointing,
        # Non-reentrant: works with frozen inputs (LoRA), and keeps the RNG of dropout the same on recompute.
        activation_checkpointing_kwargs={"use_reentrant": False} if cfg.gradient_checkpointing else None,
    )


def train_student(
    model: nn.Module,
    train: list[Example],
    held: list[Example],
    cfg: FinetuneConfig,
    pad_id: int,
    summary: FinetuneSummary,
    seed: int,
    progress: Progress | None,
    teacher: nn.Module | None,
    work: Path,
    autocast: torch.dtype | None = None,
) -> None:
    """Train with the Trainer (under `autocast` when given), then load the best epoch's weights into
    `model` (fills `summary`)."""
    device = next(model.parameters()).device
    trainer_ref: list[_DistillTrainer] = []
    callback = _EpochCallback(trainer_ref, summary, held, cfg.batch_size, pad_id, progress)
    trainer = _DistillTrainer(
        model=model,
        args=_training_args(cfg, len(train), seed, work, device, autocast),
        train_dataset=_ListDataset(train),
        data_collator=lambda batch: pad_batch(batch, pad_id),
        callbacks=[callback],
        teacher=teacher,
        kd_weight=cfg.kd_weight,
        temperature=cfg.kd_temperature,
        kd_tokens=cfg.kd_tokens,
    )
    trainer.remove_callback(PrinterCallback)
    trainer_ref.append(trainer)
    model.train()
    trainer.train()
    if callback.best is not None:
        with torch.no_grad():
            params = dict(model.named_parameters())
            for name, value in callback.best.items():
                params[name].copy_(value)
    model.eval()


@contextlib.contextmanager
def master_weights(model: nn.Module, *, full: bool) -> Iterator[torch.dtype | None]:
    """Full tuning of a 16-bit model trains float32 master weights under autocast to the model's dtype.

    An AdamW step is often smaller than half a bf16 ulp of the weight it updates, so pure-bf16 training
    rounds most updates away. Here the parameters are float32 while training (optimiser states too),
    the matmuls run in the 16-bit dtype under autocast, and the model goes back to its dtype after.
    Yields the autocast dtype (None: nothing to do: LoRA, whose adapters peft keeps in float32, or a
    float32 model).
    """
    dtype = next(model.parameters()).dtype
    if not full or dtype == torch.float32:
        yield None
        return
    nn.Module.to(model, torch.float32)  # transformers' wrapper of `to` hides its signature
    try:
        yield dtype
    finally:
        nn.Module.to(model, dtype)


@contextlib.contextmanager
def private_rng(device: torch.device) -> Iterator[None]:
    """Training draws (LoRA init, dropout) from torch's RNG; keep the caller's RNG state untouched."""
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        yield
