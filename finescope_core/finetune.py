"""LoRA recovery of the pruned model on the teacher-distilled data (paper §3.2.2 and §4).

The student is trained on (prompt, response) pairs formatted exactly as at inference (the prompt
format is shared with `teacher`), with the loss on the response tokens only. A plain torch loop keeps
it small, CPU-friendly and deterministic: AdamW, gradient accumulation with token-weighted losses,
seeded shuffling, dynamic right padding per micro-batch, and a seeded held-out split whose loss is
reported after every epoch. Outputs: the peft adapter, the merged model (plain `from_pretrained`
loads it) and `finetune.json`, published together by one directory rename.
"""

from __future__ import annotations

import contextlib
import json
import math
import shutil
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from peft import LoraConfig, PeftModel, get_peft_model
from torch import Tensor, nn
from transformers import PreTrainedModel, PreTrainedTokenizerBase

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


def build_examples(tokenizer: PreTrainedTokenizerBase, rows: Sequence[dict[str, Any]], cutoff: int) -> Examples:
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
        response = list(tokenizer(row["response"], add_special_tokens=False)["input_ids"]) + [tokenizer.eos_token_id]
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
        logits[:, :-1].float().reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=IGNORE, reduction="sum"
    )
    return loss, int((targets != IGNORE).sum())


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
    was_training = model.training
    model.eval()
    total, tokens = 0.0, 0
    device = next(model.parameters()).device
    for start in range(0, len(examples), batch_size):
        batch = {k: v.to(device) for k, v in pad_batch(examples[start : start + batch_size], pad_id).items()}
        loss, n = response_loss(model, batch)
        total, tokens = total + float(loss), tokens + n
    model.train(was_training)
    return total / tokens if tokens else math.nan


def _micro_batches(examples: Sequence[Example], order: list[int], size: int) -> list[list[Example]]:
    return [[examples[i] for i in order[s : s + size]] for s in range(0, len(order), size)]


def _labelled(batch: list[Example]) -> int:
    """Response tokens that carry loss (the first position predicts nothing)."""
    return sum(sum(t != IGNORE for t in e["labels"][1:]) for e in batch)


def _step(
    model: nn.Module, optimizer: torch.optim.Optimizer, group: list[list[Example]], pad_id: int
) -> tuple[float, int]:
    """One optimiser step over a group of micro-batches; returns (mean loss per response token, tokens seen)."""
    device = next(model.parameters()).device
    weight = max(sum(_labelled(b) for b in group), 1)
    total, seen = 0.0, 0
    optimizer.zero_grad(set_to_none=True)
    for micro in group:
        batch = {k: v.to(device) for k, v in pad_batch(micro, pad_id).items()}
        loss, _ = response_loss(model, batch)
        (loss / weight).backward()  # type: ignore[no-untyped-call]  # loss comes from an untyped HF forward
        total, seen = total + loss.item(), seen + int(batch["attention_mask"].sum())
    torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
    optimizer.step()
    return total / weight, seen


@dataclass
class FinetuneSummary:
    """What a LoRA run did; written to `finetune.json`."""

    train_examples: int
    eval_examples: int
    dropped: int
    truncated: int
    epochs: int
    steps: int = 0
    train_loss: list[float] = field(default_factory=list)
    """Mean loss per response token at every optimiser step."""
    eval_loss_before: float | None = None
    """Held-out loss of the untuned model (None without a held-out split)."""
    eval_loss: list[float] = field(default_factory=list)
    """Held-out loss after every epoch."""
    trainable_params: int = 0
    tokens: int = 0
    """Non-padding tokens processed in training."""
    seconds: float = 0.0
    adapter_dir: str = ""
    merged_dir: str = ""

    def to_dict(self) -> dict[str, Any]:
        rate = self.tokens / self.seconds if self.seconds > 0 else 0.0
        return asdict(self) | {"tokens_per_second": rate}


