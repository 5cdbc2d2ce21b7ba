"""Prefect task of the `prune` stage: importance on the pruning data, plan, prune, save_pretrained."""

from __future__ import annotations

import hashlib
import json
import random
from pathlib import Path
from typing import Any

from prefect import task

from finescope_core.config import FinescopeConfig
from finescope_core.data import heldout_split, load_records
from finescope_core.model import load_model
from finescope_core.prune import prune_model, save_pruned
from tasks.common import (
    RUN_RESULTS,
    ModelRef,
    Progress,
    StageKey,
    StageManifest,
    artifact_dir,
    open_store,
    run_cached,
    storage_options,
)
from tasks.curate import GPU_TAGS, STORE_RETRIES, load_data


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def curated_split(cfg: FinescopeConfig, curated: StageManifest) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(train, held-out) curated records; held-out ones never guide pruning or tuning."""
    rows = _read_jsonl(artifact_dir(open_store(cfg), curated) / "curated.jsonl")
    return heldout_split(rows, cfg.evaluate.heldout_fraction, cfg.seed)


def pruning_texts(cfg: FinescopeConfig, corpus: StageManifest, curated: StageManifest | None) -> list[str]:
    """The texts that score importance: curated train split, a random corpus sample of its size, or a file."""
    choice = cfg.prune.data
    if choice in ("curated", "random"):
        assert curated is not None, "curated data is needed for prune.data curated/random"
        train, _ = curated_split(cfg, curated)
        records = load_data(cfg, corpus).records
        if choice == "curated":
            by_id = {r.id: r.text for r in records}
            return [by_id[r["id"]] for r in train]
        picked = random.Random(cfg.seed).sample(range(len(records)), min(len(train), len(records)))
        return [records[i].text for i in sorted(picked)]
    return load_records([choice], role="prune.data", storage_options=storage_options(cfg)).texts


def texts_sha(texts: list[str]) -> str:
    """Content hash of the pruning texts, in order (the same texts from another source hit the cache)."""
    return hashlib.sha256("\n\x00".join(texts).encode()).hexdigest()


def pruned_key(cfg: FinescopeConfig, model_sha: str, texts_digest: str) -> StageKey:
    """`pruned`: the pruning settings, on the base model and the texts that score importance."""
    config = {**cfg.prune.model_dump(), "seed": cfg.seed}
    return StageKey("pruned", "1", config, {"model": model_sha, "texts": texts_digest})


@task(name="prune", cache_policy=RUN_RESULTS, tags=GPU_TAGS, **STORE_RETRIES)
def prune_task(cfg: FinescopeConfig, ref: ModelRef, texts: list[str], texts_digest: str) -> StageManifest:
    """LLM-Pruner-style structured pruning to `prune.ratio`, saved as a plain HF directory under `model/`."""

    def build(work: Path) -> dict[str, Any]:
        model, tok = load_model(ref.path, Path("."), device=cfg.device)  # a private copy: pruning is in place
        plan = prune_model(model, tok, texts, cfg.prune, rule=cfg.prune.widths, progress=Progress("prune importance"))
        save_pruned(model, tok, plan, work / "model")
        report = plan.to_dict()
        keys = ("target_ratio", "achieved_ratio", "params_before", "params_after", "widths_before", "widths_after")
        return {k: report[k] for k in keys}

    return run_cached(open_store(cfg), pruned_key(cfg, ref.sha256, texts_digest), build)
