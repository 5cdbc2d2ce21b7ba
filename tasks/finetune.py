"""Task of the `tuned` stage: LoRA (or full) tuning of the pruned model on the distilled data, with
logit distillation from the teacher when `finetune.kd_weight > 0`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from finescope_core import finetune as core
from finescope_core.config import FinetuneConfig
from finescope_core.distilled import DISTILLED_FILE
from finescope_core.finetune import MERGED_DIR, TuneInputs
from finescope_core.model import load_model
from tasks.caching import RUN_RESULTS, StageManifest, artifact_dir, run_cached
from tasks.context import RunContext
from tasks.identity import Precision
from tasks.keymodels import ModelStageKey, StageKey
from tasks.models import ModelRef, private_model
from tasks.progress import Progress
from tasks.registry import Stage, model_path, stage_task, variant_label
from tasks.retries import GPU_TAGS, STORE_RETRIES


class TunedKey(ModelStageKey):
    """`tuned`: every tuning setting, on the pruned model, the distilled data and (with KD) the teacher
    model."""

    STAGE = "tuned"
    # 2: Trainer loop (warm-up + cosine, best epoch), logit distillation, method lora | full
    # 3: finetune.json records how the method was chosen (`method_choice`); lr and method come resolved
    VERSION = "3"
    CONFIG = {"finetune": "finetune", "seed": "seed"}
    CODE = ("finescope_core.finetune", "finescope_core.distilled", "finescope_core.model")

    finetune: dict[str, Any]
    seed: int


def tuned_key(
    section: FinetuneConfig,
    ctx: RunContext,
    pruned_sha: str,
    distilled_sha: str,
    teacher_sha: str | None = None,
    precision: Precision | None = None,
) -> StageKey:
    """The `tuned` key; the teacher's content hash is an input exactly when the loss reads the teacher.

    Raises:
        ValueError: `finetune.kd_weight > 0` without the teacher's hash.
    """
    inputs = {"pruned": pruned_sha, "distilled": distilled_sha}
    if section.kd_weight > 0:
        if teacher_sha is None:
            raise ValueError("finetune.kd_weight > 0: the tuned key needs the teacher model's hash")
        inputs["teacher"] = teacher_sha
    return TunedKey.of(ctx.settings(finetune=section), inputs, precision).spec()


TUNED = Stage(
    "tuned",
    TunedKey,
    upstream=("pruned", "distilled", "models"),
    core=core.run,
    files=(MERGED_DIR, core.ADAPTER_DIR, core.SUMMARY_FILE),
    model_dir=MERGED_DIR,
)


@stage_task(
    TUNED,
    label=variant_label("tuned"),
    task_run_name="tuned-{tag}",
    cache_policy=RUN_RESULTS,
    tags=GPU_TAGS,
    **STORE_RETRIES,
)
def finetune_task(
    section: FinetuneConfig,
    ctx: RunContext,
    pruned: StageManifest | ModelRef,
    distilled: StageManifest,
    tag: str = "curated",
    teacher: ModelRef | None = None,
    teacher_device_map: str | None = None,
    choice: dict[str, Any] | None = None,
) -> StageManifest:
    """Tune the pruned model with the distilled data (KD from `teacher` when `finetune.kd_weight > 0`);
    the merged model (plain HF directory) and, for LoRA, the adapter. `pruned` is the pruned model's
    artifact, or a model itself (the unpruned base for the `base_tuned` baseline). `section` comes with
    its method resolved (`finescope_core.finetune_choice.resolve_finetune`); `choice` (how, and why)
    goes into `finetune.json`, not into the key: the key holds the resolved method itself."""
    store = ctx.store
    use_teacher = section.kd_weight > 0
    if use_teacher and teacher is None:
        raise ValueError("finetune.kd_weight > 0 needs the teacher model (tasks.teacher.teacher_ref)")
    ran = ctx.precision()

    def build(work: Path) -> dict[str, Any]:
        student = pruned.path if isinstance(pruned, ModelRef) else str(model_path(store, pruned))
        model, tok = private_model(student, ran.device, ran.dtype)
        teacher_model = None
        if use_teacher and teacher is not None:  # the student stays: `load_model`, not `private_model`
            device_map = "auto" if teacher_device_map == "auto" else None
            teacher_model, _ = load_model(
                teacher.path, device=ran.device, dtype=ran.dtype, device_map=device_map
            )
        inputs = TuneInputs(
            model=model,
            tokenizer=tok,
            distilled=artifact_dir(store, distilled) / DISTILLED_FILE,
            teacher=teacher_model,
            method_choice=choice,
        )
        return core.run(inputs, section, ctx.stage_context(ran), work, Progress(f"finetune ({tag})"))

    teacher_sha = teacher.sha256 if teacher is not None else None
    key = tuned_key(section, ctx, pruned.sha256, distilled.sha256, teacher_sha, ran)
    return run_cached(store, key, build)
