"""The batched SAE module: L independent SAEs (one per hooked layer) stored as [L, ...] tensors.

Paper eq. 3-4: z = ReLU(W_enc^T (x - b_dec) + b_enc), x_hat = W_dec^T z + b_dec. With `kind="topk"`
(Gao et al. 2024, as in EleutherAI's sparsify) z keeps only the k largest of those ReLU values per
sample, so L0 is at most k by construction instead of through an L1 penalty. The layers share
no parameters; they live in one module so that a training step is one set of batched ops instead of
L sets. Choices, and why:

- Inputs are z-scored per layer and coordinate with statistics of the training data, stored with
  the SAE as buffers: raw pooled activations are dominated by a few massive coordinates
  (docs/architecture.md, "Pooling").
- Anthropic/sparsify-style encoder: b_dec is subtracted before encoding, so b_dec is the point the
  dictionary is centred on.
- Decoder rows stay unit-norm, so the L1 penalty cannot be dodged by shrinking codes and growing
  rows (`normalize_decoder_`, `remove_parallel_decoder_grad_`).
- W_enc starts as a scaled W_dec^T so that the untrained SAE reconstructs x at about the right
  scale (see `BatchedSAE.initialised`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal, NamedTuple, cast

import torch
from torch import Tensor, nn

SAEKind = Literal["relu", "topk"]
"""The code activation: plain ReLU, or ReLU then the k largest per sample."""


class SAEInputError(ValueError):
    """Activations or saved SAEs that cannot be used; the message names the input and the fix."""


def _checked_kind(kind: str, k: int | None, d_sae: int) -> tuple[SAEKind, int | None]:
    """(kind, k) validated: `topk` needs 1 <= k <= d_sae; `relu` takes no k."""
    if kind == "relu":
        return "relu", None
    if kind != "topk":
        raise SAEInputError(f"unknown SAE kind {kind!r}; choose relu or topk")
    if k is None or not 1 <= k <= d_sae:
        raise SAEInputError(f"a topk SAE needs 1 <= k <= d_sae={d_sae}; got k={k}")
    return "topk", k


class SAEOutput(NamedTuple):
    """One forward pass, layer-major. pre_acts/codes: [L, B, d_sae]; recon: [L, B, k]."""

    pre_acts: Tensor
    codes: Tensor
    recon: Tensor


class BatchedSAE(nn.Module):
    """L independent SAEs (one per hooked layer) stored as tensors with a leading layer dim.

    Parameters: W_enc [L, k, d_sae], b_enc [L, d_sae], W_dec [L, d_sae, k] (unit-norm rows),
    b_dec [L, k]. Buffers: mean, std [L, k], the input standardisation of each layer.
    Tensors passed to `forward`/`encode_normalized` are layer-major: [L, B, k].
    `kind` and `k` (the activation, see `activate`) are the same for every layer.
    """

    # Buffers, declared for the type checker (nn.Module's __getattr__ would type them Tensor | Module).
    mean: Tensor
    std: Tensor

    def __init__(
        self, num_layers: int, d_in: int, d_sae: int, kind: SAEKind = "relu", k: int | None = None
    ) -> None:
        super().__init__()
        self.kind, self.k = _checked_kind(kind, k, d_sae)
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
    def initialised(
        cls, d_in: int, d_sae: int, layer_seeds: Sequence[int], kind: SAEKind = "relu", k: int | None = None
    ) -> BatchedSAE:
        """A fresh SAE per seed: random unit decoder rows, W_enc = c * W_dec^T, zero biases.

        c = min(1, 2 * d_in / d_sae). For a random unit direction d, E[ReLU(x.d) d] = x / (2 d_in),
        so with W_enc = W_dec^T the untrained SAE reconstructs (d_sae / (2 d_in)) * x: 4x too large
        at d_sae = 1024, d_in = 128 (initial FVU ~10). With c the untrained reconstruction is about x;
        on synthetic data this also gave a lower final FVU and L0 at the same step budget.

        Args:
            d_in: input coordinates per layer (k).
            d_sae: latents per layer.
            layer_seeds: one seed per layer; layer l's weights depend on `layer_seeds[l]` only.
            kind: the code activation (`relu` or `topk`).
            k: latents kept per sample for `topk`.
        """
        sae = cls(len(layer_seeds), d_in, d_sae, kind, k)
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

    def activate(self, pre_acts: Tensor) -> Tensor:
        """Codes from pre-activations [L, B, d_sae]: ReLU, and for `topk` only the k largest per sample.

        TopK keeps exactly k entries per sample (ties broken by `torch.topk`); some of them are zero
        when fewer than k pre-activations are positive. The gradient flows to the kept entries only.
        """
        codes = torch.relu(pre_acts)
        if self.kind == "relu":
            return codes
        values, indices = codes.topk(cast(int, self.k), dim=-1, sorted=False)
        return torch.zeros_like(codes).scatter(-1, indices, values)

    def encode_normalized(self, x_norm: Tensor) -> Tensor:
        """Codes (eq. 3/19, or TopK) of standardised inputs. x_norm: [L, B, k] -> [L, B, d_sae]."""
        return self.activate(self.pre_activations(x_norm))

    def decode(self, codes: Tensor) -> Tensor:
        """Reconstruction (eq. 4) in standardised units. codes: [L, B, d_sae] -> [L, B, k]."""
        return torch.baddbmm(self.b_dec[:, None], codes, self.W_dec)

    def forward(self, x_norm: Tensor) -> SAEOutput:
        """Encode and decode standardised inputs x_norm: [L, B, k]."""
        pre = self.pre_activations(x_norm)
        codes = self.activate(pre)
        return SAEOutput(pre, codes, self.decode(codes))

    @torch.no_grad()
    def normalize_decoder_(self) -> None:
        """Rescale every decoder row to unit L2 norm, in place."""
        self.W_dec.div_(self.W_dec.norm(dim=-1, keepdim=True).clamp_min(torch.finfo(self.W_dec.dtype).eps))

    @torch.no_grad()
    def remove_parallel_decoder_grad_(self) -> None:
        """Drop the part of W_dec.grad that would only change the (fixed) length of each row.

        Adam rescales per element, so this projection alone does not keep rows unit-norm; the
        renormalisation after the step (`normalize_decoder_`) does.
        """
        if self.W_dec.grad is None:
            return
        parallel = (self.W_dec.grad * self.W_dec).sum(dim=-1, keepdim=True)
        self.W_dec.grad -= parallel * self.W_dec

    def layer(self, i: int) -> BatchedSAE:
        """A one-layer copy of layer `i` (negative counts from the end), e.g. to ship to a worker."""
        if not -self.num_layers <= i < self.num_layers:
            raise IndexError(f"layer {i} out of range for an SAE with {self.num_layers} layers")
        i %= self.num_layers
        out = BatchedSAE(1, self.d_in, self.d_sae, self.kind, self.k).to(self.W_enc.device)
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
        kinds = {(s.kind, s.k) for s in saes}
        if len(kinds) != 1:
            raise SAEInputError(
                f"cannot stack SAEs of different activations (kind, k): {sorted(kinds, key=str)}"
            )
        d_in, d_sae = shapes.pop()
        kind, k = kinds.pop()
        out = BatchedSAE(sum(s.num_layers for s in saes), d_in, d_sae, kind, k).to(saes[0].W_enc.device)
        states = [s.state_dict() for s in saes]
        out.load_state_dict({name: torch.cat([st[name] for st in states]) for name in states[0]})
        return out


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
            f"acts must have shape [N, {sae.num_layers}, {sae.d_in}] to match the SAEs; "
            f"got {tuple(acts.shape)}"
        )
    out = torch.empty(acts.shape[0], sae.num_layers, sae.d_sae, device=acts.device)
    device = sae.W_enc.device
    for start in range(0, acts.shape[0], batch_size):
        x = acts[start : start + batch_size].to(device, torch.float32).transpose(0, 1)
        codes = sae.encode_normalized(sae.normalize(x))
        out[start : start + batch_size] = codes.transpose(0, 1).to(out.device)
    return out
