"""Recovery of the pruned model on the teacher-distilled data (paper §3.2.2 and §4).

The student is trained on (prompt, response) pairs formatted exactly as at inference (the prompt
format is shared with `teacher`), with the loss on the response tokens only. The loss mixes cross
entropy on the distilled targets with logit distillation from the unpruned teacher:
`(1 - w) * CE + w * T^2 * KL(p_teacher^T || p_student^T)`, CE per response token and KD per response
token (`finetune.kd_tokens: response`) or per token of the whole sequence, prompt included (`all`:
the student also relearns the teacher's distributions over the domain's own text, as pruned models are
recovered by distillation on whole sequences) (`finetune.kd_weight`, `finetune.kd_temperature`); the
teacher's logits are computed on the fly without gradients.

Training runs on the transformers `Trainer` (AdamW, linear warm-up + cosine decay, gradient clipping,
seeded shuffling, dynamic right padding) with a custom `compute_loss` that sums each term over its
positions and divides by its positions in the whole accumulated step, so every token weighs the same
however tokens fall into micro-batches. After every epoch the held-out share's loss
is measured; the weights of the epoch with the lowest held-out loss are the ones saved.
`finetune.method` is `lora` (peft adapters; outputs the adapter and the merged model) or `full`
(every weight of the pruned model; outputs the full model only). Outputs are published together, with
`finetune.json`, by one directory rename.
"""

from __future__ import annotations

import contextlib
import json
import math
import shutil
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from peft import LoraConfig, PeftModel, get_peft_model
from torch import Tensor, nn
from transformers import (
    PreTrainedModel,
    PreTrainedTokenizerBase,
    PrinterCallback,
    Trainer,
    TrainerCallback,
    TrainerControl,
    TrainerState,
    TrainingArguments,
)

from finescope_core.config import FinetuneConfig
from finescope_core.progress import Progress
from finescope_core.teacher import encode_prompt

IGNORE = -100
"""Label of positions without loss (prompt and padding), as torch's cross entropy expects."""

Example = dict[str, list[int]]


class FinetuneError(ValueError):
    """Fine-tuning cannot start with these inputs; the message names the input and the fix."""


@dataclass
class Examples:
    """Tokenised training examples and what building them cost."""

    examples: list[Example]
    """`input_ids` and `labels` per example (IGNORE on prompt positions), unpadded."""
    dropped: int = 0
    """Rows whose prompt alone fills the cutoff (nothing left to learn from)."""
    truncated: int = 0
    """Rows whose response was cut to fit the cutoff (their EOS is lost)."""


def build_examples(
    tokenizer: PreTrainedTokenizerBase, rows: Sequence[dict[str, Any]], cutoff: int
) -> Examples:
    """Tokenise (prompt, response) rows for response-only loss.

    The prompt is formatted as at inference (`teacher.encode_prompt`); the response follows with EOS.
    Prompt and response are tokenised separately because at inference the response tokens are
    generated after the prompt's tokens, never merged across the boundary.

    Args:
        rows: dicts with `prompt` (the user's request) and `response` strings.
        cutoff: most tokens per example; the response tail is cut first.

    Returns:
        Examples with labels IGNORE on every prompt token, plus the dropped / truncated counts.
    """
    if tokenizer.eos_token_id is None:
        raise FinetuneError("the tokenizer has no eos_token; set one so responses can be terminated")
    built = Examples(examples=[])
    for row in rows:
        prompt = encode_prompt(tokenizer, row["prompt"])
        if len(prompt) >= cutoff:
            built.dropped += 1
            continue
        response = list(tokenizer(row["response"], add_special_tokens=False)["input_ids"]) + [
            tokenizer.eos_token_id
        ]
        if len(prompt) + len(response) > cutoff:
            response = response[: cutoff - len(prompt)]
            built.truncated += 1
        built.examples.append({"input_ids": prompt + response, "labels": [IGNORE] * len(prompt) + response})
    return built


