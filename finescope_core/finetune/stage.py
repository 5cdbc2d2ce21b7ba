"""The `tuned` stage: tune the student on the distilled rows (LoRA or full), with logit
distillation from the teacher when `finetune.kd_weight > 0`, and publish the merged model (and, for
LoRA, the adapter) with `finetune.json` by one directory rename.

`run` is the stage's entry (`finescope_core.stage`); `lora_finetune` the same work on loaded rows and
any output directory.
"""

from __future__ import annotations

import json
import shutil
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from peft import PeftModel
from torch import nn
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from finescope_core.config import FinetuneConfig
from finescope_core.distilled import read_distilled
from finescope_core.finetune.errors import FinetuneError
from finescope_core.finetune.examples import build_examples, split_indices
from finescope_core.finetune.lora import attach_lora, check_targets
from finescope_core.finetune.losses import evaluate_loss
from finescope_core.finetune.summary import FinetuneSummary
from finescope_core.finetune.trainer import master_weights, private_rng, train_student
from finescope_core.progress import Progress
from finescope_core.stage import StageContext

MERGED_DIR = "merged"
"""The tuned model as a plain transformers directory (with its tokenizer)."""
ADAPTER_DIR = "adapter"
"""The peft adapter (`method: lora` only)."""
SUMMARY_FILE = "finetune.json"
"""The run's `FinetuneSummary`."""

INFO = (
    "method",
    "kd_weight",
    "temperature",
    "train_examples",
    "eval_examples",
    "steps",
    "eval_loss_before",
    "eval_loss",
    "best_epoch",
    "seconds",
    "tokens_per_second",
)
"""The summary fields kept in the stage info."""


@dataclass(frozen=True)
class TuneInputs:
    """What the `tuned` stage reads, already loaded (the caller's model cache loads the models)."""

    model: PreTrainedModel
    """The student (the pruned model), a private copy on its training device: tuned in place."""
    tokenizer: PreTrainedTokenizerBase
    """The student's tokenizer."""
    distilled: Path
    """The distilled rows' file (`distilled.jsonl` of the `distilled` stage)."""
    teacher: nn.Module | None = None
    """The teacher whose next-token distributions the student learns; needed when
    `finetune.kd_weight > 0`, unused otherwise."""
    method_choice: dict[str, Any] | None = None
    """How `finetune.method` was resolved (`finescope_core.finetune_choice.MethodChoice`), for
    `finetune.json`."""


def run(
    inputs: TuneInputs,
    section: FinetuneConfig,
    ctx: StageContext,
    work_dir: Path,
    progress: Progress,
) -> dict[str, Any]:
    """Tune `inputs.model` on the distilled rows and write `merged/` (and `adapter/`) and `finetune.json`
    into `work_dir`; the info is the summary's `INFO` fields."""
    rows = read_distilled(inputs.distilled)
    summary = lora_finetune(
        inputs.model,
        inputs.tokenizer,
        rows,
        section,
        work_dir,
        seed=ctx.seed,
        progress=progress,
        teacher=inputs.teacher,
        method_choice=inputs.method_choice,
    )
    info = summary.to_dict()
    return {k: info[k] for k in INFO}


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
    method_choice: dict[str, Any] | None = None,
) -> FinetuneSummary:
    """Tune `model` on distilled rows (LoRA or full) and write the outputs and `finetune.json` to `out_dir`.

    `method: lora` writes `adapter/` and `merged/`; `method: full` writes `merged/` only (the full
    tuned model). The model is changed in place: when this returns it holds the saved (best epoch's,
    merged) weights, with no peft layers left.

    Args:
        model: the student (e.g. the pruned model), on its training device.
        rows: dicts with `prompt` and `response`, or text rows learned as text
            (`finescope_core.distilled.read_distilled` gives both).
        cfg: method, LoRA, distillation and optimiser settings.
        out_dir: replaced atomically; its parent gets a temporary sibling while writing.
        seed: LoRA init, dropout, the held-out split and the epoch shuffles.
        progress: called as `progress(step, total_steps, loss=step_loss)` after each optimiser step.
        teacher: the model whose next-token distributions the student learns (same vocabulary), on
            the student's device; required when `cfg.kd_weight > 0`, unused otherwise.
        method_choice: how the method was resolved, recorded in the summary.

    Returns:
        The summary also written to `out_dir/finetune.json`.
    """
    if cfg.method == "auto":
        raise FinetuneError(
            "finetune.method: auto is resolved before the run, from the memory budget "
            "(finescope_core.finetune_choice.resolve_finetune); pass a config with method lora or full"
        )
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
            f"no training example left from {len(rows)} rows ({built.dropped} prompts reach "
            f"finetune.max_length={cfg.max_length} tokens); raise finetune.max_length or check the "
            "distilled data"
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
        lr=cfg.learning_rate(),
        method_choice=method_choice,
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
        with private_rng(model.device):
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
                train_student(
                    student, train, held, cfg, pad_id, summary, seed, progress, teacher, work, autocast
                )
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
    summary.merged_dir = str(out_dir / MERGED_DIR)
    summary.adapter_dir = str(out_dir / ADAPTER_DIR) if isinstance(student, PeftModel) else None
    try:
        merged: Any = student
        if isinstance(student, PeftModel):
            student.save_pretrained(str(tmp / ADAPTER_DIR))
            merged = student.merge_and_unload()
        merged.save_pretrained(tmp / MERGED_DIR, safe_serialization=True)
        tokenizer.save_pretrained(tmp / MERGED_DIR)
        (tmp / SUMMARY_FILE).write_text(json.dumps(summary.to_dict(), indent=1), encoding="utf-8")
        _publish(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _publish(tmp: Path, out_dir: Path) -> None:
    """Replace `out_dir` with the finished `tmp` directory (two renames, never a half-written out_dir)."""
    old = out_dir.with_name(f".{out_dir.name}.old-{uuid.uuid4().hex[:8]}")
    if out_dir.exists():
        out_dir.rename(old)
    tmp.rename(out_dir)
    shutil.rmtree(old, ignore_errors=True)
