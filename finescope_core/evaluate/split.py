"""The evaluation split and the evaluation items drawn from it, by rules that ignore the curation method.

* **Split**: a corpus record belongs to it when a seeded hash of its id falls below
  `evaluate.split_fraction` (the `evaluate.split_max` lowest hashes at most); copies of seeds never
  do. The split is set aside before curation and never reaches curation, pruning, the teacher,
  tuning or the baselines.
* **Domain items** (without `evaluate.eval_file`): the `evaluate.domain_items` split records whose
  all-MiniLM-L6-v2 embedding is nearest (cosine) the centroid of the seeds' embeddings.
* **General items** (without `evaluate.general_file`): a seeded sample of at most
  `evaluate.general_items` of the other split records.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field

import numpy as np

from finescope_core.data import Record, normalise_text

DOMAIN_RULE = (
    "the {n} evaluation-split records nearest the seeds' centroid (cosine, all-MiniLM-L6-v2 embeddings)"
)
"""How the report states the domain-item rule when there is no eval file."""
GENERAL_RULE = "a seeded sample of {n} evaluation-split records that are not domain items"


def split_position(record_id: str, seed: int) -> float:
    """Where a record id falls in [0, 1) under the run seed (uniform, stable, order-free)."""
    digest = hashlib.sha256(f"evaluation-split:{seed}:{record_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def evaluation_split(
    records: Sequence[Record], fraction: float, cap: int, seed: int, exclude: Collection[str] = ()
) -> list[Record]:
    """The split records in corpus order: hash below `fraction`, the `cap` lowest hashes at most.

    Args:
        exclude: ids that never join the split (copies of seeds).
    """
    skip = set(exclude)
    positions = {r.id: split_position(r.id, seed) for r in records if r.id not in skip}
    chosen = sorted((p, rid) for rid, p in positions.items() if p < fraction)[:cap]
    ids = {rid for _, rid in chosen}
    return [r for r in records if r.id in ids]


@dataclass
class EvalItem:
    """One evaluation item: the text raw perplexity reads, and the request / reference when it has them."""

    id: str
    text: str
    origin: str
    prompt: str | None = None
    reference: str | None = None

    @classmethod
    def of(cls, record: Record) -> EvalItem:
        return cls(record.id, record.text, record.origin, record.prompt or None, record.reference)


def nearest_to_centroid(item_emb: np.ndarray, seed_emb: np.ndarray, n: int) -> list[int]:
    """Rows of `item_emb` nearest (cosine) the mean of the unit-normalised `seed_emb`, best first (ties
    by row)."""
    seeds = seed_emb / np.maximum(np.linalg.norm(seed_emb, axis=1, keepdims=True), 1e-12)
    centroid = seeds.mean(axis=0)
    centroid = centroid / max(float(np.linalg.norm(centroid)), 1e-12)
    items = item_emb / np.maximum(np.linalg.norm(item_emb, axis=1, keepdims=True), 1e-12)
    scores = items @ centroid
    return sorted(range(len(scores)), key=lambda i: (-float(scores[i]), i))[:n]


def general_sample(records: Sequence[Record], n: int, seed: int) -> list[Record]:
    """A seeded sample of at most `n` records, in their order."""
    picked = sorted(random.Random(seed).sample(range(len(records)), min(n, len(records))))
    return [records[i] for i in picked]


@dataclass
class Holdout:
    """What is kept out of the curation pool for evaluation, by corpus id."""

    split: list[str] = field(default_factory=list)
    """Ids of the evaluation split."""
    file_duplicates: list[str] = field(default_factory=list)
    """Ids of corpus records that overlap an item of an evaluation file (`eval_file`, `general_file`,
    `mc_file`, `numeric_file`) or an lm-eval task document (13-gram or near duplicate)."""
    duplicates_by_kind: dict[str, int] = field(default_factory=dict)
    """Item kind -> how many of `file_duplicates` overlap that kind's items."""

    @property
    def excluded(self) -> list[str]:
        """Every id kept out of curation, pruning, teacher, tuning and the baselines (sorted)."""
        return sorted(set(self.split) | set(self.file_duplicates))

    def sha256(self) -> str:
        return hashlib.sha256("\n".join(self.excluded).encode()).hexdigest()


def exact_duplicates(records: Sequence[Record], texts: Sequence[str]) -> list[str]:
    """Ids of records whose normalised text equals one of `texts`."""
    keys = {normalise_text(t) for t in texts}
    return [r.id for r in records if normalise_text(r.text) in keys]
