"""Task of the `distilled` stage: teacher responses (SDFT rewrite), written incrementally, resumable."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import sys
from pathlib import Path
from typing import Any

import torch

from finescope_core import teacher as core
from finescope_core.config import TeacherConfig
from finescope_core.data import Record
from finescope_core.memplan import vllm_engine_settings
from finescope_core.model import load_tokenizer
from finescope_core.teacher import (
    DISTILLED_FILE,
    DistillInputs,
    Teacher,
    TeacherError,
    VLLMGenerator,
    learned_as_text,
    resolve_max_new_tokens,
)
from tasks.caching import RUN_RESULTS, StageManifest, run_cached
from tasks.context import RunContext, logger
from tasks.data import model_task
from tasks.identity import Precision
from tasks.keymodels import ModelStageKey, StageKey
from tasks.models import ModelRef, evict_shared_model, private_model
from tasks.progress import Progress
from tasks.registry import Stage, stage_task, variant_label
from tasks.retries import GPU_TAGS, IO_RETRIES


def records_sha(records: list[Record]) -> str:
    h = hashlib.sha256()
    for r in records:
        h.update(json.dumps([r.id, r.fields], sort_keys=True, default=str).encode())
    return h.hexdigest()


def teacher_ref(section: TeacherConfig, ctx: RunContext, base: ModelRef) -> ModelRef:
    """The teacher: the unpruned base model unless `teacher.model` names another."""
    if section.model == "base":
        return base
    return model_task(ctx, section.model, "models (teacher)")


class DistilledKey(ModelStageKey):
    """`distilled`: the generation settings, on the teacher model (`teacher.model`, by content) and the
    records."""

    STAGE = "distilled"
    # 2: max_new_tokens auto, prompts shortened in the reference, wrong_answer check
    # 3: batches by prompt length (longest first), so batch composition and per-batch seeds differ; the
    # backend
    # 4: teacher.text_records: a plain-text record becomes a text line (`text`), not a teacher reply
    VERSION = "4"
    CODE = ("finescope_core.teacher", "finescope_core.model", "finescope_core.data")
    CONFIG = {
        "max_new_tokens": "teacher.max_new_tokens",
        "max_prompt_length": "teacher.max_prompt_length",
        "batch_size": "teacher.batch_size",
        "temperature": "teacher.temperature",
        "min_response_chars": "teacher.min_response_chars",
        "check_answer": "teacher.check_answer",
        "text_records": "teacher.text_records",
        "backend": "teacher.backend",
        "seed": "seed",
    }

    max_new_tokens: int | str
    max_prompt_length: int
    batch_size: int
    temperature: float
    min_response_chars: int
    check_answer: bool
    text_records: str
    backend: str
    seed: int


def distilled_key(
    section: TeacherConfig,
    ctx: RunContext,
    teacher_sha: str,
    records: list[Record],
    precision: Precision | None = None,
) -> StageKey:
    return DistilledKey.of(
        ctx.settings(teacher=section), {"teacher": teacher_sha, "records": records_sha(records)}, precision
    ).spec()


DISTILLED = Stage(
    "distilled",
    DistilledKey,
    upstream=("models", "curated"),
    core=core.run,
    files=(DISTILLED_FILE,),
)


@stage_task(
    DISTILLED,
    label=variant_label("distilled"),
    task_run_name="distilled-{tag}",
    cache_policy=RUN_RESULTS,
    tags=GPU_TAGS,
    **IO_RETRIES,
)
def teacher_task(
    section: TeacherConfig, ctx: RunContext, teacher: ModelRef, records: list[Record], tag: str = "curated"
) -> StageManifest:
    """Teacher responses (SDFT rewrite when a reference exists), written incrementally; resumes after a
    kill. Plain-text records become text lines (`teacher.text_records: text`); when every record does,
    the teacher model is not loaded."""
    ran = ctx.precision()
    asked = [r for r in records if not learned_as_text(r, section.text_records)]

    def build(work: Path) -> dict[str, Any]:
        model: Teacher | None
        if not asked:  # nothing to generate: the tokenizer alone (the stage reads no model weights)
            model, tok = None, load_tokenizer(teacher.path)
        elif section.backend == "vllm":
            check_teacher_backend(section, ctx.device)
            evict_shared_model()  # vLLM sizes its cache from the memory free when it starts
            tok = load_tokenizer(teacher.path)
            free, total = torch.cuda.mem_get_info()
            budget = resolve_max_new_tokens(tok, asked, section)
            engine = vllm_engine_settings(section, ctx.memory_budget, budget, free, total)
            logger().info("teacher (vllm): %s", engine)
            model = VLLMGenerator(
                teacher.path, ran.dtype if ctx.model_dtype != "auto" else "auto", ctx.seed, **engine
            )
        else:
            device_map = "auto" if section.device_map == "auto" else None
            model, tok = private_model(teacher.path, ran.device, ran.dtype, device_map=device_map)
        inputs = DistillInputs(teacher=model, tokenizer=tok, records=records)
        return core.run(inputs, section, ctx.stage_context(ran), work, Progress(f"teacher ({tag})"))

    return run_cached(
        ctx.store, distilled_key(section, ctx, teacher.sha256, records, ran), build, resume=True
    )


def check_teacher_backend(section: TeacherConfig, device: str) -> None:
    """Refuse `teacher.backend: vllm` without the package or a CUDA device, before any work."""
    if section.backend != "vllm":
        return
    if "vllm" not in sys.modules and importlib.util.find_spec("vllm") is None:
        raise TeacherError(
            "teacher.backend: vllm needs the vllm package: pip install 'finescope[vllm]' (CUDA only); "
            "or set teacher.backend: hf"
        )
    if device == "cpu" or not torch.cuda.is_available():
        raise TeacherError(
            f"teacher.backend: vllm runs on CUDA only (device: {device}, CUDA available: "
            f"{torch.cuda.is_available()}); set teacher.backend: hf"
        )


FALLBACK_INFO = (
    "rejected",
    "fell_back",
    "dropped_by_reason",
    "max_new_tokens_used",
    "kept_teacher",
    "fell_back_to_reference",
    "dropped",
    "kept_text",
)
"""The distilled stage's info fields that say how much of the data is the teacher's, and why not."""


def distillation_info(distilled: StageManifest) -> dict[str, Any]:
    """The teacher's keep / fallback counts by reason from a distilled manifest (for metrics.json)."""
    return {k: distilled.info[k] for k in FALLBACK_INFO if k in distilled.info}
