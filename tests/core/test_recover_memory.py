"""The memory plan predicts the `recovered` stage (student training + teacher forward) when it runs."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from finescope_core.config import FinescopeConfig
from finescope_core.memplan import MemoryBudgetError, Shapes
from finescope_core.memplan_recover import check_run_memory, run_memory_plan
from finescope_core.model import model_config
from finescope_core.tiny import save_tiny


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny(tmp_path_factory.mktemp("mem") / "m", "llama", hidden=64, layers=2, heads=8, kv_heads=4)


def _cfg(model: Path, **fields: Any) -> FinescopeConfig:
    return FinescopeConfig(
        model=str(model), seeds=["s"], corpus=["c"], device="cpu", model_dtype="float32", **fields
    )


def test_the_stage_is_planned_before_tuned_only_when_it_runs(model: Path) -> None:
    off = run_memory_plan(_cfg(model, recover={"tokens": 0}))
    assert "recovered" not in off.by_stage()
    lora = {"method": "lora"}  # the phase tunes as `finetune.method` says; full is compared below
    on = run_memory_plan(_cfg(model, recover={"tokens": 1000}, finetune=lora))
    names = [s.name for s in on.stages]
    assert names.index("recovered") == names.index("tuned") - 1
    peak = on.by_stage()["recovered"]
    s = Shapes.of(model_config(str(model)))
    assert peak > s.params * 4 * (1 + 0.8)  # the teacher and the 80 % student, at least
    bigger = run_memory_plan(_cfg(model, recover={"tokens": 1000, "batch_size": 16}, finetune=lora))
    assert bigger.by_stage()["recovered"] > peak
    full = run_memory_plan(_cfg(model, recover={"tokens": 1000}, finetune={"method": "full"}))
    assert full.by_stage()["recovered"] > peak


def test_a_budget_below_it_is_refused_naming_it(model: Path) -> None:
    cfg = _cfg(model, recover={"tokens": 1000, "batch_size": 64, "max_length": 512})
    peaks = run_memory_plan(cfg).by_stage()
    assert peaks["recovered"] == max(peaks.values())
    budget = (peaks["recovered"] - 1) / 1e9
    with pytest.raises(MemoryBudgetError, match="stage 'recovered'"):
        check_run_memory(cfg.model_copy(update={"memory_budget": budget}))
