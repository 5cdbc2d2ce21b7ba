"""The `recovered` stage's predicted peak, added to `memplan`'s plan of a run.

Kept beside `memplan` rather than in it: `memplan` is part of the `distilled` stage's code identity
(`tasks.teacher` reads its vLLM settings), so editing it would recompute every stored teacher run.
"""

from __future__ import annotations

from finescope_core.config import FinescopeConfig
from finescope_core.memplan import (
    ADAM_STATES,
    DTYPE_BYTES,
    LOAD_OVERHEAD,
    MemoryBudgetError,
    MemoryPlan,
    Shapes,
    StagePeak,
    _dtype_name,
    _lora_params,
    memory_plan,
)
from finescope_core.model import model_config


def recovery_peak(cfg: FinescopeConfig, s: Shapes, teacher: Shapes) -> StagePeak:
    """The student (pruned) in training as `finetune.method` says (LoRA adapters, or every weight with
    AdamW moments and float32 master weights under a 16-bit dtype), its autograd activations over a
    packed micro-batch (`recover.batch_size` x `recover.max_length`) with the float32 logits, and the
    teacher's weights and no-grad forward over the same tokens."""
    elem = DTYPE_BYTES[_dtype_name(cfg)]
    kept = 1 - cfg.prune.ratio
    params = int(s.params * kept)
    if cfg.finetune.method == "lora":
        training = _lora_params(s, cfg.finetune.rank, kept) * 4 * (2 + ADAM_STATES)
    else:
        training = params * (elem + 4 * ADAM_STATES + (4 if elem != 4 else 0))
    tokens = cfg.recover.batch_size * cfg.recover.max_length
    parts = {
        "weights": int(params * elem * (1 + LOAD_OVERHEAD)),
        "training": training,
        "activations": s.train_activations(tokens, elem),
        "teacher": int(teacher.params * elem * (1 + LOAD_OVERHEAD))
        + teacher.inference_activations(tokens, elem),
    }
    return StagePeak("recovered", parts)


def run_memory_plan(cfg: FinescopeConfig) -> MemoryPlan:
    """`memplan.memory_plan` with the `recovered` stage before `tuned` when `recover.tokens > 0`."""
    plan = memory_plan(cfg)
    if cfg.recover.tokens == 0:
        return plan
    s = Shapes.of(model_config(cfg.model))
    teacher = s if cfg.teacher.model == "base" else Shapes.of(model_config(cfg.teacher.model))
    stages = []
    for stage in plan.stages:
        if stage.name == "tuned":
            stages.append(recovery_peak(cfg, s, teacher))
        stages.append(stage)
    return MemoryPlan(tuple(stages), plan.model_bytes, plan.budget, plan.notes)


def check_run_memory(cfg: FinescopeConfig) -> MemoryPlan:
    """`memplan.check_memory` of a whole run, the `recovered` stage included.

    Raises:
        MemoryBudgetError: naming the stage, its predicted need, the budget and the fixes in order.
    """
    plan = run_memory_plan(cfg)
    reason = plan.refusal()
    if reason is not None:
        raise MemoryBudgetError(reason)
    return plan
