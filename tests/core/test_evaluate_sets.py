"""Bootstrap intervals, chat-formatted perplexity, the contamination check and the evaluation split,
each against a brute-force or hand-computed reference."""

from __future__ import annotations

import itertools
import math
import random

import numpy as np
import pytest
import torch

from finescope_core.data import Record
from finescope_core.evaluate import (
    chat_nll,
    check_contamination,
    internal_duplicates,
    mean_interval,
    overlap,
    perplexity,
    perplexity_interval,
    text_nll,
)
from finescope_core.evaluate.contamination import NGRAM, ngrams, words
from finescope_core.evaluate.split import evaluation_split, nearest_to_centroid, split_position
from finescope_core.prompts import encode_prompt
from finescope_core.tiny import byte_tokenizer, tiny_model

# ------------------------------------------------------------------------------------------ bootstrap


def test_interval_of_constant_data_is_the_exact_value() -> None:
    ci = mean_interval([1.0] * 30, resamples=200, seed=0)
    assert (ci.value, ci.low, ci.high, ci.n) == (1.0, 1.0, 1.0, 30)
    ppl = perplexity_interval([2.0] * 10, [2] * 10, resamples=200, seed=0)
    assert (
        ppl.low == pytest.approx(math.e)
        and ppl.high == pytest.approx(math.e)
        and ppl.value == pytest.approx(math.e)
    )


def test_interval_matches_a_brute_force_bootstrap_and_contains_the_estimate() -> None:
    rng = random.Random(3)
    hits = [rng.random() < 0.4 for _ in range(40)]
    ci = mean_interval([float(h) for h in hits], resamples=500, seed=7)
    # Brute force: the same resamples drawn one by one, the 2.5 / 97.5 percentiles of their means.
    idx = np.random.default_rng(7).integers(0, len(hits), size=(500, len(hits)))
    means = sorted(float(np.mean([hits[i] for i in row])) for row in idx)
    assert ci.low == pytest.approx(np.percentile(means, 2.5)) and ci.high == pytest.approx(
        np.percentile(means, 97.5)
    )
    assert ci.low <= ci.value <= ci.high and ci.value == pytest.approx(sum(hits) / len(hits))


def test_perplexity_interval_resamples_items_and_recomputes_the_token_weighted_mean() -> None:
    nll, tokens = [3.0, 10.0, 1.0, 7.5], [2, 5, 1, 3]
    ci = perplexity_interval(nll, tokens, resamples=300, seed=1)
    assert ci.value == pytest.approx(math.exp(sum(nll) / sum(tokens)))
    idx = np.random.default_rng(1).integers(0, 4, size=(300, 4))
    stats = [math.exp(sum(nll[i] for i in row) / sum(tokens[i] for i in row)) for row in idx]
    assert ci.low == pytest.approx(np.percentile(stats, 2.5)) and ci.high == pytest.approx(
        np.percentile(stats, 97.5)
    )


def test_interval_shrinks_with_n() -> None:
    rng = np.random.default_rng(0)
    small = mean_interval(list(rng.random(20)), resamples=1000, seed=0)
    large = mean_interval(list(rng.random(2000)), resamples=1000, seed=0)
    assert large.high - large.low < (small.high - small.low) / 4


def test_overlap() -> None:
    a, b = mean_interval([0.0, 1.0], resamples=100, seed=0), mean_interval([5.0, 6.0], resamples=100, seed=0)
    assert not overlap(a, b) and overlap(a, a)


# --------------------------------------------------------------------------- chat-formatted perplexity


def test_chat_perplexity_equals_exp_mean_nll_from_the_logits_by_hand() -> None:
    model, tok = tiny_model(), byte_tokenizer()
    pairs = [
        ("What is 2 + 2?", "It is 4."),
        ("Name a colour.", "Blue, mostly."),
        ("Hi", "Hello there, friend."),
    ]
    nll, counts = chat_nll(model, tok, pairs, max_length=64, batch_size=2)
    total = scored = 0.0
    for (prompt, reference), item_nll, item_count in zip(pairs, nll, counts, strict=True):
        p = encode_prompt(tok, prompt)
        r = list(tok(reference, add_special_tokens=False)["input_ids"]) + [tok.eos_token_id]
        ids = p + r
        with torch.no_grad():
            logp = torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0].double(), dim=-1)
        # The response tokens (and EOS) are predicted from the position before each of them.
        by_hand = -sum(float(logp[t - 1, ids[t]]) for t in range(len(p), len(ids)))
        assert item_count == len(r)
        assert item_nll == pytest.approx(by_hand, rel=1e-4)
        total, scored = total + by_hand, scored + len(r)
    ci = perplexity_interval(nll, counts, resamples=100, seed=0)
    assert ci.value == pytest.approx(math.exp(total / scored), rel=1e-4)


def test_text_nll_sums_to_the_raw_text_perplexity() -> None:
    model, tok = tiny_model(), byte_tokenizer()
    texts = ["Janet has 16 eggs.", "2 + 2 = 4", "The quick brown fox jumps."]
    nll, counts = text_nll(model, tok, texts, max_length=32, batch_size=2)
    assert math.exp(sum(nll) / sum(counts)) == pytest.approx(
        perplexity(model, tok, texts, max_length=32), rel=1e-5
    )


