"""Per-layer vote weights without labels, for `curate.layer_weighting` (the plain vote gives every layer 1).

- "quality" (`layer_quality`, `layer_weights`): how well a layer's code space separates a held-out
  seed from the corpus;
- "agreement" (`layer_agreement`, `agreement_weights`): how much a layer's top-M list overlaps the
  other layers' lists, beyond chance.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import torch

from finescope_core.retrieval.scores import (
    Matrix,
    RetrievalInputError,
    as_float32_matrix,
    l2_normalise,
    normalised_seeds,
)
from finescope_core.retrieval.vote import LayerSelection


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
    seed_codes: Mapping[int, Matrix],
    corpus_codes: Mapping[int, Matrix],
    *,
    sample_size: int = 8192,
    seed: int = 0,
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
        sample_n = l2_normalise(as_float32_matrix(sample, f"corpus_codes[{layer}]"), f"corpus_codes[{layer}]")
        seeds_n = normalised_seeds(seed_codes[layer], sample_n.shape[1], name=f"seed_codes[{layer}]")
        if seeds_n.shape[0] < 2:
            raise RetrievalInputError(f"seed_codes[{layer}] has one seed; leave-one-out needs at least 2")
        quality[layer] = float(_held_out_zscores(seeds_n, sample_n).mean())
    return quality


def layer_weights(
    seed_codes: Mapping[int, Matrix],
    corpus_codes: Mapping[int, Matrix],
    *,
    sample_size: int = 8192,
    seed: int = 0,
) -> dict[int, float]:
    """Vote weights from `layer_quality`: max(quality, 0), scaled to mean 1 over the layers.

    A layer whose seeds do not stand out from the corpus gets weight 0. Scaling to mean 1 keeps
    votes on the scale of a plain layer count. When no layer has positive quality there is no
    evidence to prefer any, so every layer gets weight 1.

    Args: as `layer_quality`.

    Returns:
        layer -> weight >= 0.
    """
    return _mean_one(layer_quality(seed_codes, corpus_codes, sample_size=sample_size, seed=seed))


def _mean_one(scores: Mapping[int, float]) -> dict[int, float]:
    """max(score, 0) scaled to mean 1 over the layers; every layer 1 when none is positive."""
    clipped = {layer: max(q, 0.0) for layer, q in scores.items()}
    total = sum(clipped.values())
    if total <= 0:
        return dict.fromkeys(scores, 1.0)
    return {layer: c * len(clipped) / total for layer, c in clipped.items()}


def layer_agreement(selections: Sequence[LayerSelection], corpus_size: int) -> dict[int, float]:
    """How much each layer's top-M list agrees with the other layers', beyond chance (no labels, no seed
    count).

    a_l = mean over the other layers k of |T_l & T_k| / |T_l|, minus |T_k| / N, the overlap two
    random lists of those sizes would have. Why it tracks a layer's precision: if a list is the
    domain rows a layer finds plus noise, and the noise of different layers is independent while the
    domain is shared, the overlap of layers l and k grows with the product of their precisions, so
    for fixed other layers a_l grows with layer l's. Its weakness is the converse of that
    assumption: neighbouring layers make correlated mistakes, and a block of redundant layers
    agreeing on the same wrong rows outweighs a lone correct one. Cheap (set intersections), and
    unlike `layer_quality` it needs no second seed.

    Args:
        selections: one list per layer (rows with a positive score, as the vote counts them).
        corpus_size: N, the rows the lists were drawn from (for the chance level).

    Returns:
        layer -> agreement in [-1, 1]; 0 for a lone layer or an empty list.
    """
    if corpus_size < 1:
        raise RetrievalInputError(f"corpus_size must be >= 1, got {corpus_size}")
    sets = {s.layer: set(np.asarray(s.rows).tolist()) for s in selections}
    out: dict[int, float] = {}
    for layer, rows in sets.items():
        others = [k for k in sets if k != layer]
        if not rows or not others:
            out[layer] = 0.0
            continue
        out[layer] = float(
            np.mean([len(rows & sets[k]) / len(rows) - len(sets[k]) / corpus_size for k in others])
        )
    return out


def agreement_weights(selections: Sequence[LayerSelection], corpus_size: int) -> dict[int, float]:
    """Vote weights from `layer_agreement`: max(agreement, 0), scaled to mean 1 (all 1 without evidence).

    Args: as `layer_agreement`.

    Returns:
        layer -> weight >= 0.
    """
    return _mean_one(layer_agreement(selections, corpus_size))
