"""Sparse autoencoders for every hooked layer, trained together as one batched module.

Paper eq. 3-5 and supplement §6: z = ReLU(W_enc^T (x - b_dec) + b_enc), x_hat = W_dec^T z + b_dec,
loss L_FVU + alpha * L_AuxK + lambda * L_1. The L per-layer SAEs are independent; they live in one
module with parameters shaped [L, ...], so a training step is one set of batched ops instead of L
sets. That saves per-op overhead, not arithmetic: `bench/bench_sae.py` on 2 CPU cores measured
2.7x for small SAEs (k=32, d_sae=256) and parity for compute-bound ones (k=128, d_sae=1024); the
overhead it removes is what dominates on an accelerator.

Choices, and why:
- Inputs are z-scored per layer and coordinate with statistics of the training data, stored with
  the SAE as buffers: raw pooled activations are dominated by a few massive coordinates (DESIGN.md).
- Anthropic/sparsify-style encoder: b_dec is subtracted before encoding, so b_dec is the point the
  dictionary is centred on.
- Decoder rows stay unit-norm, so the L1 penalty cannot be dodged by shrinking codes and growing
  rows: the gradient component parallel to each row is removed before the optimiser step and the
  rows are renormalised after it (Adam rescales per element, so the projection alone is not enough).
- AuxK passes its gradient straight through the ReLU of the top dead latents: a dead latent of a
  ReLU SAE outputs exactly zero, so the true gradient would be zero and AuxK would revive nothing.
- W_enc starts as a scaled W_dec^T so that the untrained SAE reconstructs x at about the right
  scale (see `BatchedSAE.initialised`).
- Everything random about a layer (initialisation, minibatch order) derives from (seed, layer id),
  so layers trained on separate workers and joined with `BatchedSAE.stack` equal one joint run.
"""

from __future__ import annotations

import hashlib
import json
import os
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from finescope_core.config import SAEConfig

SAE_FILE = "sae.safetensors"
CFG_FILE = "cfg.json"
METRICS_FILE = "metrics.json"
_TENSOR_NAMES = ("W_enc", "b_enc", "W_dec", "b_dec", "mean", "std")
_CURVE_POINTS = 100

ProgressFn = Callable[[int, int, dict[str, Any]], None]


class SAEInputError(ValueError):
    """Activations or saved SAEs that cannot be used; the message names the input and the fix."""


@dataclass
class LayerMetrics:
    """Training summary of one layer's SAE.

    `fvu`, `l0` and `dead_fraction` are measured after training on the full training set;
    a latent counts as dead there when it fires on no training sample.
    """

    fvu: float
    l0: float
    dead_fraction: float
    loss_curve: list[float] = field(default_factory=list)
    fvu_curve: list[float] = field(default_factory=list)
    curve_steps: list[int] = field(default_factory=list)
    """Optimiser step (1-based) at which each curve point ends; a point averages the steps since the last."""


class SAEOutput(NamedTuple):
    """One forward pass, layer-major. pre_acts/codes: [L, B, d_sae]; recon: [L, B, k]."""

    pre_acts: Tensor
    codes: Tensor
    recon: Tensor


class SAELosses(NamedTuple):
    """Per-layer loss terms, each [L], and the codes [L, B, d_sae] that produced them."""

    total: Tensor
    fvu: Tensor
    auxk: Tensor
    l1: Tensor
    codes: Tensor


class SAEEval(NamedTuple):
    """Full-dataset evaluation, each [L]: FVU, mean active latents per sample, never-firing fraction."""

    fvu: Tensor
    l0: Tensor
    dead_fraction: Tensor


