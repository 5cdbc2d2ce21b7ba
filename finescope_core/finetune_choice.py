"""`finetune.method: auto` (and `finetune.lr: auto`) resolved once, before any work, from the config and
the model's config (no weights loaded): full tuning when the memory planner predicts that the `tuned`
stage with every weight trained fits the memory budget with `AUTO_MARGIN` to spare, else LoRA.

The resolved method and rate replace `auto` in the config the run goes on with, so the `tuned` key holds
them: an `auto` that resolves to `full` has the key of an explicit `full`.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from typing import Any, Literal

import psutil

from finescope_core.config import FinescopeConfig
from finescope_core.memplan import GB, memory_budget, memory_plan

AUTO_MARGIN = 0.2
"""Share of the budget `auto` leaves unused when it picks full tuning: the planner's error on a real run
(`bench/bench_memory.py`), allocator fragmentation, and on a CPU other processes' growth while the run
goes on. Full tuning is picked when its predicted peak is at most (1 - AUTO_MARGIN) x the budget."""


@dataclass(frozen=True)
class MethodChoice:
    """How `finetune.method` and `finetune.lr` were resolved, and why (logged, in run.json and in the
    `tuned` stage's `finetune.json`)."""

    requested: str
    """`finetune.method` as configured: `auto`, `lora` or `full`."""
    method: Literal["lora", "full"]
    lr: float
    full_need: int | None
    """Predicted peak bytes of the `tuned` stage under full tuning (None: not predicted, the method was
    set in the config)."""
    budget: int | None
    """The budget `auto` compared with, in bytes (None: not needed)."""
    budget_source: str
    """Where the budget came from: `memory_budget`, `cuda free memory`, `available RAM` or `-`."""
    reason: str

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def auto_budget(cfg: FinescopeConfig) -> tuple[int, str]:
    """The bytes `auto` may plan for, and their source: `memory_budget`, else the CUDA device's free memory
    (`memplan.memory_budget`), else the machine's available RAM (psutil: free plus reclaimable cache)."""
    budget = memory_budget(cfg)
    if budget is not None:
        source = "memory_budget" if cfg.memory_budget is not None else "cuda free memory"
        return budget, source
    return int(psutil.virtual_memory().available), "available RAM"


def choose_method(cfg: FinescopeConfig) -> MethodChoice:
    """The method and learning rate the `tuned` stage runs with, and the reason."""
    f = cfg.finetune
    if f.method != "auto":
        return MethodChoice(f.method, f.method, f.learning_rate(), None, None, "-", "set in the config")
    full = cfg.model_copy(update={"finetune": f.model_copy(update={"method": "full"})})
    need = memory_plan(full).by_stage()["tuned"]
    budget, source = auto_budget(cfg)
    limit = int(budget * (1 - AUTO_MARGIN))
    method: Literal["lora", "full"] = "full" if need <= limit else "lora"
    relation = "fits" if method == "full" else "exceeds"
    reason = (
        f"full tuning needs about {need / GB:.2f} GB, which {relation} {1 - AUTO_MARGIN:.0%} of the "
        f"{budget / GB:.2f} GB budget ({source})"
    )
    rate = f.model_copy(update={"method": method}).learning_rate()
    return MethodChoice("auto", method, rate, need, budget, source, reason)


def resolve_finetune(cfg: FinescopeConfig) -> tuple[FinescopeConfig, MethodChoice]:
    """`cfg` with `finetune.method` and `finetune.lr` resolved (no `auto` left), and the choice (logged).
    A LoRA that does not fit either is the resolved config's preflight's to refuse (`check_memory`)."""
    choice = choose_method(cfg)
    section = cfg.finetune.model_copy(update={"method": choice.method, "lr": choice.lr})
    resolved = cfg.model_copy(update={"finetune": section})
    logging.getLogger("finescope").info(
        "finetune.method %s -> %s (lr %g): %s", choice.requested, choice.method, choice.lr, choice.reason
    )
    return resolved, choice
