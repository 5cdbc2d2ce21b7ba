"""Per-layer vote weights without labels: how well a layer's code space separates the seeds from the corpus.

Used by the vote when `curate.layer_weighting` is "quality"; the plain vote gives every layer weight 1.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch

from finescope_core.retrieval.scores import (
    Matrix,
    RetrievalInputError,
    as_float32_matrix,
    l2_normalise,
    normalised_seeds,
)


def _held_out_zscores(seeds_n: np.ndarray, sample_n: np.ndarray) -> np.ndarray:
    """Per seed i: how many corpus standard deviations seed i scores above the corpus sample
    under the max-over-seeds rule built from the other seeds.

    Args:
        seeds_n: [S, d] normalised seeds, S >= 2.
        sample_n: [n, d] normalised corpus sample.

    Returns:
        [S] float64 z-scores.
    """
    seeds64 = seeds_n.astype(np.float64)
    seed_sims = seeds64 @ seeds64.T
    corpus_sims = sample_n.astype(np.float64) @ seeds64.T
    z = np.empty(seeds_n.shape[0])
    for i in range(seeds_n.shape[0]):
        others = np.delete(np.arange(seeds_n.shape[0]), i)
        held_out = seed_sims[i, others].max()
        background = corpus_sims[:, others].max(axis=1)
        # A constant background (e.g. every sampled code all-zero) would divide by zero.
        z[i] = (held_out - background.mean()) / max(float(background.std()), 1e-6)
    return z


def layer_quality(
    seed_codes: Mapping[int, Matrix], corpus_codes: Mapping[int, Matrix], *, sample_size: int = 8192, seed: int = 0
) -> dict[int, float]:
    """Unsupervised quality of each layer's code space for seed-based retrieval (leave-one-seed-out).

    For each seed i, build the retrieval rule of eq. 12 from the other seeds and ask how far seed i
    stands out from the corpus under it: z_i = (s_{-i}(seed_i) - mean_x s_{-i}(x)) / std_x s_{-i}(x)
    over a fixed random corpus sample. The layer's quality is the mean z_i. It is high when an
    unseen in-domain example would rank near the top of the corpus in that layer, i.e. when the
    seeds form a cluster the corpus does not share; it is ~0 or negative when seeds look like any
    corpus row. Using the max rule itself (not the mean seed-seed cosine) keeps a domain made of
    several sub-topics from being penalised, and dividing by the corpus spread makes layers whose
    cosines live on different scales (dense vs sparse codes) comparable.

    Args:
        seed_codes: layer -> [S, d_l] seed codes, S >= 2 (the same seeds in every layer).
        corpus_codes: layer -> [N, d_l] corpus codes.
        sample_size: corpus rows sampled (without replacement, the same rows in every layer).
        seed: RNG seed of the sample.

    Returns:
        layer -> mean held-out z-score.
    """
    if set(seed_codes) != set(corpus_codes):
        raise RetrievalInputError(
            f"seed_codes has layers {sorted(seed_codes)} but corpus_codes has {sorted(corpus_codes)}; "
            "give both for the same layers"
        )
    if sample_size < 2:
        raise RetrievalInputError(f"sample_size must be >= 2, got {sample_size}")
    quality: dict[int, float] = {}
    for layer in sorted(seed_codes):
        codes = corpus_codes[layer]
        n = codes.shape[0]
        rows = np.sort(np.random.default_rng(seed).choice(n, size=min(n, sample_size), replace=False))
        # Sample before converting: a float64 or torch corpus is never copied whole.
        sample = codes[torch.from_numpy(rows)] if isinstance(codes, torch.Tensor) else codes[rows]
        sample_n = l2_normalise(
            as_float32_matrix(sample, f"corpus_codes[{layer}]"), f"corpus_codes[{layer}]"
        )
        seeds_n = normalised_seeds(seed_codes[layer], sample_n.shape[1], name=f"seed_codes[{layer}]")
        if seeds_n.shape[0] < 2:
            raise RetrievalInputError(f"seed_codes[{layer}] has one seed; leave-one-out needs at least 2")
        quality[layer] = float(_held_out_zscores(seeds_n, sample_n).mean())
    return quality


def layer_weights(
    seed_codes: Mapping[int, Matrix], corpus_codes: Mapping[int, Matrix], *, sample_size: int = 8192, seed: int = 0
) -> dict[int, float]:
    """Vote weights from `layer_quality`: max(quality, 0), scaled to mean 1 over the layers.

    A layer whose seeds do not stand out from the corpus gets weight 0. Scaling to mean 1 keeps
    votes on the scale of a plain layer count. When no layer has positive quality there is no
    evidence to prefer any, so every layer gets weight 1.

    Args: as `layer_quality`.

    Returns:
        layer -> weight >= 0.
    """
    quality = layer_quality(seed_codes, corpus_codes, sample_size=sample_size, seed=seed)
    clipped = {layer: max(q, 0.0) for layer, q in quality.items()}
    total = sum(clipped.values())
    if total <= 0:
        return dict.fromkeys(quality, 1.0)
    return {layer: c * len(clipped) / total for layer, c in clipped.items()}
