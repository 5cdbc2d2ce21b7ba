"""Prefect task of the `prune` stage: importance on the pruning data, plan, prune, save_pretrained."""

from __future__ import annotations

import hashlib
import random
from collections.abc import Collection, Sequence
from pathlib import Path
from typing import Any

from finescope_core import prune as core
from finescope_core.config import PruneConfig
from finescope_core.curate.curated_set import CURATED_FILE
from finescope_core.data import Record, load_records, normalise_text
from finescope_core.io import read_jsonl
from finescope_core.model import checkpoint_dtype
from finescope_core.prune import MODEL_DIR, PruneInputs
from tasks.caching import RUN_RESULTS, StageManifest, artifact_dir, run_cached
from tasks.context import RunContext
from tasks.data import load_data
from tasks.identity import Precision
from tasks.keymodels import ModelStageKey, StageKey
from tasks.models import ModelRef, private_model
from tasks.planning import plannable
from tasks.progress import Progress
from tasks.registry import Stage, stage_task, variant_label
from tasks.retries import GPU_TAGS, STORE_RETRIES


@plannable
def curated_records(ctx: RunContext, corpus: StageManifest, curated: StageManifest) -> list[Record]:
    """The curated set's corpus records, best first: what pruning (`curated`) and the teacher read.

    The whole set: evaluation items come from the evaluation split, which curation never sees.
    """
    rows = read_jsonl(artifact_dir(ctx.store, curated) / CURATED_FILE)
    by_id = {r.id: r for r in load_data(ctx, corpus).records}
    return [by_id[r["id"]] for r in rows]


def training_pool(
    corpus: Sequence[Record], seeds: Sequence[Record], excluded: Collection[str]
) -> list[Record]:
    """The corpus records any training data may come from: not held out for evaluation, no seed copy."""
    seed_texts = {normalise_text(r.text) for r in seeds}
    skip = set(excluded)
    return [r for r in corpus if r.id not in skip and normalise_text(r.text) not in seed_texts]


@plannable
def pruning_texts(
    section: PruneConfig,
    ctx: RunContext,
    corpus: StageManifest | None,
    curated: StageManifest | None,
    *,
    seeds: StageManifest | None = None,
    excluded: Collection[str] = (),
) -> list[str]:
    """The texts that score importance: the curated set, a random sample of its size from the training
    pool (`training_pool`: never the evaluation split, `excluded`, nor a seed copy), or a file."""
    choice = section.data
    if choice in ("curated", "random"):
        assert corpus is not None and curated is not None, (
            "curated data is needed for prune.data curated/random"
        )
        train = curated_records(ctx, corpus, curated)
        if choice == "curated":
            return [r.text for r in train]
        seed_records = load_data(ctx, seeds).records if seeds is not None else []
        pool = training_pool(load_data(ctx, corpus).records, seed_records, excluded)
        picked = random.Random(ctx.seed).sample(range(len(pool)), min(len(train), len(pool)))
        return [pool[i].text for i in sorted(picked)]
    return load_records([choice], role="prune.data", storage_options=ctx.storage_options()).texts


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
    section: PruneConfig,
    ctx: RunContext,
    model_sha: str,
    texts_digest: str,
    precision: Precision | None = None,
) -> StageKey:
    return PrunedKey.of(
        ctx.settings(prune=section), {"model": model_sha, "texts": texts_digest}, precision
    ).spec()


PRUNED = Stage(
    "pruned",
    PrunedKey,
    upstream=("models", "curated"),
    core=core.run,
    files=(MODEL_DIR, core.REPORT_FILE),
    model_dir=MODEL_DIR,
)


@stage_task(
    PRUNED,
    label=variant_label("pruned"),
    task_run_name="pruned-{tag}",
    cache_policy=RUN_RESULTS,
    tags=GPU_TAGS,
    **STORE_RETRIES,
)
def prune_task(
    section: PruneConfig, ctx: RunContext, ref: ModelRef, texts: list[str], tag: str = "curated"
) -> StageManifest:
    """LLM-Pruner-style structured pruning to `prune.ratio`, saved as a plain HF directory under `model/`."""
    ran = ctx.precision()

    def build(work: Path) -> dict[str, Any]:
        # A private copy (pruning is in place), loaded with the shared copy evicted: one copy, not two.
        model, tok = private_model(ref.path, ran.device, ran.dtype)
        inputs = PruneInputs(model=model, tokenizer=tok, texts=texts, dtype=checkpoint_dtype(ref.path))
        return core.run(inputs, section, ctx.stage_context(ran), work, Progress("prune importance"))

    return run_cached(ctx.store, pruned_key(section, ctx, ref.sha256, texts_sha(texts), ran), build)


def baseline_records(name: str, pool: list[Record], size: int, seed: int) -> list[Record]:
    """From the training pool (`training_pool`): `random`, a seeded sample as large as the curated set;
    `corpus`, all of it."""
    if name == "corpus":
        return pool
    return [pool[i] for i in sorted(random.Random(seed).sample(range(len(pool)), min(size, len(pool))))]
