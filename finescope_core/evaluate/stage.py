"""All metrics of one model, as the evaluate stage stores them (one `models` entry of metrics.json)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from transformers import PreTrainedModel, PreTrainedTokenizerBase

from finescope_core.config import EvalConfig
from finescope_core.evaluate.bootstrap import Interval, mean_interval, perplexity_interval
from finescope_core.evaluate.choice import mc_hits
from finescope_core.evaluate.errors import EvalError
from finescope_core.evaluate.inference import DEFAULT_BATCH_SIZE
from finescope_core.evaluate.numeric import numeric_hits
from finescope_core.evaluate.perplexity import chat_nll, text_nll
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
    chat_pairs: Sequence[tuple[str, str]] = (),
    general_texts: Sequence[str] = (),
    mc_items: Sequence[Mapping[str, Any]] | None = None,
    numeric_items: Sequence[Mapping[str, Any]] | None = None,
    cfg: EvalConfig,
    seed: int = 0,
    batch_size: int = DEFAULT_BATCH_SIZE,
    progress: Progress = no_progress,
    items: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """All metrics of one model with bootstrap 95 % intervals, each eval set cut to `cfg.max_examples`.

    * `perplexity`: raw-text token perplexity of the domain texts;
    * `chat_perplexity`: perplexity of the references' tokens (+ EOS) after the chat-formatted prompts,
      the tokens LoRA tuning learns from (`chat_pairs`: the domain items that have both);
    * `general_perplexity`: raw-text perplexity of the general, out-of-domain texts;
    * `mc_accuracy`, `mc_accuracy_norm`, `numeric_exact_match` when their items are given.

    `parameters` is the `total` of `finescope_core.prune.counts.count_parameters`, the count the prune
    report gives (tied embeddings once), so base / pruned / tuned sizes compare with it. `progress` is
    called as progress(done, total, metric=...) per batch, metric "perplexity", "chat", "general", "mc"
    or "numeric". Intervals resample items (`cfg.bootstrap_resamples` times, seeded with `seed`).

    `items`, when given, is filled with the per-item numbers each metric's value and interval come
    from, in item order, per metric present: {"nll": [...], "tokens": [...]} for a perplexity (its
    value is exp(sum nll / sum tokens)), {"values": [0/1, ...]} for an accuracy (their mean). Paired
    comparisons between models scored on the same items read them (`finescope_core.evaluate.paired`).

    Returns:
        {"perplexity": float, "parameters": int, <optional metrics>: float, "n": {metric set: int},
        "ci": {metric: {"value", "low", "high", "n"}}}.
    """
    texts = list(domain_texts)[: cfg.max_examples]
    if not texts:
        raise EvalError(
            "no domain evaluation texts; give evaluate.eval_file or a corpus with an evaluation split"
        )
    resamples = cfg.bootstrap_resamples
    ci: dict[str, Interval] = {}
    nll, tokens = text_nll(
        model,
        tokenizer,
        texts,
        max_length=cfg.max_length,
        batch_size=batch_size,
        progress=_tagged(progress, "perplexity"),
    )
    ci["perplexity"] = _perplexity(nll, tokens, resamples, seed, "domain texts")
    per_item: dict[str, dict[str, list[Any]]] = {"perplexity": {"nll": nll, "tokens": tokens}}
    counts = {"perplexity": len(texts)}
    pairs = list(chat_pairs)[: cfg.max_examples]
    if pairs:
        nll, tokens = chat_nll(
            model,
            tokenizer,
            pairs,
            max_length=cfg.max_length,
            batch_size=batch_size,
            progress=_tagged(progress, "chat"),
        )
        if sum(tokens):
            ci["chat_perplexity"] = _perplexity(nll, tokens, resamples, seed, "chat items")
            per_item["chat_perplexity"] = {"nll": nll, "tokens": tokens}
            counts["chat"] = len(pairs)
    general = list(general_texts)[: cfg.max_examples]
    if general:
        nll, tokens = text_nll(
            model,
            tokenizer,
            general,
            max_length=cfg.max_length,
            batch_size=batch_size,
            progress=_tagged(progress, "general"),
        )
        ci["general_perplexity"] = _perplexity(nll, tokens, resamples, seed, "general texts")
        per_item["general_perplexity"] = {"nll": nll, "tokens": tokens}
        counts["general"] = len(general)
    if mc_items:
        hits, hits_norm = mc_hits(
            model,
            tokenizer,
            list(mc_items)[: cfg.max_examples],
            max_length=cfg.max_length,
            batch_size=batch_size,
            progress=_tagged(progress, "mc"),
        )
        ci["mc_accuracy"] = mean_interval(hits, resamples=resamples, seed=seed)
        ci["mc_accuracy_norm"] = mean_interval(hits_norm, resamples=resamples, seed=seed)
        per_item["mc_accuracy"], per_item["mc_accuracy_norm"] = (
            {"values": list(hits)},
            {"values": list(hits_norm)},
        )
        counts["mc"] = len(hits)
    if numeric_items:
        num = numeric_hits(
            model,
            tokenizer,
            list(numeric_items)[: cfg.max_examples],
            max_new_tokens=cfg.max_new_tokens,
            batch_size=batch_size,
            progress=_tagged(progress, "numeric"),
        )
        ci["numeric_exact_match"] = mean_interval(num, resamples=resamples, seed=seed)
        per_item["numeric_exact_match"] = {"values": list(num)}
        counts["numeric"] = len(num)
    result: dict[str, Any] = {name: interval.value for name, interval in ci.items()}
    result.update(
        parameters=count_parameters(model)["total"], n=counts, ci={k: v.to_dict() for k, v in ci.items()}
    )
    if items is not None:
        items.update(per_item)
    return result


def _perplexity(nll: list[float], tokens: list[int], resamples: int, seed: int, what: str) -> Interval:
    if sum(tokens) == 0:
        raise EvalError(
            f"every one of the {what} is a single token, so no token is predicted; pass longer texts"
        )
    return perplexity_interval(nll, tokens, resamples=resamples, seed=seed)