def pad_batch(examples: Sequence[Example], pad_id: int) -> dict[str, Tensor]:
    """Right-pad a micro-batch to its longest example.

    Returns:
        input_ids, attention_mask and labels, each [batch, longest]; labels are IGNORE on padding.
    """
    width = max(len(e["input_ids"]) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for i, e in enumerate(examples):
        n = len(e["input_ids"])
        ids[i, :n] = torch.tensor(e["input_ids"])
        labels[i, :n] = torch.tensor(e["labels"])
        mask[i, :n] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


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
            f"student logits {tuple(student_logits.shape)} and teacher logits {tuple(teacher_logits.shape)} differ; "
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
        norms are the step's counts of them (the step's response tokens for both when `kd_tokens: response`)."""
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


def split_indices(n: int, fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Seeded (train, held-out) index split; at least one example on each side when fraction > 0 and n > 1."""
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    n_eval = round(fraction * n)
    if fraction > 0 and n > 1:
        n_eval = min(max(n_eval, 1), n - 1)
    return sorted(order[n_eval:]), sorted(order[:n_eval])


def check_targets(model: nn.Module, targets: Sequence[str]) -> None:
    """Raise when a LoRA target names no nn.Linear of the model (a typo would silently train less)."""
    linears = {name.rsplit(".", 1)[-1] for name, m in model.named_modules() if isinstance(m, nn.Linear)}
    missing = sorted(set(targets) - linears)
    if missing:
        raise FinetuneError(
            f"finetune.target_modules {missing} match no linear layer of the model; "
            f"its linear layers are named {sorted(linears)}"
        )


def attach_lora(model: PreTrainedModel, cfg: FinetuneConfig, seed: int = 0) -> PeftModel:
    """Wrap `model` (in place) with LoRA adapters on `cfg.target_modules`, seeded init."""
    check_targets(model, cfg.target_modules)
    lora = LoraConfig(
        r=cfg.rank,
        lora_alpha=cfg.alpha,
        lora_dropout=cfg.dropout,
        target_modules=list(cfg.target_modules),
        task_type="CAUSAL_LM",
    )
    torch.manual_seed(seed)
    peft_model = get_peft_model(model, lora)
    assert isinstance(peft_model, PeftModel)
    return peft_model


@torch.no_grad()
def evaluate_loss(model: nn.Module, examples: Sequence[Example], batch_size: int, pad_id: int) -> float:
    """Mean cross entropy per response token over `examples` (dropout off), NaN when there are none."""

    def ce_sum(batch: dict[str, Tensor]) -> tuple[float, int]:
        loss, n = response_loss(model, batch)
        return float(loss), n

    return _per_token_mean(model, examples, batch_size, pad_id, ce_sum)


@dataclass
class FinetuneSummary:
    """What a tuning run did; written to `finetune.json`."""

    train_examples: int
    eval_examples: int
    dropped: int
    truncated: int
    epochs: int
    method: str = "lora"
    kd_weight: float = 0.0
    temperature: float = 1.0
    kd_tokens: str = "response"
    """Positions of the KD term (`finetune.kd_tokens`)."""
    steps: int = 0
    train_loss: list[float] = field(default_factory=list)
    """Mean mixed loss per response token at every optimiser step."""
    train_kd: list[float] = field(default_factory=list)
    """Mean KD term per KD position at every optimiser step (empty without KD)."""
    eval_loss_before: float | None = None
    """Held-out loss (cross entropy per response token) of the untuned model (None without a held-out split)."""
    eval_loss: list[float] = field(default_factory=list)
    """Held-out loss after every epoch."""
    best_epoch: int = 0
    """1-based epoch whose weights were saved: the lowest held-out loss (the last epoch without a held-out split)."""
    trainable_params: int = 0
    tokens: int = 0
    """Non-padding tokens processed in training."""
    seconds: float = 0.0
    adapter_dir: str | None = ""
    """The peft adapter; None for `method: full` (no adapter)."""
    merged_dir: str = ""
    """The tuned model as a plain transformers directory."""

    def to_dict(self) -> dict[str, Any]:
        rate = self.tokens / self.seconds if self.seconds > 0 else 0.0
        return asdict(self) | {"tokens_per_second": rate}


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
        self.step_sums = [
            0.0,
            0.0,
            0.0,
            0,
        ]  # loss, ce, kd (per token of the step), non-padding tokens of the step

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
        learning_rate=cfg.lr,
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


