"""Prefect task of the `prune` stage: importance on the pruning data, plan, prune, save_pretrained."""

from __future__ import annotations

import hashlib
import random
from collections.abc import Collection, Sequence
from pathlib import Path
from typing import Any

from prefect import task

from finescope_core.config import FinescopeConfig
from finescope_core.data import Record, load_records, normalise_text
from finescope_core.io import read_jsonl
from finescope_core.model import checkpoint_dtype
from finescope_core.prune import prune_model, save_pruned
from tasks.caching import RUN_RESULTS, StageManifest, artifact_dir, run_cached
from tasks.context import open_store, storage_options
from tasks.data import load_data
from tasks.identity import Precision, work_precision
from tasks.keymodels import ModelStageKey, StageKey
from tasks.models import ModelRef, private_model
from tasks.progress import Progress
from tasks.retries import GPU_TAGS, STORE_RETRIES


def curated_records(cfg: FinescopeConfig, corpus: StageManifest, curated: StageManifest) -> list[Record]:
    """The curated set's corpus records, best first: what pruning (`curated`) and the teacher read.

    The whole set: evaluation items come from the evaluation split, which curation never sees.
    """
    rows = read_jsonl(artifact_dir(open_store(cfg), curated) / "curated.jsonl")
    by_id = {r.id: r for r in load_data(cfg, corpus).records}
    return [by_id[r["id"]] for r in rows]


def training_pool(
    corpus: Sequence[Record], seeds: Sequence[Record], excluded: Collection[str]
) -> list[Record]:
    """The corpus records any training data may come from: not held out for evaluation, no seed copy."""
    seed_texts = {normalise_text(r.text) for r in seeds}
    skip = set(excluded)
    return [r for r in corpus if r.id not in skip and normalise_text(r.text) not in seed_texts]


def pruning_texts(
    cfg: FinescopeConfig,
    corpus: StageManifest | None,
    curated: StageManifest | None,
    *,
    seeds: StageManifest | None = None,
    excluded: Collection[str] = (),
) -> list[str]:
    """The texts that score importance: the curated set, a random sample of its size from the training
    pool (`training_pool`: never the evaluation split, `excluded`, nor a seed copy), or a file."""
    choice = cfg.prune.data
    if choice in ("curated", "random"):
        assert corpus is not None and curated is not None, (
            "curated data is needed for prune.data curated/random"
        )
        train = curated_records(cfg, corpus, curated)
        if choice == "curated":
            return [r.text for r in train]
        seed_records = load_data(cfg, seeds).records if seeds is not None else []
        pool = training_pool(load_data(cfg, corpus).records, seed_records, excluded)
        picked = random.Random(cfg.seed).sample(range(len(pool)), min(len(train), len(pool)))
        return [pool[i].text for i in sorted(picked)]
    return load_records([choice], role="prune.data", storage_options=storage_options(cfg)).texts


def texts_sha(texts: list[str]) -> str:
    """Content hash of the pruning texts, in order (the same texts from another source hit the cache)."""
    return hashlib.sha256("\n\x00".join(texts).encode()).hexdigest()


class PrunedKey(ModelStageKey):
    """`pruned`: the pruning settings, on the base model and the texts that score importance.

    `prune.data` reaches it through the texts' hash (the same texts from another source hit the cache).
    """

    STAGE = "pruned"
    VERSION = "1"
    CODE = ("finescope_core.prune", "finescope_core.model", "finescope_core.data")
    CONFIG = {
        "ratio": "prune.ratio",
        "importance": "prune.importance",
        "attention": "prune.attention",
        "widths": "prune.widths",
        "max_length": "prune.max_length",
        "batch_size": "prune.batch_size",
    }

    ratio: float
    importance: str
    attention: str
    widths: str
    max_length: int
    batch_size: int


def pruned_key(
    cfg: FinescopeConfig, model_sha: str, texts_digest: str, precision: Precision | None = None
) -> StageKey:
    return PrunedKey.of(cfg, {"model": model_sha, "texts": texts_digest}, precision).spec()


@task(name="prune", cache_policy=RUN_RESULTS, tags=GPU_TAGS, **STORE_RETRIES)
def prune_task(cfg: FinescopeConfig, ref: ModelRef, texts: list[str], texts_digest: str) -> StageManifest:
    """LLM-Pruner-style structured pruning to `prune.ratio`, saved as a plain HF directory under `model/`."""
    ran = work_precision(cfg)

    def build(work: Path) -> dict[str, Any]:
        # A private copy (pruning is in place), loaded with the shared copy evicted: one copy, not two.
        model, tok = private_model(ref.path, ran.device, ran.dtype)
        plan = prune_model(
            model, tok, texts, cfg.prune, rule=cfg.prune.widths, progress=Progress("prune importance")
        )
        save_pruned(model, tok, plan, work / "model", dtype=checkpoint_dtype(ref.path))
        report = plan.to_dict()
        keys = (
            "target_ratio",
            "achieved_ratio",
            "params_before",
            "params_after",
            "widths_before",
            "widths_after",
        )
        return {k: report[k] for k in keys}

    return run_cached(open_store(cfg), pruned_key(cfg, ref.sha256, texts_digest, ran), build)


def baseline_records(name: str, pool: list[Record], size: int, seed: int) -> list[Record]:
    """From the training pool (`training_pool`): `random`, a seeded sample as large as the curated set;
    `corpus`, all of it."""
    if name == "corpus":
        return pool
    return [pool[i] for i in sorted(random.Random(seed).sample(range(len(pool)), min(size, len(pool))))]
