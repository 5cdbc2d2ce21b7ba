"""The vote across layers (paper eq. 13): rows chosen by more layers rank first.

Each layer's top-M list is one ballot; a row's votes are the number of layers that chose it (or the
sum of their weights, see `weights`), ties broken by the mean score over those layers, then by a
per-row priority (`scores.tie_priority`: a seeded hash of the record id, so the order does not
depend on where a record sits in the corpus), then by the lower row index. A pick with a score of 0
or less is no vote: a row whose code is all zero (or points away from every seed) resembles no
seed in that layer, and such rows would otherwise fill a short list in row order.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from finescope_core.retrieval.scores import RetrievalInputError


@dataclass
class LayerSelection:
    """One layer's top-M choice (eq. 13).

    Attributes:
        layer: decoder layer index the codes came from.
        rows: [M] corpus row indices, best first.
        scores: [M] their max-over-seeds cosine in that layer's code space.
    """

    layer: int
    rows: np.ndarray
    scores: np.ndarray


@dataclass
class VotedRecord:
    """A corpus row after the vote across layers.

    Attributes:
        row: corpus row index.
        votes: number of layers that selected it, or the sum of their weights.
        mean_score: mean score over the layers that selected it (unweighted).
        layers: the layers that selected it, ascending.
    """

    row: int
    votes: float
    mean_score: float
    layers: list[int] = field(default_factory=list)


def _check_selection(sel: LayerSelection) -> None:
    rows, scores = np.asarray(sel.rows), np.asarray(sel.scores)
    if rows.ndim != 1 or rows.shape != scores.shape:
        raise RetrievalInputError(
            f"layer {sel.layer}: rows and scores must be 1-D of equal length, got {rows.shape} and "
            f"{scores.shape}"
        )
    if not np.isfinite(scores).all():
        raise RetrievalInputError(f"layer {sel.layer}: scores must be finite (NaN/inf cannot be ordered)")
    if np.unique(rows).size != rows.size:
        raise RetrievalInputError(f"layer {sel.layer}: a row is selected more than once")


def _checked_weights(layers: list[int], weights: dict[int, float] | None) -> dict[int, float]:
    if weights is None:
        return dict.fromkeys(layers, 1.0)
    missing = sorted(set(layers) - set(weights))
    if missing:
        raise RetrievalInputError(
            f"weights has no entry for layer(s) {missing}; give one weight per voting layer"
        )
    bad = {
        layer: weights[layer] for layer in layers if not (np.isfinite(weights[layer]) and weights[layer] >= 0)
    }
    if bad:
        raise RetrievalInputError(f"weights must be finite and >= 0, got {bad}")
    return {layer: float(weights[layer]) for layer in layers}


def vote(
    selections: list[LayerSelection],
    final_size: int,
    *,
    weights: dict[int, float] | None = None,
    priority: np.ndarray | None = None,
) -> list[VotedRecord]:
    """Aggregate per-layer selections: order rows by (votes desc, mean score desc, priority asc, row asc).

    Args:
        selections: one `LayerSelection` per layer (each layer at most once).
        final_size: records to return. Fewer come back when the union of the layers' rows with a
            positive score is smaller than `final_size` (the vote never invents rows).
        weights: optional layer -> weight >= 0 (e.g. from `layer_weights`); a row's votes are then
            the sum of the weights of the layers that selected it instead of their count.
        priority: optional integer array indexed by row (`scores.tie_priority` of the record ids);
            None: ties go to the lower row.

    Returns:
        Up to `final_size` `VotedRecord`s, best first.
    """
    if final_size < 1:
        raise RetrievalInputError(f"final_size must be >= 1, got {final_size}")
    layers = [s.layer for s in selections]
    if len(set(layers)) != len(layers):
        raise RetrievalInputError(f"each layer may vote once; got layers {layers}")
    w = _checked_weights(layers, weights)
    hits: dict[int, list[tuple[int, float]]] = {}
    for sel in sorted(selections, key=lambda s: s.layer):
        _check_selection(sel)
        for row, score in zip(np.asarray(sel.rows).tolist(), np.asarray(sel.scores).tolist(), strict=True):
            if score > 0:
                hits.setdefault(int(row), []).append((sel.layer, float(score)))
    if priority is not None and hits and max(hits) >= len(priority):
        raise RetrievalInputError(f"priority has {len(priority)} entries but row {max(hits)} was selected")
    records = [
        VotedRecord(
            row=row,
            votes=float(sum(w[layer] for layer, _ in picks)),  # summed in layer order: deterministic
            mean_score=float(np.mean([score for _, score in picks])),
            layers=[layer for layer, _ in picks],
        )
        for row, picks in hits.items()
    ]
    if priority is None:
        records.sort(key=lambda r: (-r.votes, -r.mean_score, r.row))
    else:
        records.sort(key=lambda r: (-r.votes, -r.mean_score, int(priority[r.row]), r.row))
    return records[:final_size]
