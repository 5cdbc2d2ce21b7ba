"""How good trained SAEs are: full-dataset FVU, L0 and dead latents, and the per-layer training summary.

These are what `metrics.json` records next to each layer's SAE and what the curate stage reports, so
they are measured over whole row sets after training, not over the last minibatches: the training
rows, and the held-out validation rows (`val_*`) when there are any.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch
from torch import Tensor

from finescope_core.sae.model import BatchedSAE


@dataclass
class LayerMetrics:
    """Training summary of one layer's SAE.

    `fvu`, `l0` and `dead_fraction` are measured after training on the full training set;
    a latent counts as dead there when it fires on no training sample. The `val_*` fields are the
    same on the held-out rows (None without a validation split); FVU there is around the held-out
    rows' own mean, with the training rows' standardisation.
    """

    fvu: float
    l0: float
    dead_fraction: float
    loss_curve: list[float] = field(default_factory=list)
    fvu_curve: list[float] = field(default_factory=list)
    curve_steps: list[int] = field(default_factory=list)
    """Optimiser step (1-based) at which each curve point ends; a point averages the steps since the last."""
    val_fvu: float | None = None
    val_l0: float | None = None
    val_dead_fraction: float | None = None
    val_fvu_curve: list[float] = field(default_factory=list)
    val_steps: list[int] = field(default_factory=list)
    """Optimiser step after which each `val_fvu_curve` point was measured."""
    best_step: int | None = None
    """The step whose weights were kept (the best held-out FVU); None without a validation split."""
    steps_trained: int = 0
    """Optimiser steps this layer took before it stopped (early stopping) or ran out of `steps`."""

    def summary(self) -> dict[str, Any]:
        """The final numbers without the curves (what stage info and reports show); val_* only when
        measured."""
        out: dict[str, Any] = {"fvu": self.fvu, "l0": self.l0, "dead_fraction": self.dead_fraction}
        if self.val_fvu is not None:
            out.update(
                val_fvu=self.val_fvu,
                val_l0=self.val_l0,
                val_dead_fraction=self.val_dead_fraction,
                best_step=self.best_step,
            )
        out["steps_trained"] = self.steps_trained
        return out


class SAEEval(NamedTuple):
    """Full-dataset evaluation, each [L]: FVU, mean active latents per sample, never-firing fraction."""

    fvu: Tensor
    l0: Tensor
    dead_fraction: Tensor


@torch.no_grad()
def evaluate_saes(sae: BatchedSAE, acts: Tensor, batch_size: int = 4096) -> SAEEval:
    """FVU (around the dataset mean), L0 and never-firing latent fraction over a whole dataset.

    Sums are kept in float64 across batches, so the result does not depend on `batch_size`
    beyond rounding of the float32 forward passes.

    Args:
        sae: trained SAEs.
        acts: [N, L, k] raw activations.
        batch_size: samples per forward pass.
    """
    device = sae.W_enc.device
    num_layers = sae.num_layers
    err = torch.zeros(num_layers, dtype=torch.float64, device=device)
    sq = torch.zeros(num_layers, dtype=torch.float64, device=device)
    total = torch.zeros(num_layers, sae.d_in, dtype=torch.float64, device=device)
    active = torch.zeros(num_layers, dtype=torch.float64, device=device)
    fired = torch.zeros(num_layers, sae.d_sae, dtype=torch.bool, device=device)
    for start in range(0, acts.shape[0], batch_size):
        x = sae.normalize(acts[start : start + batch_size].to(device, torch.float32).transpose(0, 1))
        out = sae(x)
        err += (out.recon - x).double().pow(2).sum(dim=(1, 2))
        sq += x.double().pow(2).sum(dim=(1, 2))
        total += x.double().sum(dim=1)
        nonzero = out.codes > 0
        active += nonzero.sum(dim=(1, 2)).double()
        fired |= nonzero.any(dim=1)
    n = acts.shape[0]
    variance = (sq - total.pow(2).sum(dim=-1) / n).clamp_min(torch.finfo(torch.float64).tiny)
    return SAEEval(
        fvu=(err / variance).float().cpu(),
        l0=(active / n).float().cpu(),
        dead_fraction=(~fired).double().mean(dim=-1).float().cpu(),
    )