def _train(
    peft_model: PeftModel,
    train: list[Example],
    held: list[Example],
    cfg: FinetuneConfig,
    pad_id: int,
    summary: FinetuneSummary,
    seed: int,
    progress: Progress | None,
) -> None:
    """The epoch loop: seeded shuffles, accumulated steps, held-out loss after each epoch (fills `summary`)."""
    params = [p for p in peft_model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0)
    per_epoch = math.ceil(math.ceil(len(train) / cfg.batch_size) / cfg.grad_accum)
    total_steps = per_epoch * cfg.epochs
    peft_model.train()
    for epoch in range(cfg.epochs):
        order = torch.randperm(len(train), generator=torch.Generator().manual_seed(seed + 1 + epoch)).tolist()
        micro = _micro_batches(train, order, cfg.batch_size)
        for s in range(0, len(micro), cfg.grad_accum):
            loss, seen = _step(peft_model, optimizer, micro[s : s + cfg.grad_accum], pad_id)
            summary.train_loss.append(loss)
            summary.steps, summary.tokens = summary.steps + 1, summary.tokens + seen
            if progress is not None:
                progress(summary.steps, total_steps, loss=loss)
        if held:
            summary.eval_loss.append(evaluate_loss(peft_model, held, cfg.batch_size, pad_id))
    peft_model.eval()


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
) -> FinetuneSummary:
    """LoRA-tune `model` on distilled rows and write `adapter/`, `merged/` and `finetune.json` to `out_dir`.

    The model is changed in place: when this returns it holds the merged weights (no peft layers left).

    Args:
        model: the student (e.g. the pruned model), on its training device.
        rows: dicts with `prompt` and `response` (`teacher.read_distilled` gives them).
        cfg: LoRA and optimiser settings.
        out_dir: replaced atomically; its parent gets a temporary sibling while writing.
        seed: LoRA init, dropout, the held-out split and the epoch shuffles.
        progress: called as `progress(step, total_steps, loss=step_loss)` after each optimiser step.

    Returns:
        The summary also written to `out_dir/finetune.json`.
    """
    check_targets(model, cfg.target_modules)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    built = build_examples(tokenizer, rows, cfg.cutoff)
    if not built.examples:
        raise FinetuneError(
            f"no training example left from {len(rows)} rows ({built.dropped} prompts reach finetune.cutoff="
            f"{cfg.cutoff} tokens); raise finetune.cutoff or check the distilled data"
        )
    train_idx, eval_idx = split_indices(len(built.examples), cfg.eval_fraction, seed)
    train = [built.examples[i] for i in train_idx]
    held = [built.examples[i] for i in eval_idx]
    summary = FinetuneSummary(len(train), len(held), built.dropped, built.truncated, cfg.epochs)
    start = time.perf_counter()
    with _private_rng(model.device):
        peft_model = attach_lora(model, cfg, seed)
        summary.trainable_params = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
        if held:
            with peft_model.disable_adapter():
                summary.eval_loss_before = evaluate_loss(peft_model, held, cfg.batch_size, pad_id)
        _train(peft_model, train, held, cfg, pad_id, summary, seed, progress)
    summary.seconds = time.perf_counter() - start
    _save(peft_model, tokenizer, summary, Path(out_dir))
    return summary


def _save(peft_model: PeftModel, tokenizer: PreTrainedTokenizerBase, summary: FinetuneSummary, out_dir: Path) -> None:
    """Adapter first (merging removes it), then the merged model and the summary; one rename publishes all."""
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.with_name(f".{out_dir.name}.tmp-{uuid.uuid4().hex[:8]}")
    summary.adapter_dir, summary.merged_dir = str(out_dir / "adapter"), str(out_dir / "merged")
    try:
        peft_model.save_pretrained(str(tmp / "adapter"))
        merged = peft_model.merge_and_unload()
        merged.save_pretrained(tmp / "merged", safe_serialization=True)
        tokenizer.save_pretrained(tmp / "merged")
        (tmp / "finetune.json").write_text(json.dumps(summary.to_dict(), indent=1), encoding="utf-8")
        _publish(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