def _train(
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
def _private_rng(device: torch.device) -> Iterator[None]:
    """Training draws (LoRA init, dropout) from torch's RNG; keep the caller's RNG state untouched."""
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        yield


def _publish(tmp: Path, out_dir: Path) -> None:
    """Replace `out_dir` with the finished `tmp` directory (two renames, never a half-written out_dir)."""
    old = out_dir.with_name(f".{out_dir.name}.old-{uuid.uuid4().hex[:8]}")
    if out_dir.exists():
        out_dir.rename(old)
    tmp.rename(out_dir)
    shutil.rmtree(old, ignore_errors=True)


def lora_finetune(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    rows: Sequence[dict[str, Any]],
    cfg: FinetuneConfig,
    out_dir: Path,
    *,
    seed: int = 0,
    progress: Progress | None = None,
    teacher: nn.Module | None = None,
) -> FinetuneSummary:
    """Tune `model` on distilled rows (LoRA or full) and write the outputs and `finetune.json` to `out_dir`.

    `method: lora` writes `adapter/` and `merged/`; `method: full` writes `merged/` only (the full
    tuned model). The model is changed in place: when this returns it holds the saved (best epoch's,
    merged) weights, with no peft layers left.

    Args:
        model: the student (e.g. the pruned model), on its training device.
        rows: dicts with `prompt` and `response` (`teacher.read_distilled` gives them).
        cfg: method, LoRA, distillation and optimiser settings.
        out_dir: replaced atomically; its parent gets a temporary sibling while writing.
        seed: LoRA init, dropout, the held-out split and the epoch shuffles.
        progress: called as `progress(step, total_steps, loss=step_loss)` after each optimiser step.
        teacher: the model whose next-token distributions the student learns (same vocabulary), on
            the student's device; required when `cfg.kd_weight > 0`, unused otherwise.

    Returns:
        The summary also written to `out_dir/finetune.json`.
    """
    if cfg.kd_weight > 0 and teacher is None:
        raise FinetuneError(
            "finetune.kd_weight > 0 needs the teacher model; pass teacher= or set finetune.kd_weight: 0"
        )
    if cfg.method == "lora":
        check_targets(model, cfg.target_modules)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    built = build_examples(tokenizer, rows, cfg.max_length)
    if not built.examples:
        raise FinetuneError(
            f"no training example left from {len(rows)} rows ({built.dropped} prompts reach finetune.max_length="
            f"{cfg.max_length} tokens); raise finetune.max_length or check the distilled data"
        )
    train_idx, eval_idx = split_indices(len(built.examples), cfg.eval_fraction, seed)
    train = [built.examples[i] for i in train_idx]
    held = [built.examples[i] for i in eval_idx]
    kd_weight = cfg.kd_weight if teacher is not None else 0.0
    summary = FinetuneSummary(
        len(train),
        len(held),
        built.dropped,
        built.truncated,
        cfg.epochs,
        cfg.method,
        kd_weight,
        cfg.kd_temperature,
        cfg.kd_tokens,
    )
    if teacher is not None:
        teacher.eval()
        for p in teacher.parameters():
            p.requires_grad_(False)
    start = time.perf_counter()
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    work = out_dir.with_name(f".{out_dir.name}.trainer-{uuid.uuid4().hex[:8]}")
    try:
        with _private_rng(model.device):
            if held:
                summary.eval_loss_before = evaluate_loss(model, held, cfg.batch_size, pad_id)
            student: nn.Module
            if cfg.method == "lora":
                student = attach_lora(model, cfg, seed)
            else:
                student = model
                for p in student.parameters():
                    p.requires_grad_(True)
            summary.trainable_params = sum(p.numel() for p in student.parameters() if p.requires_grad)
            with master_weights(student, full=cfg.method == "full") as autocast:
                _train(student, train, held, cfg, pad_id, summary, seed, progress, teacher, work, autocast)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    summary.seconds = time.perf_counter() - start
    _save(student, tokenizer, summary, out_dir)
    return summary


finetune = lora_finetune
"""The stage's entry point under its method-neutral name."""


def _save(
    student: nn.Module, tokenizer: PreTrainedTokenizerBase, summary: FinetuneSummary, out_dir: Path
) -> None:
    """Adapter first (merging removes it), then the merged model and the summary; one rename publishes all."""
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.with_name(f".{out_dir.name}.tmp-{uuid.uuid4().hex[:8]}")
    summary.merged_dir = str(out_dir / "merged")
    summary.adapter_dir = str(out_dir / "adapter") if isinstance(student, PeftModel) else None
    try:
        merged: Any = student
        if isinstance(student, PeftModel):
            student.save_pretrained(str(tmp / "adapter"))
            merged = student.merge_and_unload()
        merged.save_pretrained(tmp / "merged", safe_serialization=True)
        tokenizer.save_pretrained(tmp / "merged")
        (tmp / "finetune.json").write_text(json.dumps(summary.to_dict(), indent=1), encoding="utf-8")
        _publish(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