# ----------------------------------------------------------------------------------- contamination


def _brute_force_ngram(item: str, reference: list[str]) -> bool:
    toks = words(item)
    grams = {tuple(toks[i : i + NGRAM]) for i in range(len(toks) - NGRAM + 1)}
    for ref in reference:
        r = words(ref)
        if any(tuple(r[i : i + NGRAM]) in grams for i in range(len(r) - NGRAM + 1)):
            return True
    return False


def _jaccard(a: str, b: str) -> float:
    sa, sb = ngrams(words(a), 5) or {tuple(words(a))}, ngrams(words(b), 5) or {tuple(words(b))}
    return len(sa & sb) / len(sa | sb)


def test_ngram_overlap_matches_brute_force_and_near_duplicates_are_caught() -> None:
    rng = random.Random(0)
    vocab = [f"w{i}" for i in range(300)]
    reference = [" ".join(rng.choice(vocab) for _ in range(60)) for _ in range(30)]
    items = [" ".join(rng.choice(vocab) for _ in range(40)) for _ in range(30)]
    # Planted: a 13-word run of a reference text inside fresh words, with other case and punctuation.
    run = reference[4].split()[10 : 10 + NGRAM]
    items[3] = "Fresh start, " + " ".join(w.upper() for w in run) + "; and a fresh ending here"
    # A 12-word run is no 13-gram overlap.
    items[5] = "x " + " ".join(reference[7].split()[:12]) + " y"
    # Near duplicates without any shared 13-gram (short texts): a re-punctuated copy, and a copy
    # with a word added.
    reference.append("solve for x in two x plus three equals seven")
    items[7] = "Solve for x in: two x plus three equals seven."
    reference.append("alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu")
    items[8] = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu"
    assert _jaccard(items[8], reference[-1]) == pytest.approx(8 / 9)
    found = check_contamination(items, reference)
    brute = [i for i, item in enumerate(items) if _brute_force_ngram(item, reference)]
    assert found.ngram == brute == [3]
    assert (
        7 in found.near_duplicate and 8 in found.near_duplicate and _jaccard(items[7], reference[-2]) == 1.0
    )
    assert 5 in found.kept
    # Every other item is clean by brute force (no 13-gram, Jaccard far below the threshold).
    for i in found.kept:
        assert (
            not _brute_force_ngram(items[i], reference)
            and max(_jaccard(items[i], r) for r in reference) < 0.5
        )
    assert found.summary() == {"checked": 30, "kept": 27, "dropped_ngram": 1, "dropped_near_duplicate": 2}


def test_internal_duplicates_count_exact_and_near_copies() -> None:
    base = "the cat sat on the mat while the dog slept by the door all day long"
    near = base.replace("long", "longer")
    texts = [base, base.upper() + "!", near, "something else entirely different words here"]
    assert internal_duplicates(texts) == {"exact": 1, "near": 1}
    assert _jaccard(base, near) >= 0.8


# --------------------------------------------------------------------------------------------- split


def _records(n: int) -> list[Record]:
    return [
        Record(
            id=f"r{i}",
            text=f"text {i}",
            fields={"id": f"r{i}", "text": f"text {i}"},
            origin=f"c.jsonl:{i + 1}",
        )
        for i in range(n)
    ]


def test_split_is_a_seeded_hash_of_the_id_and_ignores_order() -> None:
    records = _records(2000)
    split = evaluation_split(records, 0.1, 10_000, seed=0)
    assert {r.id for r in split} == {r.id for r in records if split_position(r.id, 0) < 0.1}
    assert 150 < len(split) < 250
    assert {r.id for r in evaluation_split(records[::-1], 0.1, 10_000, seed=0)} == {r.id for r in split}
    assert {r.id for r in evaluation_split(records, 0.1, 10_000, seed=1)} != {r.id for r in split}
    capped = evaluation_split(records, 0.1, 20, seed=0, exclude={"r1", "r2"})
    lowest = sorted((split_position(r.id, 0), r.id) for r in records if r.id not in {"r1", "r2"})[:20]
    assert [r.id for r in capped] == [rid for _, rid in sorted(lowest, key=lambda t: int(t[1][1:]))]


def test_nearest_to_centroid_by_brute_force() -> None:
    rng = np.random.default_rng(0)
    items, seeds = rng.normal(size=(50, 8)), rng.normal(size=(3, 8))
    centroid = (seeds / np.linalg.norm(seeds, axis=1, keepdims=True)).mean(axis=0)
    cos = [float(v @ centroid / np.linalg.norm(v) / np.linalg.norm(centroid)) for v in items]
    assert nearest_to_centroid(items, seeds, 5) == sorted(range(50), key=lambda i: -cos[i])[:5]
    assert list(itertools.islice(nearest_to_centroid(items, seeds, 100), 3)) == nearest_to_centroid(
        items, seeds, 3
    )
