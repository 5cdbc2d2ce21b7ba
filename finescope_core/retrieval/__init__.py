"""Retrieval (paper eq. 12-13): the top-M corpus rows by max-over-seeds cosine per layer, and the vote
across layers.

- `search`: the exact top-M (FAISS, certified against rounding and ties) and its brute-force reference;
- `scores`: the canonical score (and how seed cosines are pooled into it) and input checks both share;
- `vote`: per-layer selections aggregated into one ranking;
- `fusion`: reciprocal-rank fusion of several rankings (`curate.fusion: sentence`);
- `weights`: optional unsupervised per-layer vote weights (`curate.layer_weighting: quality|agreement`).
"""

from finescope_core.retrieval.fusion import reciprocal_rank_fusion
from finescope_core.retrieval.scores import Matrix, RetrievalInputError, SeedPooling, tie_priority
from finescope_core.retrieval.search import brute_force_topm, topm_max_over_seeds
from finescope_core.retrieval.vote import LayerSelection, VotedRecord, vote
from finescope_core.retrieval.weights import agreement_weights, layer_agreement, layer_quality, layer_weights

__all__ = [
    "LayerSelection",
    "Matrix",
    "RetrievalInputError",
    "SeedPooling",
    "VotedRecord",
    "agreement_weights",
    "brute_force_topm",
    "layer_agreement",
    "layer_quality",
    "layer_weights",
    "reciprocal_rank_fusion",
    "tie_priority",
    "topm_max_over_seeds",
    "vote",
]
