"""The SAE training objective (paper eq. 21-27, supplement §6): L_FVU + alpha * L_AuxK + lambda * L_1.

Every term is computed per layer ([L] tensors), so layers trained together stay independent: the
sum over layers gives each layer exactly its own gradient.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from finescope_core.config import SAEConfig
from finescope_core.sae.model import BatchedSAE


class SAELosses(NamedTuple):
    """Per-layer loss terms, each [L], and the codes [L, B, d_sae] that produced them."""

    total: Tensor
    fvu: Tensor
    auxk: Tensor
    l1: Tensor
    codes: Tensor


def total_variance(x: Tensor) -> Tensor:
    """V of eq. 21: squared distance of a batch from its own mean. x: [L, B, k] -> [L]."""
    return (x - x.mean(dim=1, keepdim=True)).pow(2).sum(dim=(1, 2))


def fvu_loss(x: Tensor, recon: Tensor, variance: Tensor) -> Tensor:
    """L_FVU of eq. 22: ||x_hat - x||_F^2 / V per layer. x, recon: [L, B, k]; variance: [L] -> [L]."""
    return (recon - x).pow(2).sum(dim=(1, 2)) / variance


def auxk_loss(
    W_dec: Tensor, pre_acts: Tensor, residual: Tensor, dead_mask: Tensor, k_aux: int, variance: Tensor
) -> Tensor:
    """L_AuxK of eq. 23-25: how well the top dead latents predict what the live ones missed.

    Per layer and sample, the `k_aux` dead latents with the largest pre-activations (fewer if fewer
    are dead) are decoded, as ReLU codes and without b_dec, into E_hat; the loss is
    s * ||E_hat - E||_F^2 / V with s = min(n_dead / k_aux, 1), and 0 for a layer without dead latents.

    The gradient passes straight through that ReLU. In a ReLU SAE a dead latent has pre-activation
    <= 0 on every recent sample, so the true gradient would be zero and AuxK would do nothing; the
    straight-through gradient raises a dead latent's pre-activation on the samples whose residual
    its decoder row points along, until it fires there. (Decoding the raw, negative pre-activations
    instead also carries gradient, but a dead latent can then fit the residual with a negative
    coefficient and stay dead: with 32 of 128 latents silenced at initialisation it revived none,
    this revived 31.)

    The target E is the main pass's residual x - x_hat, detached (the sparsify convention; the
    paper's eq. 18 writes x_hat - x). With this sign a latent fitted to the target moves the
    reconstruction towards x once it fires.

    Args:
        W_dec: [L, d_sae, k] decoder.
        pre_acts: [L, B, d_sae] encoder pre-activations (before ReLU).
        residual: [L, B, k] target x - x_hat (detached by this function).
        dead_mask: [L, d_sae] bool, True where a latent is dead.
        k_aux: most dead latents decoded per sample.
        variance: [L] V of the batch (eq. 21).

    Returns:
        [L] loss per layer.
    """
    n_dead = dead_mask.sum(dim=-1)
    k = min(k_aux, int(n_dead.max()))
    if k == 0:
        return pre_acts.new_zeros(pre_acts.shape[0])
    candidates = pre_acts.masked_fill(~dead_mask[:, None, :], float("-inf"))
    values, indices = candidates.topk(k, dim=-1)
    # Layers with fewer than k dead latents pick live ones too (at -inf): drop those picks.
    values = torch.where(torch.isfinite(values), values, torch.zeros_like(values))
    codes = values + (torch.relu(values) - values).detach()
    aux_codes = torch.zeros_like(pre_acts).scatter(-1, indices, codes)
    predicted = torch.bmm(aux_codes, W_dec)
    scale = (n_dead.to(pre_acts.dtype) / k_aux).clamp(max=1.0)
    return scale * (predicted - residual.detach()).pow(2).sum(dim=(1, 2)) / variance


def sae_losses(sae: BatchedSAE, x_norm: Tensor, dead_mask: Tensor | None, cfg: SAEConfig) -> SAELosses:
    """All loss terms of eq. 27 for a batch of standardised inputs, per layer.

    The L1 term is normalised as the batch mean of each sample's code L1 norm, sum_j |z_ij|
    (eq. 26 divided by B), so that, like L_FVU, it does not grow with the batch size. It is reported
    for every SAE but weighs in only for `relu`: a TopK SAE's sparsity is fixed by k.

    Args:
        sae: the SAEs.
        x_norm: [L, B, k] standardised activations.
        dead_mask: [L, d_sae] bool, or None for no AuxK term.
        cfg: supplies l1_coef (lambda, `relu` only), aux_alpha (alpha) and k_aux.
    """
    out = sae(x_norm)
    variance = total_variance(x_norm).clamp_min(torch.finfo(x_norm.dtype).tiny)
    fvu = fvu_loss(x_norm, out.recon, variance)
    if dead_mask is None or cfg.aux_alpha == 0:
        aux = fvu.new_zeros(fvu.shape)
    else:
        aux = auxk_loss(sae.W_dec, out.pre_acts, x_norm - out.recon, dead_mask, cfg.k_aux, variance)
    l1 = out.codes.sum(dim=-1).mean(dim=-1)
    l1_coef = cfg.l1_coef if sae.kind == "relu" else 0.0
    total = fvu + cfg.aux_alpha * aux + l1_coef * l1
    return SAELosses(total, fvu, aux, l1, out.codes)
