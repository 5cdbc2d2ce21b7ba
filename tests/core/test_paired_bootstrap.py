"""Paired comparisons between models on the same items: the paired bootstrap equals a brute-force loop
over the same resampled indices, finds differences that separate intervals miss, is exactly 1 / 0 for
identical models, refuses mismatched items; the evaluate stage's per-item numbers reproduce its metrics;
metrics.json's `comparisons` section is schema-checked and reported."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from finescope_core.config import EvalConfig
from finescope_core.evaluate import (
    Interval,
    comparisons,
    evaluate_model,
    excludes,
    items_document,
    mean_interval,
    metrics_schema_errors,
    overlap,
    paired_mean_difference,
    paired_perplexity_ratio,
    perplexity_interval,
    task_samples,
)
from finescope_core.evaluate.bootstrap import CONFIDENCE
from finescope_core.evaluate.paired import comparison_pairs
from finescope_core.report import paired_lines, paired_rows
from finescope_core.report.sections import evaluation_body
from finescope_core.tiny import byte_tokenizer, tiny_model

# ------------------------------------------------------------------------------------ brute force


def _indices(n: int, resamples: int, seed: int) -> list[list[int]]:
    """The documented draw: numpy's default_rng(seed), [resamples, n] indices with replacement."""
    return np.random.default_rng(seed).integers(0, n, size=(resamples, n)).tolist()


def _percentile_interval(stats: list[float], value: float, n: int) -> Interval:
    tail = (1 - CONFIDENCE) / 2 * 100
    low, high = (float(x) for x in np.percentile(stats, [tail, 100 - tail]))
    return Interval(value, min(low, value), max(high, value), n)


def _brute_ratio(nll_a, tok_a, nll_b, tok_b, *, resamples, seed) -> Interval:
    stats = []
    for row in _indices(len(nll_a), resamples, seed):
        # the SAME items for both models
        sa, ta = sum(nll_a[i] for i in row), sum(tok_a[i] for i in row)
        sb, tb = sum(nll_b[i] for i in row), sum(tok_b[i] for i in row)
        if ta > 0 and tb > 0:
            stats.append(math.exp(sa / ta) / math.exp(sb / tb))
    value = math.exp(sum(nll_a) / sum(tok_a)) / math.exp(sum(nll_b) / sum(tok_b))
    return _percentile_interval(stats, value, len(nll_a))


def _brute_difference(a, b, *, resamples, seed) -> Interval:
    stats = [
        sum(a[i] for i in row) / len(row) - sum(b[i] for i in row) / len(row)
        for row in _indices(len(a), resamples, seed)
    ]
    return _percentile_interval(stats, sum(a) / len(a) - sum(b) / len(b), len(a))


def _close(got: Interval, want: Interval) -> None:
    assert got.n == want.n
    for field in ("value", "low", "high"):
        assert getattr(got, field) == pytest.approx(getattr(want, field), rel=1e-12, abs=1e-12), field


@pytest.mark.parametrize("seed", [0, 1, 7])
def test_paired_ratio_equals_a_brute_force_loop_over_the_same_indices(seed: int) -> None:
    rng = np.random.default_rng(100 + seed)
    n = 23
    tok_a = rng.integers(0, 12, size=n).tolist()
    tok_a[0] = 0  # an item with no predicted token weighs nothing
    tok_b = [t + int(rng.integers(0, 2)) for t in tok_a]  # token counts may differ between models
    nll_a = [float(t * rng.uniform(1.0, 3.0)) for t in tok_a]
    nll_b = [float(t * rng.uniform(1.0, 3.0)) for t in tok_b]
    got = paired_perplexity_ratio(nll_a, tok_a, nll_b, tok_b, resamples=300, seed=seed)
    _close(got, _brute_ratio(nll_a, tok_a, nll_b, tok_b, resamples=300, seed=seed))


@pytest.mark.parametrize("seed", [0, 3])
def test_paired_difference_equals_a_brute_force_loop_over_the_same_indices(seed: int) -> None:
    rng = np.random.default_rng(seed)
    a = rng.integers(0, 2, size=31).tolist()
    b = rng.integers(0, 2, size=31).tolist()
    got = paired_mean_difference(a, b, resamples=250, seed=seed)
    _close(got, _brute_difference(a, b, resamples=250, seed=seed))