class BatchedSAE(nn.Module):
    """L independent ReLU SAEs (one per hooked layer) stored as tensors with a leading layer dim.

    Parameters: W_enc [L, k, d_sae], b_enc [L, d_sae], W_dec [L, d_sae, k] (unit-norm rows),
    b_dec [L, k]. Buffers: mean, std [L, k], the input standardisation of each layer.
    Tensors passed to `forward`/`encode_normalized` are layer-major: [L, B, k].
    """

    def __init__(self, num_layers: int, d_in: int, d_sae: int) -> None:
        super().__init__()
        self.W_enc = nn.Parameter(torch.zeros(num_layers, d_in, d_sae))
        self.b_enc = nn.Parameter(torch.zeros(num_layers, d_sae))
        self.W_dec = nn.Parameter(torch.zeros(num_layers, d_sae, d_in))
        self.b_dec = nn.Parameter(torch.zeros(num_layers, d_in))
        self.register_buffer("mean", torch.zeros(num_layers, d_in))
        self.register_buffer("std", torch.ones(num_layers, d_in))

    @property
    def num_layers(self) -> int:
        return self.W_enc.shape[0]

    @property
    def d_in(self) -> int:
        return self.W_enc.shape[1]

    @property
    def d_sae(self) -> int:
        return self.W_enc.shape[2]

    @classmethod
    def initialised(cls, d_in: int, d_sae: int, layer_seeds: Sequence[int]) -> BatchedSAE:
        """A fresh SAE per seed: random unit decoder rows, W_enc = c * W_dec^T, zero biases.

        c = min(1, 2 * d_in / d_sae). For a random unit direction d, E[ReLU(x.d) d] = x / (2 d_in),
        so with W_enc = W_dec^T the untrained SAE reconstructs (d_sae / (2 d_in)) * x: 4x too large
        at d_sae = 1024, d_in = 128 (initial FVU ~10). With c the untrained reconstruction is about x;
        on synthetic data this also gave a lower final FVU and L0 at the same step budget.

        Args:
            d_in: input coordinates per layer (k).
            d_sae: latents per layer.
            layer_seeds: one seed per layer; layer l's weights depend on `layer_seeds[l]` only.
        """
        sae = cls(len(layer_seeds), d_in, d_sae)
        enc_scale = min(1.0, 2 * d_in / d_sae)
        with torch.no_grad():
            for i, layer_seed in enumerate(layer_seeds):
                gen = torch.Generator().manual_seed(layer_seed)
                rows = torch.randn(d_sae, d_in, generator=gen)
                sae.W_dec[i] = rows / rows.norm(dim=-1, keepdim=True)
                sae.W_enc[i] = enc_scale * sae.W_dec[i].T
        return sae

    def normalize(self, x: Tensor) -> Tensor:
        """Standardise raw activations. x: [L, B, k] -> [L, B, k]."""
        return (x - self.mean[:, None]) / self.std[:, None]

    def pre_activations(self, x_norm: Tensor) -> Tensor:
        """Encoder pre-activations (x - b_dec) W_enc + b_enc. x_norm: [L, B, k] -> [L, B, d_sae]."""
        return torch.baddbmm(self.b_enc[:, None], x_norm - self.b_dec[:, None], self.W_enc)

    def encode_normalized(self, x_norm: Tensor) -> Tensor:
        """Codes (eq. 3/19) of standardised inputs. x_norm: [L, B, k] -> [L, B, d_sae]."""
        return torch.relu(self.pre_activations(x_norm))

    def decode(self, codes: Tensor) -> Tensor:
        """Reconstruction (eq. 4) in standardised units. codes: [L, B, d_sae] -> [L, B, k]."""
        return torch.baddbmm(self.b_dec[:, None], codes, self.W_dec)

    def forward(self, x_norm: Tensor) -> SAEOutput:
        """Encode and decode standardised inputs x_norm: [L, B, k]."""
        pre = self.pre_activations(x_norm)
        codes = torch.relu(pre)
        return SAEOutput(pre, codes, self.decode(codes))

    @torch.no_grad()
    def normalize_decoder_(self) -> None:
        """Rescale every decoder row to unit L2 norm, in place."""
        self.W_dec /= self.W_dec.norm(dim=-1, keepdim=True).clamp_min(torch.finfo(self.W_dec.dtype).eps)

    @torch.no_grad()
    def remove_parallel_decoder_grad_(self) -> None:
        """Drop the part of W_dec.grad that would only change the (fixed) length of each row."""
        if self.W_dec.grad is None:
            return
        parallel = (self.W_dec.grad * self.W_dec).sum(dim=-1, keepdim=True)
        self.W_dec.grad -= parallel * self.W_dec

    def layer(self, i: int) -> BatchedSAE:
        """A one-layer copy of layer `i` (negative counts from the end), e.g. to ship to a worker."""
        if not -self.num_layers <= i < self.num_layers:
            raise IndexError(f"layer {i} out of range for an SAE with {self.num_layers} layers")
        i %= self.num_layers
        out = BatchedSAE(1, self.d_in, self.d_sae).to(self.W_enc.device)
        out.load_state_dict({name: t[i : i + 1].clone() for name, t in self.state_dict().items()})
        return out

    @staticmethod
    def stack(saes: Sequence[BatchedSAE]) -> BatchedSAE:
        """Join SAEs (e.g. trained per layer on different workers) along the layer dim, in order."""
        if not saes:
            raise SAEInputError("BatchedSAE.stack needs at least one SAE")
        shapes = {(s.d_in, s.d_sae) for s in saes}
        if len(shapes) != 1:
            raise SAEInputError(f"cannot stack SAEs of different (d_in, d_sae) shapes: {sorted(shapes)}")
        d_in, d_sae = shapes.pop()
        out = BatchedSAE(sum(s.num_layers for s in saes), d_in, d_sae).to(saes[0].W_enc.device)
        states = [s.state_dict() for s in saes]
        out.load_state_dict({name: torch.cat([st[name] for st in states]) for name in states[0]})
        return out


