"""Task of the `evaluation` stage: perplexity (+ MC accuracy, numeric exact match) of one model."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from prefect import task

from finescope_core.config import FinescopeConfig
from finescope_core.data import (
    load_records,
)
from finescope_core.evaluate import (
    evaluate_model,
    load_mc_items,
    load_numeric_items,
)
from finescope_core.model import load_model
from tasks.common import (
    GPU_TAGS,
    RUN_RESULTS,
    STORE_RETRIES,
    ModelStageKey,
    Progress,
    StageKey,
    StageManifest,
    open_store,
    run_cached,
    storage_options,
)


def eval_inputs(cfg: FinescopeConfig, heldout_texts: list[str]) -> tuple[list[str], list[dict] | None, list[dict] | None]:
    """Domain texts (a user file, or the held-out curated records) and the optional MC / numeric sets."""
    options = storage_options(cfg)
    ev = cfg.evaluate
    texts = load_records([ev.eval_file], role="evaluate.eval_file", storage_options=options).texts if ev.eval_file else heldout_texts
    mc = load_mc_items(ev.mc_file, storage_options=options) if ev.mc_file else None
    numeric = load_numeric_items(ev.numeric_file, storage_options=options) if ev.numeric_file else None
    return texts, mc, numeric


class EvaluationKey(ModelStageKey):
    """`evaluation`: the scoring settings, on a model and the evaluation data (`eval_inputs`, by content).

    `evaluate.eval_file`, `mc_file`, `numeric_file` and `heldout_fraction` reach it through that data.
    """

    STAGE = "evaluation"
    VERSION = "1"
    CONFIG = {"max_length": "evaluate.max_length", "max_new_tokens": "evaluate.max_new_tokens",
              "max_examples": "evaluate.max_examples"}  # fmt: skip

    max_length: int
    max_new_tokens: int
    max_examples: int


def evaluation_key(cfg: FinescopeConfig, model_sha: str, data: tuple[list[str], list[dict] | None, list[dict] | None]) -> StageKey:
    data_sha = hashlib.sha256(json.dumps(list(data), default=str).encode()).hexdigest()
    return EvaluationKey.of(cfg, {"model": model_sha, "data": data_sha}).spec()


@task(name="evaluate", cache_policy=RUN_RESULTS, tags=GPU_TAGS, **STORE_RETRIES)
def evaluate_task(cfg: FinescopeConfig, name: str, model_path: str, model_sha: str, heldout_texts: list[str]) -> StageManifest:
    """Perplexity on held-out domain text (+ MC accuracy / numeric exact match when files are given)."""
    texts, mc, numeric = eval_inputs(cfg, heldout_texts)

    def build(work: Path) -> dict[str, Any]:
        model, tok = load_model(model_path, device=cfg.device, dtype=cfg.model_dtype)
        metrics = evaluate_model(
            model, tok, domain_texts=texts, mc_items=mc, numeric_items=numeric, cfg=cfg.evaluate,
            progress=Progress(f"evaluate {name}"),
        )
        (work / "metrics.json").write_text(json.dumps(metrics, indent=2))
        return metrics

    return run_cached(open_store(cfg), evaluation_key(cfg, model_sha, (texts, mc, numeric)), build)
