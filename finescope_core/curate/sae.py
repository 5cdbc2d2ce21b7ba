"""The `sae-layers` stage: one SAE per hooked layer of a group, trained (batched) on the corpus activations
(eq. 3-5, §6); the SAE itself is `finescope_core.sae`'s."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from finescope_core import activations, sae
from finescope_core.config import CurateConfig
from finescope_core.curate.layers import sample_rows
from finescope_core.progress import Progress, no_progress
from finescope_core.saliency import LayerSaliency
from finescope_core.stage import StageContext

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SaeLayersInputs:
    """What one SAE layer group reads: the corpus activations, the saliency, which layers to train."""

    activation_dirs: list[Path]
    """The corpus activation shards' directories, in row order."""
    saliency_dir: Path
    """The `saliency` artifact: the coordinates the activations hold, recorded with each SAE."""
    layers: list[int]
    """The model layer of each position of the activations' L axis (every hooked layer)."""
    positions: list[int]
    """The positions of the L axis this group trains."""


def run(
    inputs: SaeLayersInputs,
    section: CurateConfig,
    ctx: StageContext,
    work_dir: Path,
    progress: Progress = no_progress,
) -> dict[str, Any]:
    """The `sae-layers` stage's entry: `sae_stage` for the group's positions, on `ctx.device`."""
    indices = LayerSaliency.load(inputs.saliency_dir).indices
    return sae_stage(
        inputs.activation_dirs,
        inputs.layers,
        indices,
        section,
        ctx.seed,
        work_dir,
        progress,
        inputs.positions,
        device=ctx.device,
    )


def sae_stage(
    acts_dirs: Path | Sequence[Path],
    layers: list[int],
    indices: torch.Tensor,
    cfg: CurateConfig,
    seed: int,
    out_dir: Path,
    progress: Progress = no_progress,
    positions: Sequence[int] | None = None,
    device: torch.device | str = "cpu",
) -> dict[str, Any]:
    """Train one SAE per layer (batched) on the corpus activations, on `device`; save each with its metrics.

    Args:
        acts_dirs: the corpus activation directory, or its shard directories in order.
        layers: the model layer of each position of the activations' L axis.
        indices: [L, k_act] coordinates the activations hold, recorded with each SAE.
        positions: train only these positions of the L axis (one fanned-out task's share); None: all.
            Each layer's SAE depends only on (seed, layer), so any split gives the same SAEs.
    """
    picked = list(range(len(layers))) if positions is None else list(positions)
    dirs = [Path(acts_dirs)] if isinstance(acts_dirs, str | Path) else list(acts_dirs)
    total = activations.num_rows(dirs)
    if total > cfg.sae.max_rows:  # a seeded sample, the same rows for every layer (and every layer group)
        rows = sample_rows(total, cfg.sae.max_rows, seed)
        acts = activations.load_activation_rows(dirs, rows, positions=picked)
        log.info("sae training on %d of %d corpus records (curate.sae.max_rows)", len(rows), total)
    else:
        acts = activations.load_activations(dirs, positions=picked)
    ids = [layers[i] for i in picked]
    model, metrics = sae.train_saes(acts, cfg.sae, seed=seed, progress=progress, layer_ids=ids, device=device)
    extra = [{"coordinates": indices[i].tolist()} for i in picked]
    sae.save_saes(model, metrics, ids, out_dir, extra, cfg=cfg.sae)
    # The final numbers (training and held-out rows) of each layer's metrics, not the curves.
    return {"layers": ids, "metrics": [m.summary() for m in metrics]}