def test_paired_intervals_find_a_consistent_shift_that_separate_intervals_miss() -> None:
    rng = np.random.default_rng(0)
    n = 60
    # Perplexity: items differ a lot in difficulty (NLL per token 1..4); B is a little worse on every item.
    tokens = rng.integers(5, 40, size=n).tolist()
    per_token = rng.uniform(1.0, 4.0, size=n)
    nll_a = (per_token * tokens).tolist()
    nll_b = ((per_token + 0.05) * tokens).tolist()
    sep_a = perplexity_interval(nll_a, tokens, resamples=1000, seed=0)
    sep_b = perplexity_interval(nll_b, tokens, resamples=1000, seed=0)
    assert overlap(sep_a, sep_b)  # separately: not clear
    ratio = paired_perplexity_ratio(nll_a, tokens, nll_b, tokens, resamples=1000, seed=0)
    assert ratio.high < 1 and excludes(ratio, 1.0)  # paired: A clearly lower
    assert ratio.value == pytest.approx(sep_a.value / sep_b.value, rel=1e-12)

    # Accuracy: A gets right every item B gets right, and 6 more of 60.
    b = [1] * 25 + [0] * 35
    a = [1] * 31 + [0] * 29
    assert overlap(mean_interval(a, resamples=1000, seed=0), mean_interval(b, resamples=1000, seed=0))
    diff = paired_mean_difference(a, b, resamples=1000, seed=0)
    assert diff.low > 0 and excludes(diff, 0.0)
    assert diff.value == pytest.approx(0.1)


def test_identical_models_give_exactly_ratio_one_and_difference_zero() -> None:
    nll, tokens = [3.5, 7.25, 0.0, 12.0], [2, 5, 0, 9]
    ratio = paired_perplexity_ratio(nll, tokens, list(nll), list(tokens), resamples=200, seed=0)
    assert ratio == Interval(1.0, 1.0, 1.0, 4) and not excludes(ratio, 1.0)
    hits = [1, 0, 1, 1, 0]
    diff = paired_mean_difference(hits, list(hits), resamples=200, seed=0)
    assert diff == Interval(0.0, 0.0, 0.0, 5) and not excludes(diff, 0.0)


def test_paired_functions_refuse_mismatched_or_empty_items() -> None:
    with pytest.raises(ValueError, match="model A has 3 items and model B 2"):
        paired_mean_difference([1, 0, 1], [1, 0], resamples=10, seed=0)
    with pytest.raises(ValueError, match="model A has 2 items and model B 3"):
        paired_perplexity_ratio([1.0, 2.0], [1, 1], [1.0, 2.0, 3.0], [1, 1, 1], resamples=10, seed=0)
    with pytest.raises(ValueError, match="model B has 2 NLLs but 1 token counts"):
        paired_perplexity_ratio([1.0, 2.0], [1, 1], [1.0, 2.0], [1], resamples=10, seed=0)
    with pytest.raises(ValueError, match="no items"):
        paired_mean_difference([], [], resamples=10, seed=0)
    with pytest.raises(ValueError, match="no predicted token"):
        paired_perplexity_ratio([0.0], [0], [1.0], [1], resamples=10, seed=0)
    with pytest.raises(ValueError, match="resamples=0"):
        paired_mean_difference([1], [0], resamples=0, seed=0)


# ------------------------------------------------------------------------- per-item numbers of a model

TEXTS = [
    "Janet has 16 eggs and eats 3 of them every morning.",
    "2 + 2 = 4",
    "ok",
    "The quick brown fox jumps over the lazy dog.",
    "How many bolts in total does it take?",
]
CHAT = [("What is 2 + 2?", "It is 4."), ("Name a colour.", "Blue."), ("Say hi", "hi")]
MC = [
    {"question": "What is 2 + 2?", "choices": ["3", "4", "five", "22"], "answer": 1},
    {"question": "Which gas do plants absorb?", "choices": ["oxygen", "carbon dioxide"], "answer": 1},
    {"question": "Pick one", "choices": ["a", "bb", "ccc"], "answer": 2},
]
NUMERIC = [{"question": "What is 2 + 2?", "answer": 4}, {"question": "3 + 3?", "answer": 6}]


