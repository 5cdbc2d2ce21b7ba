"""The `saliency` stage: score every coordinate of every hooked layer on D0 (a seeded corpus sample) and
keep the top `k_act` per layer (eq. 6-10); the selector math is `finescope_core.saliency`'s."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from finescope_core import activations, saliency
from finescope_core.batching import TextBatch, iter_text_batches
from finescope_core.config import CurateConfig
from finescope_core.curate.layers import sample_rows
from finescope_core.data import RecordSet
from finescope_core.progress import Progress, no_progress
from finescope_core.stage import StageContext

SALIENCY_FILES = (saliency.SALIENCY_JSON, saliency.SALIENCY_TENSORS)
"""The artifact: the layers, selector and indices (JSON) and the scores and indices (safetensors)."""


@dataclass(frozen=True)
class SaliencyInputs:
    """What the `saliency` stage reads: the loaded model and its tokenizer, the corpus, the hooked layers."""

    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    corpus: RecordSet
    layers: list[int]


def run(
    inputs: SaliencyInputs,
    section: CurateConfig,
    ctx: StageContext,
    work_dir: Path,
    progress: Progress = no_progress,
) -> dict[str, Any]:
    """The `saliency` stage's entry: `saliency_stage` on the inputs, seeded by the run."""
    return saliency_stage(
        inputs.model, inputs.tokenizer, inputs.corpus, inputs.layers, section, ctx.seed, work_dir, progress
    )


def saliency_stage(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    corpus: RecordSet,
    layers: list[int],
    cfg: CurateConfig,
    seed: int,
    out_dir: Path,
    progress: Progress = no_progress,
) -> dict[str, Any]:
    """Score every coordinate of every hooked layer on D0 (a seeded corpus sample) and keep the top k_act."""
    rows = sample_rows(len(corpus), cfg.reference_size, seed)
    texts = [corpus.records[i].text for i in rows]
    # A list, not a generator: progress needs the total up front.
    batches = list(iter_text_batches(tokenizer, texts, max_length=cfg.max_length, batch_size=cfg.batch_size))
    if cfg.selector == "jacobian":
        gen = torch.Generator(device=model.device).manual_seed(seed)
        scores = saliency.jacobian_saliency(
            model,
            batches,
            layers,
            probes=cfg.probes,
            skip_first=cfg.skip_first,
            generator=gen,
            progress=progress,
        )
    else:
        pooled = _pooled_all(model, batches, layers, cfg.skip_first, len(texts), progress)
        scores = saliency.statistic_scores(pooled, cfg.selector)
    indices = saliency.select_coordinates(scores, cfg.k_act)
    result = saliency.LayerSaliency(layers=layers, scores=scores, indices=indices, selector=cfg.selector)
    result.save(out_dir)
    return {"layers": layers, "k_act": cfg.k_act, "reference_rows": len(rows), "selector": cfg.selector}


def _pooled_all(
    model: PreTrainedModel,
    batches: list[TextBatch],
    layers: list[int],
    skip_first: int,
    n: int,
    progress: Progress,
) -> torch.Tensor:
    """[n, L, d] pooled activations of every text in `batches`, rows in text order."""
    out: torch.Tensor | None = None
    for rows, acts in activations.extract_pooled(
        model, batches, layers, skip_first=skip_first, indices=None, progress=progress
    ):
        if out is None:
            out = torch.empty(n, *acts.shape[1:], dtype=acts.dtype)
        out[rows] = acts.to(out.dtype)
    assert out is not None
    return out
