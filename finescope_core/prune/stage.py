"""The whole prune stage: importance on the pruning texts -> plan for the ratio -> prune -> save.

`save_pruned` writes a plain `save_pretrained` directory with the plan as `prune_report.json`; `run`
is the stage's entry (`finescope_core.stage`): the same work into the stage's `model/` directory.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from finescope_core.config import PruneConfig
from finescope_core.progress import Progress, no_progress
from finescope_core.prune.apply import apply_pruning
from finescope_core.prune.batches import lm_batches
from finescope_core.prune.chunks import sums_limit
from finescope_core.prune.importance import Method, group_importance
from finescope_core.prune.plan import PrunePlan, plan_pruning
from finescope_core.prune.widths import WidthRule, plan_widths
from finescope_core.stage import StageContext

MODEL_DIR = "model"
"""The pruned model in the stage's artifact: a plain `save_pretrained` directory."""
REPORT_FILE = "prune_report.json"
"""The plan, next to the weights of a pruned model (`PrunePlan.to_dict`)."""
INFO = (
    "target_ratio",
    "achieved_ratio",
    "params_before",
    "params_after",
    "widths_before",
    "widths_after",
)
"""The plan's fields kept in the stage info."""


@dataclass(frozen=True)
class PruneInputs:
    """What the `pruned` stage reads, already loaded (the caller's model cache loads the model)."""

    model: PreTrainedModel
    """The base model, a private copy: pruning changes it in place."""
    tokenizer: PreTrainedTokenizerBase
    """Its tokenizer (needs a pad token)."""
    texts: Sequence[str]
    """The texts that score importance (`prune.data`: the curated set, a random sample or a file)."""
    dtype: torch.dtype
    """The precision the pruned weights are stored in: the base checkpoint's (`model.checkpoint_dtype`)."""


def run(
    inputs: PruneInputs,
    section: PruneConfig,
    ctx: StageContext,
    work_dir: Path,
    progress: Progress,
) -> dict[str, Any]:
    """Prune `inputs.model` to `section.ratio` and save it under `work_dir / MODEL_DIR`; the info is the
    plan's `INFO` fields. `ctx` is unused: the model is loaded on its device and dtype by the caller."""
    plan = prune_model(
        inputs.model, inputs.tokenizer, inputs.texts, section, rule=section.widths, progress=progress
    )
    save_pruned(inputs.model, inputs.tokenizer, plan, work_dir / MODEL_DIR, dtype=inputs.dtype)
    report = plan.to_dict()
    return {k: report[k] for k in INFO}


def prune_model(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    texts: Sequence[str],
    cfg: PruneConfig,
    *,
    rule: WidthRule = "importance",
    progress: Progress = no_progress,
) -> PrunePlan:
    """Importance on `texts` -> widths and plan for `cfg.ratio` -> prune `model` in place.

    An unreachable ratio is refused before any forward pass. At ratio 0 no gradients are computed.

    Args:
        model: the model to prune (changed in place).
        tokenizer: its tokenizer (needs a pad token).
        texts: the pruning data (the curated domain set).
        cfg: ratio, importance method, attention unit, batch shape.
        rule: how the widths are chosen among those that reach the ratio (see `plan_widths`).
        progress: called as progress(batches done, batches in all) after each backward pass.

    Returns:
        The applied plan (`plan.ratio` is the achieved ratio).
    """
    plan_widths(model, cfg.ratio, cfg.attention, rule="proportional")  # refuse before any work
    method: Method = "magnitude" if cfg.ratio == 0 else cfg.importance
    batches: Iterable[dict[str, Tensor]] = []
    if method != "magnitude":
        batches = lm_batches(tokenizer, texts, max_length=cfg.max_length, batch_size=cfg.batch_size)
    scores = group_importance(model, batches, method=method, progress=progress, max_sums=_sums_limit(model))
    plan = plan_pruning(model, scores, cfg.ratio, cfg.attention, rule=rule)
    plan.importance = cfg.importance  # what was asked for, also at ratio 0 (scored by magnitude)
    apply_pruning(model, plan)
    return plan


def _sums_limit(model: nn.Module) -> int | None:
    """The bound on one importance pass's float32 gradient sums for this model (`chunks.sums_limit`)."""
    model_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    return sums_limit(model_bytes, next(model.parameters()).element_size())


def save_pruned(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    plan: PrunePlan,
    out_dir: str | Path,
    *,
    dtype: torch.dtype | None = None,
) -> Path:
    """Write the pruned model (safetensors), tokenizer and `prune_report.json` into `out_dir`.

    An existing `out_dir` is replaced. The writes are not atomic and need not be: the stage writes into
    its store work dir, which the store commits as a whole, so a killed run leaves nothing behind.

    Args:
        dtype: the precision to store the weights in (the base checkpoint's, `model.checkpoint_dtype`);
            None keeps the model's. The model is cast in place: this is the stage's last use of it.

    Returns:
        `out_dir`, loadable with plain `AutoModelForCausalLM.from_pretrained`.
    """
    out = Path(out_dir)
    shutil.rmtree(out, ignore_errors=True)  # no stale shards of an earlier save beside the new ones
    if dtype is not None and dtype != model.dtype:
        nn.Module.to(model, dtype)  # transformers' wrapper of `to` hides its signature
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    (out / REPORT_FILE).write_text(json.dumps(plan.to_dict(), indent=1), encoding="utf-8")
    return out
