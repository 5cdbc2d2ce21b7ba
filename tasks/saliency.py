"""Task of the `saliency` stage: per-coordinate Jacobian saliency of every hooked layer (eq. 6-10)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from finescope_core.config import CurateConfig
from finescope_core.curate import saliency as stage
from finescope_core.curate.saliency import SALIENCY_FILES, SaliencyInputs
from tasks.caching import RUN_RESULTS, StageManifest, run_cached
from tasks.context import RunContext
from tasks.data import load_data
from tasks.identity import Precision
from tasks.keymodels import ModelStageKey, StageKey
from tasks.models import ModelRef, using_model
from tasks.progress import Progress
from tasks.registry import Stage, stage_task
from tasks.retries import GPU_TAGS, STORE_RETRIES


class SaliencyKey(ModelStageKey):
    """`saliency`: the selector's settings on the hooked layers, on the model and the corpus artifact.

    The batch size is part of it: each Rademacher probe is drawn at the padded shape of its batch.
    """

    STAGE = "saliency"
    VERSION = "2"
    CONFIG = {
        "selector": "curate.selector",
        "k_act": "curate.k_act",
        "probes": "curate.probes",
        "reference_size": "curate.reference_size",
        "max_length": "curate.max_length",
        "skip_first": "curate.skip_first",
        "batch_size": "curate.batch_size",
        "seed": "seed",
    }
    DERIVED = ("curate.layers", "curate.num_layers", "device", "model_dtype")
    CODE = ("finescope_core.curate", "finescope_core.saliency")

    layers: list[int]
    selector: str
    k_act: int
    probes: int
    reference_size: int
    max_length: int
    skip_first: int
    batch_size: int
    seed: int


def saliency_key(
    section: CurateConfig,
    ctx: RunContext,
    model_sha: str,
    corpus_sha: str,
    layers: list[int],
    precision: Precision | None = None,
) -> StageKey:
    inputs = {"model": model_sha, "corpus": corpus_sha}
    return SaliencyKey.of(ctx.settings(curate=section), inputs, precision, layers=layers).spec()


SALIENCY = Stage(
    "saliency", SaliencyKey, upstream=("models", "corpus", "sae-corpus"), core=stage.run, files=SALIENCY_FILES
)


@stage_task(SALIENCY, cache_policy=RUN_RESULTS, tags=GPU_TAGS, **STORE_RETRIES)
def saliency_task(
    section: CurateConfig, ctx: RunContext, ref: ModelRef, corpus: StageManifest, layers: list[int]
) -> StageManifest:
    """Eq. 6-10: per-coordinate saliency of every hooked layer on D0; top-k_act indices per layer."""

    ran = ctx.precision()

    def build(work: Path) -> dict[str, Any]:
        with using_model(ref.path, ran.device, ran.dtype) as (model, tok):
            inputs = SaliencyInputs(model=model, tokenizer=tok, corpus=load_data(ctx, corpus), layers=layers)
            return stage.run(
                inputs, section, ctx.stage_context(ran), work, Progress(f"saliency ({section.selector})")
            )

    return run_cached(ctx.store, saliency_key(section, ctx, ref.sha256, corpus.sha256, layers, ran), build)
