"""Structured pruning of attention heads and MLP channels, guided by data (paper §3.2.1, LLM-Pruner style).

Pipeline: `group_importance` (first-order Taylor scores per head / KV group / MLP channel, from the LM
loss on the pruning texts; `importance`) -> `plan_widths` (one width per unit type, the same in every
layer, that lands on the parameter ratio; among those, the one whose removed groups matter least;
`widths`) -> `build_plan` (which units each layer keeps, by its own scores; `plan`) -> `apply_pruning`
(sliced `nn.Linear`s + config; `apply`) -> `save_pruned` (a plain `save_pretrained` directory; `stage`,
with `prune_model`, the whole stage, and `run`, its entry). Parameters are counted by
`counts.count_parameters`.

Units are GQA-safe and keep `head_dim`, so RoPE is untouched (see `importance` for what each unit holds).
"""

from finescope_core.prune.apply import apply_pruning
from finescope_core.prune.batches import LMBatches, lm_batches
from finescope_core.prune.counts import PARAM_KEYS, count_parameters
from finescope_core.prune.errors import PruneError
from finescope_core.prune.importance import GroupScores, Method, group_importance
from finescope_core.prune.plan import PrunePlan, build_plan, plan_pruning
from finescope_core.prune.stage import (
    INFO,
    MODEL_DIR,
    REPORT_FILE,
    PruneInputs,
    prune_model,
    run,
    save_pruned,
)
from finescope_core.prune.widths import RATIO_TOLERANCE, AttentionUnit, WidthRule, Widths, plan_widths

__all__ = [
    "INFO",
    "MODEL_DIR",
    "PARAM_KEYS",
    "RATIO_TOLERANCE",
    "REPORT_FILE",
    "AttentionUnit",
    "GroupScores",
    "LMBatches",
    "Method",
    "PruneError",
    "PruneInputs",
    "PrunePlan",
    "WidthRule",
    "Widths",
    "apply_pruning",
    "build_plan",
    "count_parameters",
    "group_importance",
    "lm_batches",
    "plan_pruning",
    "plan_widths",
    "prune_model",
    "run",
    "save_pruned",
]
