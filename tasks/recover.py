"""Task of the `recovered` stage: logit distillation from the teacher into the pruned model over a
domain-weighted draw of the training pool (`recover.tokens > 0`), before the teacher-guided tuning."""

from __future__ import annotations

import hashlib
from collections.abc import Collection, Mapping
from pathlib import Path
from typing import Any

from finescope_core import recover as core
from finescope_core.config import FinetuneConfig, RecoverConfig
from finescope_core.curate.curated_set import CURATED_FILE, SCORES_FILE, load_scores
from finescope_core.data import Record
from finescope_core.io import read_jsonl
from finescope_core.model import checkpoint_dtype, load_model
from finescope_core.recover import PoolDraw, RecoverInputs, draw_pool, draw_random
from tasks.caching import RUN_RESULTS, StageManifest, artifact_dir, run_cached
from tasks.context import RunContext
from tasks.data import load_data
from tasks.identity import Precision
from tasks.keymodels import ModelStageKey, StageKey
from tasks.models import ModelRef, private_model
from tasks.planning import plannable
from tasks.progress import Progress
from tasks.prune import training_pool
from tasks.registry import Stage, model_path, stage_task, variant_label
from tasks.retries import GPU_TAGS, STORE_RETRIES


def draw_for(
    section: RecoverConfig, pool: list[Record], scores: Mapping[str, float], variant: str, seed: int
) -> PoolDraw:
    """A variant's recovery pool from the training pool: the curated variant's (`""`) nearest first by
    `scores` plus the general share; a baseline's (`random`, `corpus`) wholly at random, so a comparison
    with it measures curation.

    Raises:
        ValueError: the training pool is empty (before any model is loaded).
    """
    if not pool:
        raise ValueError(
            "recover: the training pool is empty (every corpus record is held out for evaluation or copies "
            "a seed): add corpus records, or set recover.tokens: 0 to tune the pruned model directly"
        )
    size = None if section.pool == "auto" else section.pool
    if variant:
        return draw_random(pool, size, seed)
    return draw_pool(pool, scores, size, section.general_share, seed)


def curation_scores(ctx: RunContext, corpus: StageManifest, curated: StageManifest) -> dict[str, float]:
    """Each corpus record's curation score by id (higher: nearer the seeds): the curated stage's
    `scores.safetensors`, or, for a method that keeps none, the curated set's rank (its records first)."""
    directory = artifact_dir(ctx.store, curated)
    ids = [r.id for r in load_data(ctx, corpus).records]
    if (directory / SCORES_FILE).exists():
        scores, _ = load_scores(directory / SCORES_FILE)
        return {i: float(s) for i, s in zip(ids, scores, strict=True)}
    rows = read_jsonl(directory / CURATED_FILE)
    return {row["id"]: float(-rank) for rank, row in enumerate(rows)}


@plannable
def recovery_pool(
    section: RecoverConfig,
    ctx: RunContext,
    corpus: StageManifest,
    seeds: StageManifest,
    curated: StageManifest,
    excluded: Collection[str],
    variant: str,
) -> PoolDraw:
    """A variant's recovery pool, drawn from the training pool (`training_pool`: never an evaluation
    split record, `excluded`, nor a seed copy)."""
    pool = training_pool(load_data(ctx, corpus).records, load_data(ctx, seeds).records, excluded)
    scores = curation_scores(ctx, corpus, curated) if not variant else {}
    return draw_for(section, pool, scores, variant, ctx.seed)


def pool_sha(draw: PoolDraw) -> str:
    """Content hash of the drawn pool, in reading order (ids, texts and which are general)."""
    h = hashlib.sha256()
    for r in draw.records:
        h.update(f"{r.id}\x00{int(r.id in draw.general)}\x00{r.text}\x01".encode())
    return h.hexdigest()


class RecoveredKey(ModelStageKey):
    """`recovered`: the phase's settings and the tuning method with its LoRA settings, on the pruned
    model, the teacher model and the drawn pool (which carries the curation scores, the corpus, the
    seeds, the held-out split and the seed by content)."""

    STAGE = "recovered"
    VERSION = "1"
    CODE = ("finescope_core.recover", "finescope_core.model", "finescope_core.data")
    CONFIG = {
        "recover": "recover",
        "method": "finetune.method",
        "rank": "finetune.rank",
        "alpha": "finetune.alpha",
        "dropout": "finetune.dropout",
        "target_modules": "finetune.target_modules",
        "seed": "seed",
    }

    recover: dict[str, Any]
    method: str
    rank: int
    alpha: int
    dropout: float
    target_modules: list[str]
    seed: int


def recovered_key(
    section: RecoverConfig,
    tuning: FinetuneConfig,
    ctx: RunContext,
    pruned_sha: str,
    teacher_sha: str,
    pool_digest: str,
    precision: Precision | None = None,
) -> StageKey:
    inputs = {"pruned": pruned_sha, "teacher": teacher_sha, "pool": pool_digest}
    return RecoveredKey.of(ctx.settings(recover=section, finetune=tuning), inputs, precision).spec()


RECOVERED = Stage(
    "recovered",
    RecoveredKey,
    upstream=("pruned", "models", "curated", "corpus", "seeds"),
    core=core.run,
    files=(core.MODEL_DIR, core.SUMMARY_FILE, core.POOL_FILE),
    model_dir=core.MODEL_DIR,
)


@stage_task(
    RECOVERED,
    label=variant_label("recovered"),
    task_run_name="recovered-{tag}",
    cache_policy=RUN_RESULTS,
    tags=GPU_TAGS,
    **STORE_RETRIES,
)
def recover_task(
    section: RecoverConfig,
    ctx: RunContext,
    pruned: StageManifest,
    teacher: ModelRef,
    tuning: FinetuneConfig,
    pool: PoolDraw,
    tag: str = "curated",
    teacher_device_map: str | None = None,
) -> StageManifest:
    """Distil `teacher` into the pruned model over the drawn `pool` (`recovery_pool`) until
    `recover.tokens` are spent; the recovered model (plain HF directory), `recover.json`, the pool's ids."""
    store = ctx.store
    ran = ctx.precision()

    def build(work: Path) -> dict[str, Any]:
        student_dir = str(model_path(store, pruned))
        model, tok = private_model(student_dir, ran.device, ran.dtype)
        device_map = "auto" if teacher_device_map == "auto" else None
        # The student stays: `load_model`, not `private_model`.
        teacher_model, _ = load_model(teacher.path, device=ran.device, dtype=ran.dtype, device_map=device_map)
        inputs = RecoverInputs(
            model=model,
            tokenizer=tok,
            teacher=teacher_model,
            pool=pool.records,
            general=pool.general,
            tuning=tuning,
            dtype=checkpoint_dtype(student_dir),
        )
        return core.run(inputs, section, ctx.stage_context(ran), work, Progress(f"recover ({tag})"))

    key = recovered_key(section, tuning, ctx, pruned.sha256, teacher.sha256, pool_sha(pool), ran)
    return run_cached(store, key, build)
