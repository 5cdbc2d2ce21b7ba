"""The `evaluation` stage: all metrics of one model (one `models` entry of metrics.json), lm-eval's too.

`evaluate_model` scores one model on the evaluation data; `with_harness` adds the lm-evaluation-harness
tasks of `evaluate.lm_eval_tasks`; `run` is the stage's entry, writing `METRICS_FILE` and `ITEMS_FILE`.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from transformers import PreTrainedModel, PreTrainedTokenizerBase

from finescope_core.config import EvalConfig
from finescope_core.evaluate.bootstrap import Interval, mean_interval, perplexity_interval
from finescope_core.evaluate.choice import mc_hits
from finescope_core.evaluate.errors import EvalError
from finescope_core.evaluate.harness import harness_metrics
from finescope_core.evaluate.inference import DEFAULT_BATCH_SIZE
from finescope_core.evaluate.numeric import numeric_hits
from finescope_core.evaluate.paired import ITEMS_FILE, items_document
from finescope_core.evaluate.perplexity import chat_nll, text_nll
from finescope_core.progress import Info, Progress, no_progress
from finescope_core.prune.counts import count_parameters
from finescope_core.stage import StageContext

METRICS_FILE = "metrics.json"
"""The `evaluation` artifact's metrics of the model (`evaluate_model` + `lm_eval`), also its info."""


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


def with_harness(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    cfg: EvalConfig,
    metrics: dict[str, Any],
    *,
    seed: int,
    progress: Progress = no_progress,
    docs: Mapping[str, Sequence[int]] | None = None,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """`metrics` plus `lm_eval` (task -> metric -> value / CI / n) when `cfg.lm_eval_tasks` is set, and
    lm-eval's per-sample values behind them (task -> metric -> doc ids / values; {} without tasks).

    `docs`: task -> the doc ids that passed the contamination check (`EvalData.lm_eval_docs`); a task
    not in it runs on its first documents."""
    if not cfg.lm_eval_tasks:
        return metrics, {}
    samples: dict[str, Any] = {}
    metrics["lm_eval"] = harness_metrics(
        model, tokenizer, cfg, seed=seed, progress=progress, samples=samples, docs=docs
    )
    return metrics, samples


@dataclass(frozen=True)
class EvalInputs:
    """What the `evaluation` stage reads: the loaded model and the evaluation data."""

    model: PreTrainedModel
    """The model to score, loaded on the stage's device and dtype."""
    tokenizer: PreTrainedTokenizerBase
    """Its tokenizer (`finescope_core.model.prepare_tokenizer`: with a pad token)."""
    data: Mapping[str, Any]
    """The evaluation data payload (`tasks.evalset.EvalData.payload()`): `domain`, `chat`, `general`,
    `mc`, `numeric` and, when lm-eval tasks run, `lm_eval_docs`."""
    name: str
    """The model's name in the run (`base`, `pruned`, `tuned`, ...), for progress lines."""


def run(
    inputs: EvalInputs, section: EvalConfig, ctx: StageContext, work_dir: Path, progress: Progress
) -> dict[str, Any]:
    """The `evaluation` stage: every metric of `inputs.model` (and lm-eval's tasks) in
    `work_dir / METRICS_FILE`, their per-item numbers in `work_dir / ITEMS_FILE`.

    `progress` is called per batch with `metric=` the metric being scored (`lm_eval` for the harness).

    Returns:
        The metrics (the content of `METRICS_FILE`).
    """
    data = inputs.data
    items: dict[str, Any] = {}
    metrics = evaluate_model(
        inputs.model,
        inputs.tokenizer,
        domain_texts=data["domain"],
        chat_pairs=[tuple(p) for p in data["chat"]],
        general_texts=data["general"],
        mc_items=data["mc"],
        numeric_items=data["numeric"],
        cfg=section,
        seed=ctx.seed,
        progress=progress,
        items=items,
    )
    metrics, samples = with_harness(
        inputs.model,
        inputs.tokenizer,
        section,
        metrics,
        seed=ctx.seed,
        progress=_tagged(progress, "lm_eval"),
        docs=data.get("lm_eval_docs"),
    )
    (work_dir / METRICS_FILE).write_text(json.dumps(metrics, indent=2))
    doc = items_document(items, seed=ctx.seed, resamples=section.bootstrap_resamples, lm_eval=samples)
    (work_dir / ITEMS_FILE).write_text(json.dumps(doc))
    return metrics
