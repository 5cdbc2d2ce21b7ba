"""Sparse autoencoders for every hooked layer, trained together as one batched module.

Paper eq. 3-5 and supplement §6: z = ReLU(W_enc^T (x - b_dec) + b_enc), x_hat = W_dec^T z + b_dec,
loss L_FVU + alpha * L_AuxK + lambda * L_1; or TopK SAEs (`kind="topk"`: the k largest ReLU codes
per sample, loss L_FVU + alpha * L_AuxK). The L per-layer SAEs are independent; they live in one
module with parameters shaped [L, ...], so a training step is one set of batched ops instead of L.

- `model`: the batched module (`BatchedSAE`) and `encode`, raw activations to codes;
- `losses`: the training objective, per layer;
- `train`: input checks, standardisation, the held-out split, the training loop, dead-latent
  tracking, early stopping on held-out FVU;
- `metrics`: full-dataset FVU / L0 / dead latents and the per-layer training summary (training and
  held-out rows);
- `io`: one directory per layer on disk (cfg.json, sae.safetensors, metrics.json).
"""

from finescope_core.sae.io import CFG_FILE, METRICS_FILE, SAE_FILE, load_saes, save_saes
from finescope_core.sae.losses import SAELosses, auxk_loss, fvu_loss, sae_losses, total_variance
from finescope_core.sae.metrics import LayerMetrics, SAEEval, evaluate_saes
from finescope_core.sae.model import BatchedSAE, SAEInputError, SAEKind, SAEOutput, encode
from finescope_core.sae.train import (
    DeadLatentTracker,
    EarlyStopping,
    check_activations,
    layer_seed,
    standardisation_stats,
    train_saes,
    validation_split,
)

__all__ = [
    "CFG_FILE",
    "METRICS_FILE",
    "SAE_FILE",
    "BatchedSAE",
    "DeadLatentTracker",
    "EarlyStopping",
    "LayerMetrics",
    "SAEEval",
    "SAEInputError",
    "SAEKind",
    "SAELosses",
    "SAEOutput",
    "auxk_loss",
    "check_activations",
    "encode",
    "evaluate_saes",
    "fvu_loss",
    "layer_seed",
    "load_saes",
    "sae_losses",
    "save_saes",
    "standardisation_stats",
    "total_variance",
    "train_saes",
    "validation_split",
]
