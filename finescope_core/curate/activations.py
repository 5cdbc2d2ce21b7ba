"""The `activation-shards` stage: pooled activations of a slice of records at the saliency-selected
coordinates, every hooked layer from one forward pass, written as shards (`finescope_core.activations`)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from finescope_core import activations
from finescope_core.config import CurateConfig
from finescope_core.data import RecordSet
from finescope_core.progress import Progress, no_progress
from finescope_core.saliency import LayerSaliency
from finescope_core.stage import StageContext

MANIFEST_FILE = activations.MANIFEST
"""The artifact's list of its `shard-NNNNN.safetensors` files (`acts` [n, L, k], `rows` [n])."""


@dataclass(frozen=True)
class ActivationInputs:
    """What one activation shard reads: the loaded model and tokenizer, its records, the hooked layers."""

    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    records: RecordSet
    """The shard's records (rows [start, stop) of the record set)."""
    layers: list[int]
    saliency_dir: Path | None
    """The `saliency` artifact whose indices pick the coordinates; None: every coordinate."""


def run(
    inputs: ActivationInputs,
    section: CurateConfig,
    ctx: StageContext,
    work_dir: Path,
    progress: Progress = no_progress,
) -> dict[str, Any]:
    """One activation shard's entry: `activation_stage` at the saliency's coordinates; the info also
    records the precision the work ran in (device kind and dtype: the gathered stage checks they agree)."""
    indices = LayerSaliency.load(inputs.saliency_dir).indices if inputs.saliency_dir is not None else None
    info = activation_stage(
        inputs.model, inputs.tokenizer, inputs.records, inputs.layers, indices, section, work_dir, progress
    )
    return {**info, "precision": {"device": torch.device(ctx.device).type, "dtype": ctx.dtype}}


def activation_stage(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    records: RecordSet,
    layers: list[int],
    indices: torch.Tensor | None,
    cfg: CurateConfig,
    out_dir: Path,
    progress: Progress = no_progress,
) -> dict[str, Any]:
    """Pooled activations of `records` at the selected coordinates, every layer from one pass, sharded."""
    manifest = activations.write_activation_shards(
        model,
        tokenizer,
        records.texts,
        layers,
        out_dir,
        indices=indices,
        max_length=cfg.max_length,
        batch_size=cfg.batch_size,
        skip_first=cfg.skip_first,
        shard_size=cfg.shard_size,
        progress=progress,
    )
    return {"layers": layers, "rows": len(records), "shards": len(manifest.shards)}