def test_stored_per_item_numbers_reproduce_every_reported_metric_exactly() -> None:
    model, tok = tiny_model(), byte_tokenizer()
    cfg = EvalConfig(max_length=32, max_new_tokens=3, bootstrap_resamples=200)
    items: dict = {}
    metrics = evaluate_model(
        model,
        tok,
        domain_texts=TEXTS,
        chat_pairs=CHAT,
        general_texts=TEXTS[::-1],
        mc_items=MC,
        numeric_items=NUMERIC,
        cfg=cfg,
        seed=5,
        items=items,
    )
    assert (
        evaluate_model(
            model,
            tok,
            domain_texts=TEXTS,
            chat_pairs=CHAT,
            general_texts=TEXTS[::-1],
            mc_items=MC,
            numeric_items=NUMERIC,
            cfg=cfg,
            seed=5,
        )
        == metrics
    )
    # as the evaluate stage writes and the metrics document reads them
    doc = json.loads(json.dumps(items_document(items, seed=5, resamples=200)))
    stored = doc["metrics"]
    assert (
        set(stored)
        == set(metrics["ci"])
        == {
            "perplexity",
            "chat_perplexity",
            "general_perplexity",
            "mc_accuracy",
            "mc_accuracy_norm",
            "numeric_exact_match",
        }
    )
    for name, entry in stored.items():
        if "nll" in entry:
            again = perplexity_interval(
                entry["nll"], entry["tokens"], resamples=doc["resamples"], seed=doc["seed"]
            )
            plain = math.exp(sum(entry["nll"]) / sum(entry["tokens"]))
        else:
            again = mean_interval(entry["values"], resamples=doc["resamples"], seed=doc["seed"])
            plain = sum(entry["values"]) / len(entry["values"])
        assert again.to_dict() == metrics["ci"][name], name  # value, interval and n, bit for bit
        assert again.value == metrics[name]
        assert plain == pytest.approx(metrics[name], rel=1e-12)
    assert len(stored["perplexity"]["nll"]) == metrics["n"]["perplexity"] == len(TEXTS)
    assert len(stored["mc_accuracy"]["values"]) == metrics["n"]["mc"] == len(MC)


def test_task_samples_are_lm_evals_per_sample_values_by_doc_id() -> None:
    samples = [{"doc_id": i, "filter": "none", "acc": v} for i, v in ((2, 1.0), (0, 0.0), (1, True))]
    results = {
        "results": {"t": {"acc,none": 2 / 3, "acc_stderr,none": 0.3, "alias": "t"}},
        "samples": {"t": samples},
    }
    assert task_samples("t", results) == {"acc": {"doc_ids": [0, 1, 2], "values": [0.0, 1.0, 1.0]}}


# ------------------------------------------------------------------------- metrics.json comparisons

MODEL = {
    "perplexity": 5.0,
    "parameters": 10,
    "n": {"perplexity": 4},
    "ci": {"perplexity": {"value": 5.0, "low": 4.0, "high": 6.0, "n": 4}},
}


def _items(shift: float, hits: list[int], acc: list[float] | None = None) -> dict:
    per_token = [1.0, 2.5, 1.5, 3.0, 2.0, 2.2, 1.1, 2.9]
    tokens = [4, 9, 3, 12, 7, 5, 8, 6]
    doc = items_document(
        {
            "chat_perplexity": {
                "nll": [(p + shift) * t for p, t in zip(per_token, tokens, strict=True)],
                "tokens": tokens,
            },
            "mc_accuracy": {"values": hits},
        },
        seed=0,
        resamples=500,
        lm_eval={"tiny": {"acc": {"doc_ids": list(range(len(acc or []))), "values": acc or []}}}
        if acc
        else None,
    )
    return json.loads(json.dumps(doc))


def test_comparison_pairs_are_tuned_vs_all_and_every_other_model_vs_base() -> None:
    names = ["base", "pruned", "tuned", "pruned-random", "tuned-random", "tuned-corpus", "tuned-base_tuned"]
    assert comparison_pairs(names) == [
        ("tuned", "base"),
        ("tuned", "pruned"),
        ("tuned", "pruned-random"),
        ("tuned", "tuned-random"),
        ("tuned", "tuned-corpus"),
        ("tuned", "tuned-base_tuned"),
        ("tuned-random", "base"),
        ("tuned-corpus", "base"),
        ("tuned-base_tuned", "base"),
        ("pruned", "base"),
        ("pruned-random", "base"),
    ]


