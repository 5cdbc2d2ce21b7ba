"""The paper's comparison models beside the curated variant (`evaluate.baselines`, its Table 1): the
`generic` baseline's records from `evaluate.generic_file`, and `base_tuned`, the unpruned base model tuned
on the curated variant's distilled data with the same recipe (no prune stage).

`random` and `corpus` draw from the training pool (`flows.specialize.baseline_training`); every variant
that prunes runs the curated variant's stages on its own data.
"""

from __future__ import annotations

from finescope_core.config import EvalConfig, FinescopeConfig
from finescope_core.data import Record, load_records
from finescope_core.finetune_choice import MethodChoice
from finescope_core.memplan import check_memory
from tasks.caching import StageManifest
from tasks.context import RunContext, storage_options
from tasks.finetune import finetune_task
from tasks.models import ModelRef
from tasks.planning import plannable
from tasks.prune import baseline_records

PRUNED_BASELINES = ("random", "corpus", "generic")
"""Baselines that prune and tune on their own data (the others reuse the curated variant's)."""
GENERIC_ROLE = "evaluate.generic_file"


def check_baselines(config: FinescopeConfig) -> None:
    """Preflight of the baselines, before any model work: a missing, empty or malformed
    `evaluate.generic_file` (naming file, line and field), and `base_tuned`'s tuning of the unpruned model
    above the memory budget (the same method as the pruned model's, on every weight the base holds).

    Raises:
        DataError: the generic file cannot be read or holds no records.
        MemoryBudgetError: tuning the unpruned base is predicted above the budget.
    """
    ev = config.evaluate
    if "generic" in ev.baselines and ev.generic_file is not None:
        load_records([ev.generic_file], role=GENERIC_ROLE, storage_options=storage_options(config))
    if "base_tuned" in ev.baselines:
        unpruned = config.model_copy(update={"prune": config.prune.model_copy(update={"ratio": 0.0})})
        check_memory(unpruned, stages=("tuned",))


@plannable
def generic_records(section: EvalConfig, ctx: RunContext, curated: list[Record]) -> list[Record]:
    """The `generic` baseline's records: a seeded sample of `generic_file` as large as the curated set
    (`curated`), in file order; its texts score pruning and the teacher answers it, as for any variant."""
    assert section.generic_file is not None, "EvalConfig refuses generic without generic_file"
    records = load_records([section.generic_file], role=GENERIC_ROLE, storage_options=ctx.storage_options())
    return baseline_records("random", records.records, len(curated), ctx.seed)


def base_tuned(
    config: FinescopeConfig,
    ctx: RunContext,
    base: ModelRef,
    teacher: ModelRef,
    distilled: StageManifest,
    choice: MethodChoice,
) -> StageManifest:
    """`tuned-base_tuned`: the unpruned base tuned on the curated variant's `distilled` data, with the
    curated variant's settings (method, rate, distillation from the same teacher)."""
    kd_teacher = teacher if config.finetune.kd_weight > 0 else None
    return finetune_task(
        config.finetune,
        ctx,
        base,
        distilled,
        "base_tuned",
        kd_teacher,
        config.teacher.device_map,
        choice.to_json(),
    )
