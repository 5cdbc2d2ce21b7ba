"""The recovery pool: which training-pool records the distillation phase reads, in which order.

Pure: the caller passes the training pool (the corpus less the evaluation split and the seed copies)
and each record's curation score; nothing here can reach a record outside it.
"""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from finescope_core.data import Record


@dataclass(frozen=True)
class PoolDraw:
    """The drawn records in the order the phase reads them, and which of them are general ones."""

    records: list[Record]
    """Nearest first, with the general records spread evenly among them."""
    general: frozenset[str]
    """Ids of the records drawn at random from the rest of the pool (the general share)."""

    @property
    def ids(self) -> list[str]:
        return [r.id for r in self.records]


def draw_pool(
    pool: Sequence[Record],
    scores: Mapping[str, float],
    size: int | None,
    general_share: float,
    seed: int,
) -> PoolDraw:
    """The curated variant's pool: the `size` records (None: all) nearest to the seeds by `scores`
    (higher is nearer; a record without a score ranks last; ties in seeded random order), of which
    `general_share` drawn at random from the records left outside the nearest ones.

    The general records are interleaved evenly, so any prefix the token budget reads holds about the
    same share of them.
    """
    total = len(pool) if size is None else min(size, len(pool))
    n_general = round(total * general_share)
    rng = random.Random(seed)
    shuffled = list(pool)
    rng.shuffle(shuffled)  # ties broken at random, not by corpus order
    ranked = sorted(shuffled, key=lambda r: -scores.get(r.id, float("-inf")))
    nearest = ranked[: total - n_general]
    rest = ranked[total - n_general :]
    general = rng.sample(rest, min(n_general, len(rest)))
    return PoolDraw(_interleave(nearest, general), frozenset(r.id for r in general))


def draw_random(pool: Sequence[Record], size: int | None, seed: int) -> PoolDraw:
    """The `random` twin's pool: `size` records (None: all) of the training pool in seeded random order,
    so that curated-versus-random compares curation alone."""
    total = len(pool) if size is None else min(size, len(pool))
    return PoolDraw(random.Random(seed).sample(list(pool), total), frozenset())


def _interleave(nearest: list[Record], general: list[Record]) -> list[Record]:
    """`nearest` in order with `general` spread evenly: after i records, floor(i * share) are general (so
    each block of 1 / share records starts with its nearest ones)."""
    total = len(nearest) + len(general)
    out: list[Record] = []
    near, gen = iter(nearest), iter(general)
    taken = 0
    for i in range(total):
        if taken < (i + 1) * len(general) // total:
            out.append(next(gen))
            taken += 1
        else:
            out.append(next(near))
    return out
