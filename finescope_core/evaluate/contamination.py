"""Contamination check: evaluation items that overlap the training data are dropped before scoring.

Two tests, on normalised word tokens (case-folded `\\w+` runs):

* **13-gram overlap**: the item shares any run of `NGRAM` consecutive words with a training text
  (the GPT-3 / lm-evaluation-harness decontamination rule);
* **near duplicate**: the MinHash estimate (datasketch, `NUM_PERM` permutations, seeded) of the
  Jaccard similarity of their word `SHINGLE`-gram sets reaches `NEAR_DUPLICATE` (found through an
  LSH index, then confirmed on the estimate). It catches short items (fewer than 13 words) and
  light edits that break every 13-gram.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from datasketch import MinHash, MinHashLSH

NGRAM = 13
"""Words per n-gram of the overlap test."""
SHINGLE = 5
"""Words per shingle of the MinHash sets (texts shorter than this are one shingle)."""
NEAR_DUPLICATE = 0.8
"""MinHash Jaccard estimate at or above which two texts are near duplicates."""
NUM_PERM = 128
"""MinHash permutations."""
MINHASH_SEED = 1
"""Seed of the MinHash permutations (fixed: the check must not depend on the run seed)."""

_WORD = re.compile(r"\w+")


def words(text: str) -> list[str]:
    """Normalised word tokens: case-folded runs of word characters (punctuation and spacing ignored)."""
    return _WORD.findall(text.casefold())


def ngrams(tokens: Sequence[str], n: int) -> set[tuple[str, ...]]:
    """Every run of `n` consecutive tokens (none when there are fewer than `n`)."""
    return {tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1)}


def shingles(tokens: Sequence[str]) -> set[tuple[str, ...]]:
    """The MinHash set of a text: its word `SHINGLE`-grams, or the whole text when shorter."""
    return ngrams(tokens, SHINGLE) if len(tokens) >= SHINGLE else ({tuple(tokens)} if tokens else set())


def minhash(tokens: Sequence[str]) -> MinHash:
    m = MinHash(num_perm=NUM_PERM, seed=MINHASH_SEED)
    m.update_batch([" ".join(s).encode() for s in shingles(tokens)])
    return m


@dataclass
class Contamination:
    """Which evaluation items overlap the reference texts, and why."""

    kept: list[int] = field(default_factory=list)
    """Indices of the clean items, in order."""
    ngram: list[int] = field(default_factory=list)
    """Items sharing a 13-gram with a reference text."""
    near_duplicate: list[int] = field(default_factory=list)
    """Items without a shared 13-gram that are MinHash near duplicates of a reference text."""

    @property
    def dropped(self) -> int:
        return len(self.ngram) + len(self.near_duplicate)

    def summary(self) -> dict[str, int]:
        return {
            "checked": len(self.kept) + self.dropped,
            "kept": len(self.kept),
            "dropped_ngram": len(self.ngram),
            "dropped_near_duplicate": len(self.near_duplicate),
        }


class _Index:
    """13-grams and a MinHash LSH index of a set of reference texts."""

    def __init__(self, texts: Iterable[str]):
        self.grams: set[tuple[str, ...]] = set()
        self.lsh = MinHashLSH(threshold=NEAR_DUPLICATE, num_perm=NUM_PERM)
        self.hashes: dict[str, MinHash] = {}
        seen: set[tuple[str, ...]] = set()
        for i, text in enumerate(texts):
            tokens = words(text)
            if not tokens or tuple(tokens) in seen:
                continue
            seen.add(tuple(tokens))
            self.grams |= ngrams(tokens, NGRAM)
            m = minhash(tokens)
            self.hashes[str(i)] = m
            self.lsh.insert(str(i), m)

    def near(self, m: MinHash) -> bool:
        return any(self.hashes[k].jaccard(m) >= NEAR_DUPLICATE for k in self.lsh.query(m))


def check_contamination(items: Sequence[str], reference: Iterable[str]) -> Contamination:
    """Split evaluation `items` into clean ones and those overlapping any `reference` text.

    Args:
        items: the evaluation texts.
        reference: the training-side texts (curated, pruning, distilled, tuning data).

    Returns:
        The kept indices and the dropped ones by reason (a 13-gram first, else a near duplicate).
    """
    index = _Index(reference)
    out = Contamination()
    for i, text in enumerate(items):
        tokens = words(text)
        if index.grams and not ngrams(tokens, NGRAM).isdisjoint(index.grams):
            out.ngram.append(i)
        elif tokens and index.near(minhash(tokens)):
            out.near_duplicate.append(i)
        else:
            out.kept.append(i)
    return out


def internal_duplicates(texts: Sequence[str]) -> dict[str, int]:
    """Duplicates within one set of texts: `exact` (same normalised words as an earlier text) and
    `near` (a MinHash near duplicate of an earlier text, not exact)."""
    lsh = MinHashLSH(threshold=NEAR_DUPLICATE, num_perm=NUM_PERM)
    hashes: dict[str, MinHash] = {}
    seen: set[tuple[str, ...]] = set()
    exact = near = 0
    for i, text in enumerate(texts):
        tokens = tuple(words(text))
        if tokens in seen:
            exact += 1
            continue
        seen.add(tokens)
        m = minhash(tokens)
        if any(hashes[k].jaccard(m) >= NEAR_DUPLICATE for k in lsh.query(m)):
            near += 1
        hashes[str(i)] = m
        lsh.insert(str(i), m)
    return {"exact": exact, "near": near}
