"""Paired comparisons between models scored on the same evaluation items.

The evaluate stage stores each model's per-item numbers beside its metrics (`ITEMS_FILE`, made by
`items_document`). Because every model is scored on the same items, "A beats B" is tested by a paired
bootstrap over the items (`bootstrap.paired_perplexity_ratio` / `paired_mean_difference`): a
perplexity compares as the ratio ppl(A) / ppl(B) (clear when its interval excludes 1), an accuracy and
an lm-eval per-sample metric as the difference A - B (clear when its interval excludes 0).

`comparisons` makes metrics.json's `comparisons` section: the main tuned model against every other
evaluated model (base, pruned, baselines), and every other model (each baseline's tuned and pruned
models, the pruned model) against base.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from finescope_core.evaluate.bootstrap import (
    Interval,
    excludes,
    paired_mean_difference,
    paired_perplexity_ratio,
)

ITEMS_FILE = "items.json"
"""The per-item numbers of one model's evaluation, beside its metrics.json in the evaluation artifact."""
ITEMS_FORMAT = 1
PERPLEXITY_METRICS = ("chat_perplexity", "perplexity", "general_perplexity")
"""Compared as a ratio; per item: summed NLL and predicted tokens."""
MEAN_METRICS = ("mc_accuracy", "mc_accuracy_norm", "numeric_exact_match")
"""Compared as a difference; per item: a 0/1 hit."""
LM_EVAL_PREFIX = "lm_eval:"
"""An lm-eval metric's name in a comparison: `lm_eval:<task>:<metric>`."""


def items_document(
    items: Mapping[str, Mapping[str, Sequence[Any]]],
    *,
    seed: int,
    resamples: int,
    lm_eval: Mapping[str, Mapping[str, Mapping[str, Sequence[Any]]]] | None = None,
) -> dict[str, Any]:
    """The content of `ITEMS_FILE`: the per-item numbers and the bootstrap settings they were scored with.

    Args:
        items: the per-item numbers `evaluate_model(items=...)` fills,
            {metric: {"nll", "tokens"} | {"values"}}.
        seed, resamples: the bootstrap seed and resample count of the model's intervals.
        lm_eval: `harness.task_samples` per task, {task: {metric: {"doc_ids", "values"}}}.
    """
    doc: dict[str, Any] = {
        "format": ITEMS_FORMAT,
        "seed": seed,
        "resamples": resamples,
        "metrics": {k: {f: list(v) for f, v in d.items()} for k, d in items.items()},
    }
    if lm_eval:
        doc["lm_eval"] = {
            t: {m: {f: list(v) for f, v in d.items()} for m, d in ms.items()} for t, ms in lm_eval.items()
        }
    return doc


def comparison_pairs(names: Sequence[str]) -> list[tuple[str, str]]:
    """(A, B) pairs to compare: tuned vs every other model, in order, then every other model vs base
    (each baseline's tuned model `tuned-<name>`, then the pruned ones: the paper's Table 1, every row
    against base). Pairs naming a model that is not in `names` are left out."""
    pairs = [("tuned", other) for other in names if other != "tuned"] if "tuned" in names else []
    if "base" in names:
        pairs += [(name, "base") for name in names if name.startswith("tuned-")]
        pairs += [(name, "base") for name in names if name == "pruned" or name.startswith("pruned-")]
    return pairs


def compare(
    a: Mapping[str, Any], b: Mapping[str, Any], metric: str, *, resamples: int, seed: int
) -> tuple[str, Interval] | None:
    """The paired comparison of one metric between two models' `ITEMS_FILE` documents.

    Returns:
        ("ratio", ppl(A) / ppl(B)) for a perplexity, ("difference", A - B) for an accuracy or an lm-eval
        metric (over the doc ids both have); None when either model lacks the metric.

    Raises:
        ValueError: the two models' core metric has different item counts (not the same items).
    """
    if metric.startswith(LM_EVAL_PREFIX):
        task, _, name = metric.removeprefix(LM_EVAL_PREFIX).partition(":")
        sa = ((a.get("lm_eval") or {}).get(task) or {}).get(name)
        sb = ((b.get("lm_eval") or {}).get(task) or {}).get(name)
        if not sa or not sb:
            return None
        by_doc = dict(zip(map(_doc_key, sb["doc_ids"]), sb["values"], strict=True))
        shared = [
            (v, by_doc[d])
            for d, v in zip(map(_doc_key, sa["doc_ids"]), sa["values"], strict=True)
            if d in by_doc
        ]
        if not shared:
            return None
        va, vb = [x for x, _ in shared], [y for _, y in shared]
        return "difference", paired_mean_difference(va, vb, resamples=resamples, seed=seed)
    ia, ib = (a.get("metrics") or {}).get(metric), (b.get("metrics") or {}).get(metric)
    if not ia or not ib:
        return None
    try:
        if metric in PERPLEXITY_METRICS:
            ci = paired_perplexity_ratio(
                ia["nll"], ia["tokens"], ib["nll"], ib["tokens"], resamples=resamples, seed=seed
            )
            return "ratio", ci
        return "difference", paired_mean_difference(
            ia["values"], ib["values"], resamples=resamples, seed=seed
        )
    except ValueError as e:
        raise ValueError(f"{metric}: {e}") from None


def _doc_key(doc_id: Any) -> str:
    return repr(doc_id)


def shared_metrics(a: Mapping[str, Any], b: Mapping[str, Any]) -> list[str]:
    """The metrics both per-item documents hold, core metrics first (table order), then lm-eval's."""
    ma, mb = a.get("metrics") or {}, b.get("metrics") or {}
    out = [m for m in (*PERPLEXITY_METRICS, *MEAN_METRICS) if m in ma and m in mb]
    la, lb = a.get("lm_eval") or {}, b.get("lm_eval") or {}
    for task, metrics in la.items():
        out += [f"{LM_EVAL_PREFIX}{task}:{m}" for m in metrics if m in (lb.get(task) or {})]
    return out


def comparisons(items: Mapping[str, Mapping[str, Any] | None]) -> list[dict[str, Any]]:
    """metrics.json's `comparisons`: every shared metric of every `comparison_pairs` pair, paired.

    Args:
        items: model name -> its `ITEMS_FILE` document (None: no per-item numbers, so no comparison).
            The bootstrap seed and resample count are model A's (every model of a run shares them).

    Returns:
        [{"a", "b", "metric", "kind": "ratio" | "difference", "value", "low", "high", "n", "clear"}], where
        `clear` says the interval excludes 1 (ratio) / 0 (difference).

    Raises:
        ValueError: a pair's core metric covers different item counts, naming the models and metric.
    """
    out: list[dict[str, Any]] = []
    for a, b in comparison_pairs([name for name, doc in items.items() if doc]):
        da, db = items[a], items[b]
        assert da is not None and db is not None
        for metric in shared_metrics(da, db):
            try:
                found = compare(da, db, metric, resamples=int(da["resamples"]), seed=int(da["seed"]))
            except ValueError as e:
                raise ValueError(f"paired comparison {a} vs {b}, {e}") from None
            if found is None:
                continue
            kind, ci = found
            out.append(
                {
                    "a": a,
                    "b": b,
                    "metric": metric,
                    "kind": kind,
                    **ci.to_dict(),
                    "clear": excludes(ci, 1.0 if kind == "ratio" else 0.0),
                }
            )
    return out
