"""All metrics of one model, as the evaluate stage stores them (one `models` entry of metrics.json)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from transformers import PreTrainedModel, PreTrainedTokenizerBase

from finescope_core.config import EvalConfig
from finescope_core.evaluate.choice import mc_accuracy
from finescope_core.evaluate.inference import DEFAULT_BATCH_SIZE
from finescope_core.evaluate.numeric import numeric_exact_match
from finescope_core.evaluate.perplexity import perplexity
from finescope_core.progress import Info, Progress, no_progress
from finescope_core.prune.counts import count_parameters


def _tagged(progress: Progress, metric: str) -> Progress:
    """`progress` with `metric=<metric>` added, so one callback can tell the metrics apart."""

    def report(done: int, total: int, /, **info: Info) -> None:
        progress(done, total, **{**info, "metric": metric})

    return report


def evaluate_model(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    *,
    domain_texts: Sequence[str],
    mc_items: Sequence[Mapping[str, Any]] | None = None,
    numeric_items: Sequence[Mapping[str, Any]] | None = None,
    cfg: EvalConfig,
    batch_size: int = DEFAULT_BATCH_SIZE,
    progress: Progress = no_progress,
) -> dict[str, Any]:
    """All metrics of one model, each eval set cut to its first `cfg.max_examples` examples.

    `parameters` is the `total` of `finescope_core.prune.counts.count_parameters`, the count the prune
    report gives (tied embeddings once), so base / pruned / tuned sizes compare with it. `progress` is
    called as progress(done, total, metric=...) per batch, metric "perplexity", "mc" or "numeric".

    Returns:
        {"perplexity": float, "parameters": int, "mc_accuracy"?: float, "mc_accuracy_norm"?: float,
        "numeric_exact_match"?: float, "n": {"perplexity": int, "mc"?: int, "numeric"?: int}}.
    """
    texts = list(domain_texts)[: cfg.max_examples]
    result: dict[str, Any] = {
        "perplexity": perplexity(
            model, tokenizer, texts, max_length=cfg.max_length, batch_size=batch_size,
            progress=_tagged(progress, "perplexity"),
        ),
        "parameters": count_parameters(model)["total"],
        "n": {"perplexity": len(texts)},
    }
    if mc_items:
        mc = mc_accuracy(
            model, tokenizer, list(mc_items)[: cfg.max_examples], max_length=cfg.max_length,
            batch_size=batch_size, progress=_tagged(progress, "mc"),
        )
        result.update(mc_accuracy=mc["accuracy"], mc_accuracy_norm=mc["accuracy_norm"])
        result["n"]["mc"] = mc["n"]
    if numeric_items:
        num = numeric_exact_match(
            model, tokenizer, list(numeric_items)[: cfg.max_examples], max_new_tokens=cfg.max_new_tokens,
            batch_size=batch_size, progress=_tagged(progress, "numeric"),
        )
        result["numeric_exact_match"] = num["exact_match"]
        result["n"]["numeric"] = num["n"]
    return result
