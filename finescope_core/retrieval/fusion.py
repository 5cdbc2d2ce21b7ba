"""Reciprocal-rank fusion (Cormack et al. 2009) of several rankings of the same corpus rows.

score(x) = sum over rankings r containing x of 1 / (k + rank_r(x)), ranks from 1; a row absent from
a ranking gets nothing from it. Only ranks are used, so rankings whose scores live on different
scales (SAE-code cosines, sentence-embedding cosines) combine without calibration.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from finescope_core.retrieval.scores import RetrievalInputError


def reciprocal_rank_fusion(
    rankings: Sequence[Sequence[int]], final_size: int, *, k: int = 60, priority: np.ndarray | None = None
) -> list[tuple[int, float, int]]:
    """Fuse rankings of corpus rows (best first) into one.

    Args:
        rankings: each a sequence of distinct row indices, best first.
        final_size: rows to return (fewer when the union is smaller).
        k: the RRF constant; larger flattens the advantage of the very top ranks (60 is the usual).
        priority: optional per-row tie-break key (`scores.tie_priority`); ties go to the lower one,
            then to the lower row.

    Returns:
        Up to `final_size` (row, fused score, number of rankings that hold the row), best first.
    """
    if final_size < 1 or k < 0:
        raise RetrievalInputError(f"need final_size >= 1 and k >= 0, got {final_size} and {k}")
    fused: dict[int, float] = {}
    count: dict[int, int] = {}
    for ranking in rankings:
        rows = [int(r) for r in ranking]
        if len(set(rows)) != len(rows):
            raise RetrievalInputError("a ranking holds a row more than once")
        for rank, row in enumerate(rows, start=1):
            fused[row] = fused.get(row, 0.0) + 1.0 / (k + rank)
            count[row] = count.get(row, 0) + 1
    if priority is None:
        order = sorted(fused, key=lambda r: (-fused[r], r))
    else:
        order = sorted(fused, key=lambda r: (-fused[r], int(priority[r]), r))
    return [(row, fused[row], count[row]) for row in order[:final_size]]