def layer_seed(seed: int, layer_id: int) -> int:
    """The seed of one layer's randomness, a well-mixed function of (run seed, layer id)."""
    digest = hashlib.sha256(f"finescope-sae:{seed}:{layer_id}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


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
    (eq. 26 divided by B), so that, like L_FVU, it does not grow with the batch size.

    Args:
        sae: the SAEs.
        x_norm: [L, B, k] standardised activations.
        dead_mask: [L, d_sae] bool, or None for no AuxK term.
        cfg: supplies l1_coef (lambda), aux_alpha (alpha) and k_aux.
    """
    out = sae(x_norm)
    variance = total_variance(x_norm).clamp_min(torch.finfo(x_norm.dtype).tiny)
    fvu = fvu_loss(x_norm, out.recon, variance)
    if dead_mask is None or cfg.aux_alpha == 0:
        aux = fvu.new_zeros(fvu.shape)
    else:
        aux = auxk_loss(sae.W_dec, out.pre_acts, x_norm - out.recon, dead_mask, cfg.k_aux, variance)
    l1 = out.codes.sum(dim=-1).mean(dim=-1)
    total = fvu + cfg.aux_alpha * aux + cfg.l1_coef * l1
    return SAELosses(total, fvu, aux, l1, out.codes)


class DeadLatentTracker:
    """Counts, per layer and latent, the training samples seen since the latent last fired."""

    def __init__(self, num_layers: int, d_sae: int, dead_after: int, device: torch.device | str = "cpu"):
        self.dead_after = dead_after
        self.since_fired = torch.zeros(num_layers, d_sae, dtype=torch.long, device=device)

    def update(self, codes: Tensor) -> None:
        """Account for one batch of codes [L, B, d_sae]."""
        fired = (codes > 0).any(dim=1)
        self.since_fired += codes.shape[1]
        self.since_fired.masked_fill_(fired, 0)

    def dead_mask(self) -> Tensor:
        """[L, d_sae] bool: latents silent for at least `dead_after` samples."""
        return self.since_fired >= self.dead_after


def _batch_indices(n: int, batch_size: int, seed: int) -> Iterator[Tensor]:
    """Endless minibatches of sample indices [batch_size]: seeded reshuffles, one per epoch."""
    gen = torch.Generator().manual_seed(seed)
    perm, pos = torch.randperm(n, generator=gen), 0
    while True:
        parts, need = [], batch_size
        while need:
            if pos == n:
                perm, pos = torch.randperm(n, generator=gen), 0
            take = perm[pos : pos + need]
            parts.append(take)
            pos, need = pos + len(take), need - len(take)
        yield torch.cat(parts)


class _CurveRecorder:
    """Averages per-layer total loss and FVU over ~1% of the steps per point.

    Sums stay on the training device, so an accelerator is synchronised once per point, not per step.
    """

    def __init__(self, num_layers: int, steps: int, device: torch.device):
        self.every = max(1, steps // _CURVE_POINTS)
        self.steps = steps
        self.loss_sum = torch.zeros(num_layers, device=device)
        self.fvu_sum = torch.zeros(num_layers, device=device)
        self.count = 0
        self.loss: list[list[float]] = []
        self.fvu: list[list[float]] = []
        self.at: list[int] = []

    def add(self, step: int, losses: SAELosses) -> bool:
        """Add step `step` (0-based); True when it closed a curve point."""
        self.loss_sum += losses.total.detach()
        self.fvu_sum += losses.fvu.detach()
        self.count += 1
        if (step + 1) % self.every and step + 1 != self.steps:
            return False
        self.loss.append((self.loss_sum / self.count).tolist())
        self.fvu.append((self.fvu_sum / self.count).tolist())
        self.at.append(step + 1)
        self.loss_sum.zero_()
        self.fvu_sum.zero_()
        self.count = 0
        return True


def check_activations(acts: Tensor, layer_ids: Sequence[int] | None = None) -> None:
    """Raise SAEInputError unless acts is a finite float tensor [N >= 2, L, k].

    Args:
        acts: [N, L, k] pooled activations.
        layer_ids: model layer index of each position in acts, used in error messages.
    """
    if not isinstance(acts, Tensor) or acts.dim() != 3:
        shape = tuple(acts.shape) if isinstance(acts, Tensor) else type(acts).__name__
        raise SAEInputError(f"acts must be a tensor [N samples, L layers, k coordinates]; got {shape}")
    if not acts.is_floating_point():
        raise SAEInputError(f"acts must be floating point; got {acts.dtype}")
    n, num_layers, k = acts.shape
    if n < 2 or num_layers < 1 or k < 1:
        raise SAEInputError(
            f"acts has shape {tuple(acts.shape)}; SAE training needs at least 2 samples, 1 layer and "
            "1 coordinate (pass more texts to the activation stage)"
        )
    ids = list(layer_ids) if layer_ids is not None else list(range(num_layers))
    if len(ids) != num_layers:
        raise SAEInputError(f"layer_ids has {len(ids)} entries but acts has {num_layers} layers")
    bad_samples = (~torch.isfinite(acts)).any(dim=2).sum(dim=0).tolist()
    bad = [
        f"layer {ids[pos]} (position {pos} of acts, {count} of {n} samples)"
        for pos, count in enumerate(bad_samples)
        if count
    ]
    if bad:
        raise SAEInputError(
            f"acts has NaN/inf values in {', '.join(bad)}; re-extract the activations in float32 "
            "or drop those samples"
        )


@torch.no_grad()
def standardisation_stats(acts: Tensor, layer_ids: Sequence[int], chunk: int = 4096) -> tuple[Tensor, Tensor]:
    """Per-layer, per-coordinate mean and std of acts [N, L, k], in float64 then cast to float32.

    Two passes (mean, then squared deviations) because pooled activations can have massive
    coordinates where the one-pass sum-of-squares formula loses all precision. A coordinate that
    is constant gets std 1 (it standardises to 0). Raises SAEInputError for a constant layer.

    Returns:
        mean, std: [L, k] float32 on acts' device.
    """
    n = acts.shape[0]
    total = torch.zeros(acts.shape[1:], dtype=torch.float64, device=acts.device)
    for start in range(0, n, chunk):
        total += acts[start : start + chunk].double().sum(dim=0)
    mean = total / n
    sq = torch.zeros_like(total)
    for start in range(0, n, chunk):
        sq += (acts[start : start + chunk].double() - mean).pow(2).sum(dim=0)
    std = (sq / n).sqrt()
    constant = std <= 1e-12 * mean.abs().clamp_min(1.0)
    flat = [
        f"layer {layer_ids[pos]} (position {pos} of acts)"
        for pos in constant.all(dim=1).nonzero().flatten().tolist()
    ]
    if flat:
        raise SAEInputError(
            f"{', '.join(flat)} has the same activations for every sample, so there is nothing to "
            "learn; check the pooling or drop that layer"
        )
    std = torch.where(constant, torch.ones_like(std), std)
    return mean.float(), std.float()


@torch.no_grad()
def evaluate_saes(sae: BatchedSAE, acts: Tensor, batch_size: int = 4096) -> SAEEval:
    """FVU (around the dataset mean), L0 and never-firing latent fraction over a whole dataset.

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


def train_saes(
    acts: Tensor,
    cfg: SAEConfig,
    *,
    seed: int,
    device: torch.device | str = "cpu",
    progress: ProgressFn | None = None,
    layer_ids: Sequence[int] | None = None,
) -> tuple[BatchedSAE, list[LayerMetrics]]:
    """Train one SAE per layer of `acts`, all layers at once, with Adam on FVU + alpha*AuxK + lambda*L1.

    Deterministic given `seed`. Each layer's initialisation and minibatch order depend only on
    (seed, layer id), so training layers separately (with their `layer_ids`) and stacking them gives
    the same SAEs as one joint run.

    Args:
        acts: [N, L, k] pooled activations (any float dtype; trained in float32). Must fit on `device`.
        cfg: SAE hyper-parameters.
        seed: run seed.
        device: where to train.
        progress: called as progress(step, steps, {"loss": [L floats], "fvu": [L floats]}) at each
            curve point (~every 1% of the steps).
        layer_ids: the model layer of each position in acts (default 0..L-1); seeds and messages.

    Returns:
        The SAEs (eval mode, on `device`) and per-layer metrics.
    """
    check_activations(acts, layer_ids)
    n, num_layers, k = acts.shape
    ids = list(layer_ids) if layer_ids is not None else list(range(num_layers))
    device = torch.device(device)
    acts = acts.to(device, torch.float32)
    batch_size = min(cfg.batch_size, n)

    seeds = [layer_seed(seed, i) for i in ids]
    sae = BatchedSAE.initialised(k, cfg.d_sae, seeds).to(device)
    sae.mean, sae.std = standardisation_stats(acts, ids)
    samplers = [_batch_indices(n, batch_size, s) for s in seeds]
    layer_index = torch.arange(num_layers, device=device)[:, None]
    optimizer = torch.optim.Adam(sae.parameters(), lr=cfg.lr)
    tracker = DeadLatentTracker(num_layers, cfg.d_sae, cfg.dead_after, device)
    curve = _CurveRecorder(num_layers, cfg.steps, device)

    sae.train()
    for step in range(cfg.steps):
        rows = torch.stack([next(s) for s in samplers]).to(device)
        x_norm = sae.normalize(acts[rows, layer_index])
        losses = sae_losses(sae, x_norm, tracker.dead_mask(), cfg)
        optimizer.zero_grad(set_to_none=True)
        # Layers share no parameters, so the sum gives each layer exactly its own gradient.
        losses.total.sum().backward()
        sae.remove_parallel_decoder_grad_()
        optimizer.step()
        sae.normalize_decoder_()
        tracker.update(losses.codes.detach())
        if curve.add(step, losses) and progress is not None:
            progress(step + 1, cfg.steps, {"loss": curve.loss[-1], "fvu": curve.fvu[-1]})
    sae.eval()

    final = evaluate_saes(sae, acts)
    metrics = [
        LayerMetrics(
            fvu=float(final.fvu[i]),
            l0=float(final.l0[i]),
            dead_fraction=float(final.dead_fraction[i]),
            loss_curve=[point[i] for point in curve.loss],
            fvu_curve=[point[i] for point in curve.fvu],
            curve_steps=list(curve.at),
        )
        for i in range(num_layers)
    ]
    return sae, metrics


@torch.no_grad()
def encode(sae: BatchedSAE, acts: Tensor, batch_size: int = 4096) -> Tensor:
    """SAE codes of raw activations, standardised with the statistics stored in `sae`.

    Args:
        sae: L-layer SAEs.
        acts: [N, L, k] raw pooled activations, laid out like the training data.
        batch_size: samples per forward pass.

    Returns:
        [N, L, d_sae] float32 codes, on acts' device.
    """
    if acts.dim() != 3 or acts.shape[1:] != (sae.num_layers, sae.d_in):
        raise SAEInputError(
            f"acts must have shape [N, {sae.num_layers}, {sae.d_in}] to match the SAEs; got {tuple(acts.shape)}"
        )
    out = torch.empty(acts.shape[0], sae.num_layers, sae.d_sae, device=acts.device)
    device = sae.W_enc.device
    for start in range(0, acts.shape[0], batch_size):
        x = acts[start : start + batch_size].to(device, torch.float32).transpose(0, 1)
        codes = sae.encode_normalized(sae.normalize(x))
        out[start : start + batch_size] = codes.transpose(0, 1).to(out.device)
    return out


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        tmp.write_bytes(data)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _atomic_write_json(path: Path, obj: Any) -> None:
    _atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


def _atomic_save_tensors(path: Path, tensors: dict[str, Tensor]) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        save_file(tensors, tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _per_layer_extras(
    extra_cfg: dict[str, Any] | Sequence[dict[str, Any]] | None, num_layers: int
) -> list[dict[str, Any]]:
    if extra_cfg is None:
        return [{} for _ in range(num_layers)]
    if isinstance(extra_cfg, dict):
        return [extra_cfg] * num_layers
    extras = list(extra_cfg)
    if len(extras) != num_layers:
        raise SAEInputError(
            f"extra_cfg has {len(extras)} entries for {num_layers} SAE layers; pass one per layer"
        )
    return extras


def save_saes(
    sae: BatchedSAE,
    metrics: Sequence[LayerMetrics],
    layers: Sequence[int],
    out_dir: Path,
    extra_cfg: dict[str, Any] | Sequence[dict[str, Any]] | None = None,
    cfg: SAEConfig | None = None,
) -> list[Path]:
    """Write one directory per layer, `out_dir/layer_{l:02d}/` with cfg.json, sae.safetensors, metrics.json.

    Each file is written to a temporary name and renamed into place; cfg.json goes last, so a
    directory with a cfg.json is complete.

    Args:
        sae: L-layer SAEs.
        metrics: one LayerMetrics per layer.
        layers: the model layer index of each SAE (names the directories).
        out_dir: parent directory (created if missing).
        extra_cfg: more JSON-serialisable cfg.json fields: one dict for every layer, or a list with
            one dict per layer (e.g. `{"coordinates": [...]}`, that layer's activation coordinates).
        cfg: the training config, whose fields are recorded in cfg.json.

    Returns:
        The layer directories, in order.
    """
    if not len(metrics) == len(layers) == sae.num_layers:
        raise SAEInputError(
            f"save_saes got {sae.num_layers} SAE layers, {len(metrics)} metrics and {len(layers)} layer ids; "
            "pass one metrics entry and one layer id per SAE layer"
        )
    if len(set(layers)) != len(layers):
        raise SAEInputError(
            f"save_saes got repeated layer ids {list(layers)}; each layer needs its own directory"
        )
    extras = _per_layer_extras(extra_cfg, sae.num_layers)
    base = {"d_in": sae.d_in, "d_sae": sae.d_sae, **(cfg.model_dump() if cfg is not None else {})}
    clash = sorted({key for extra in extras for key in extra} & (set(base) | {"layer"}))
    if clash:
        raise SAEInputError(f"extra_cfg keys {clash} would overwrite SAE fields; rename them")
    dirs = []
    for i, layer in enumerate(layers):
        layer_dir = Path(out_dir) / f"layer_{layer:02d}"
        layer_dir.mkdir(parents=True, exist_ok=True)
        one = sae.layer(i)
        tensors = {name: getattr(one, name).detach()[0].contiguous().cpu() for name in _TENSOR_NAMES}
        _atomic_save_tensors(layer_dir / SAE_FILE, tensors)
        _atomic_write_json(layer_dir / METRICS_FILE, asdict(metrics[i]))
        _atomic_write_json(layer_dir / CFG_FILE, {**base, "layer": layer, **extras[i]})
        dirs.append(layer_dir)
    return dirs


def _load_layer(layer_dir: Path) -> tuple[BatchedSAE, dict[str, Any]]:
    cfg = json.loads((layer_dir / CFG_FILE).read_text())
    tensors = load_file(layer_dir / SAE_FILE)
    missing = sorted(set(_TENSOR_NAMES) - set(tensors))
    if missing:
        raise SAEInputError(f"{layer_dir / SAE_FILE} lacks tensors {missing}; re-run SAE training")
    sae = BatchedSAE(1, cfg["d_in"], cfg["d_sae"])
    sae.load_state_dict({name: tensors[name][None] for name in _TENSOR_NAMES})
    return sae, cfg


def load_saes(out_dir: Path) -> tuple[BatchedSAE, list[int], list[dict[str, Any]]]:
    """Load every `layer_*/` SAE under out_dir (as written by `save_saes`), in layer order.

    Returns:
        The stacked SAEs (eval mode, CPU), their model layer indices, and their cfg.json contents.
    """
    layer_dirs = [p for p in Path(out_dir).glob("layer_*") if (p / CFG_FILE).is_file()]
    if not layer_dirs:
        raise SAEInputError(
            f"no SAE found under {out_dir} (expected layer_XX/{CFG_FILE}); train the SAEs first"
        )
    loaded = sorted((_load_layer(p) for p in layer_dirs), key=lambda item: item[1]["layer"])
    sae = BatchedSAE.stack([s for s, _ in loaded]).eval()
    cfgs = [c for _, c in loaded]
    return sae, [c["layer"] for c in cfgs], cfgs