def test_comparisons_section_is_schema_checked_and_reported_for_a_baseline() -> None:
    items = {
        "base": _items(0.0, [1, 1, 1, 0, 1, 0, 1, 1], [1.0, 1.0, 0.0, 1.0]),
        "pruned": _items(1.0, [0, 0, 1, 0, 0, 0, 1, 0], [0.0, 1.0, 0.0, 0.0]),
        "tuned": _items(0.1, [1, 1, 1, 0, 1, 0, 1, 0], [1.0, 1.0, 0.0, 0.0]),
        "tuned-random": _items(0.3, [1, 1, 1, 0, 1, 0, 1, 0]),  # no lm-eval: nothing to pair there
    }
    found = comparisons(items)
    by = {(c["a"], c["b"], c["metric"]): c for c in found}
    assert set(by) == {
        *(
            (a, b, m)
            for a, b in [("tuned", "base"), ("tuned", "pruned")]
            for m in ("chat_perplexity", "mc_accuracy", "lm_eval:tiny:acc")
        ),
        ("tuned", "tuned-random", "chat_perplexity"),
        ("tuned", "tuned-random", "mc_accuracy"),
        ("tuned-random", "base", "chat_perplexity"),
        ("tuned-random", "base", "mc_accuracy"),
        *(("pruned", "base", m) for m in ("chat_perplexity", "mc_accuracy", "lm_eval:tiny:acc")),
    }
    vs_random = by[("tuned", "tuned-random", "chat_perplexity")]
    assert (
        vs_random["kind"] == "ratio"
        and vs_random["value"] < 1
        and vs_random["high"] < 1
        and vs_random["clear"]
    )
    same_hits = by[("tuned", "tuned-random", "mc_accuracy")]
    assert same_hits["kind"] == "difference" and (
        same_hits["value"],
        same_hits["low"],
        same_hits["high"],
    ) == (0, 0, 0)
    assert not same_hits["clear"]
    assert by[("tuned", "base", "lm_eval:tiny:acc")]["value"] == pytest.approx(-0.25)
    assert all(c["n"] == 8 for c in found if not c["metric"].startswith("lm_eval"))

    models = {name: MODEL for name in items}
    doc = json.loads(json.dumps({"models": models, "comparisons": found}))
    assert metrics_schema_errors(doc) == []
    bad = json.loads(json.dumps(doc))
    bad["comparisons"][0]["clear"] = not bad["comparisons"][0]["clear"]
    bad["comparisons"][1]["b"] = "tuned-nothing"
    errors = metrics_schema_errors(bad)
    assert errors and errors[0].startswith("comparisons.0: clear must say whether")
    bad["comparisons"][0]["clear"] = not bad["comparisons"][0]["clear"]
    assert metrics_schema_errors(bad) == ["comparisons.1: must compare models in models, got 'tuned-nothing'"]

    body = evaluation_body(doc)
    assert "Paired comparisons (same items, bootstrap over items)" in body
    line = next(
        li for li in body.splitlines() if li.startswith("- tuned vs tuned-random — chat perplexity ratio")
    )
    r = vs_random
    assert line == (
        f"- tuned vs tuned-random — chat perplexity ratio {r['value']:.2f} [{r['low']:.2f}, "
        f"{r['high']:.2f}], n=8: tuned lower (clear)"
    )
    assert (
        "- tuned vs tuned-random — MC accuracy difference +0.00 [+0.00, +0.00], n=8: no difference "
        "(not clear at this n)"
    ) in body
    assert any(li.startswith("- tuned-random vs base — chat perplexity ratio") for li in body.splitlines())
    assert "Comparisons (overlapping intervals" in body  # the overlap lines stay
    assert paired_rows(found)[0]["a"] == "tuned" and len(paired_rows(found)) == len(found)
    assert evaluation_body({"models": models}).count("Paired comparisons") == 0


def test_paired_lines_word_the_direction_and_clarity() -> None:
    ratio = {
        "a": "tuned",
        "b": "tuned-random",
        "metric": "chat_perplexity",
        "kind": "ratio",
        "value": 0.8912,
        "low": 0.8401,
        "high": 0.9433,
        "n": 150,
        "clear": True,
    }
    diff = {
        "a": "tuned",
        "b": "base",
        "metric": "mc_accuracy",
        "kind": "difference",
        "value": 0.05,
        "low": -0.02,
        "high": 0.12,
        "n": 100,
        "clear": False,
    }
    lm = {**diff, "metric": "lm_eval:gsm_next:acc", "value": -0.1, "low": -0.2, "high": -0.01, "clear": True}
    # clear, close to 1: as many decimals as keep the bounds off 1
    near = {**ratio, "metric": "perplexity", "value": 0.99968, "low": 0.99951, "high": 0.99991}
    assert paired_lines([ratio, diff, lm, near]) == [
        "- tuned vs tuned-random — chat perplexity ratio 0.89 [0.84, 0.94], n=150: tuned lower (clear)",
        "- tuned vs base — MC accuracy difference +0.05 [-0.02, +0.12], n=100: "
        "tuned higher (not clear at this n)",
        "- tuned vs base — lm-eval gsm_next acc difference -0.10 [-0.20, -0.01], n=100: tuned lower (clear)",
        "- tuned vs tuned-random — domain perplexity (raw text) ratio 0.9997 [0.9995, 0.9999], n=150: "
        "tuned lower (clear)",
    ]


def test_comparisons_refuse_models_scored_on_different_items() -> None:
    items = {
        "base": _items(0.0, [1, 0, 1, 0, 1, 0, 1, 0]),
        "pruned": _items(0.5, [0] * 8),
        "tuned": _items(0.1, [1, 0, 1]),
    }
    with pytest.raises(
        ValueError, match="paired comparison tuned vs base, mc_accuracy: .*model A has 3 items and model B 8"
    ):
        comparisons(items)
    # a model without stored per-item numbers is left out of the comparisons, not an error
    assert {c["b"] for c in comparisons({**items, "tuned": None, "tuned-x": _items(0.2, [0] * 8)})} == {
        "base"
    }
