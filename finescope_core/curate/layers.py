"""Which decoder layers curation hooks, the checks made before any model work, and the seeded row sample
every curation stage draws from."""

from __future__ import annotations

import numpy as np
import torch

from finescope_core.config import CurateConfig
from finescope_core.hooks import resolve_layers


class CurationError(ValueError):
    """A curation setting does not fit the model or data; the message names the field."""


def hooked_layers(num_hidden_layers: int, cfg: CurateConfig) -> list[int]:
    """The decoder layers to hook, ascending: `cfg.layers` (checked by `hooks.resolve_layers`) or
    `cfg.num_layers` evenly spaced.

    The automatic choice skips the first layers, whose outputs are still close to the token embeddings.

    Raises:
        LayerSelectionError: `cfg.layers` is empty, out of range or names a layer twice.
    """
    if cfg.layers is not None:
        return sorted(resolve_layers(cfg.layers, num_hidden_layers, setting="curate.layers"))
    count = min(cfg.num_layers, num_hidden_layers)
    start = min(2, num_hidden_layers - count)
    return sorted({round(x) for x in np.linspace(start, num_hidden_layers - 1, count)})


def check_curation_fits(cfg: CurateConfig, hidden_size: int) -> None:
    """Refuse settings that cannot work on this model, before any model work."""
    if cfg.method in ("sae", "activation") and cfg.k_act > hidden_size:
        raise CurationError(
            f"curate.k_act={cfg.k_act} exceeds the model's hidden size {hidden_size}; "
            f"use at most {hidden_size}"
        )


def sample_rows(n: int, k: int, seed: int) -> list[int]:
    """`min(k, n)` of the rows 0..n-1, drawn by `seed`, ascending (the same rows for the same seed)."""
    gen = torch.Generator().manual_seed(seed)
    return sorted(torch.randperm(n, generator=gen)[: min(k, n)].tolist())
