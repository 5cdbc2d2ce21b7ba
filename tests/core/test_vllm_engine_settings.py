"""The vLLM teacher's engine settings come from the memory this process leaves, not vLLM's defaults."""

import pytest

from finescope_core.config import FinescopeConfig
from finescope_core.memplan import MemoryBudgetError, vllm_engine_settings

GB = 10**9


def config(**fields: object) -> FinescopeConfig:
    return FinescopeConfig(
        seeds=["s.jsonl"], corpus=["c.jsonl"], teacher={"max_prompt_length": 300}, **fields
    )


def test_share_follows_the_free_memory_and_never_exceeds_vllms_default() -> None:
    # 60 of 80 GB free (another process holds 20): vLLM's default 0.9 would fail its start-up check.
    assert vllm_engine_settings(*_run(config()), 200, 60 * GB, 80 * GB) == {
        "gpu_memory_utilization": 0.75,
        "max_model_len": 500,
    }
    assert vllm_engine_settings(*_run(config()), 200, 80 * GB, 80 * GB)["gpu_memory_utilization"] == 0.9


def test_memory_budget_caps_the_share() -> None:
    settings = vllm_engine_settings(*_run(config(memory_budget=20)), 64, 79 * GB, 80 * GB)
    assert settings == {"gpu_memory_utilization": 0.25, "max_model_len": 364}


def test_too_little_memory_is_refused_with_the_fixes() -> None:
    with pytest.raises(
        MemoryBudgetError, match=r"'distilled'.*1\.00 GB of the GPU's 80\.00 GB.*teacher\.backend: hf"
    ):
        vllm_engine_settings(*_run(config()), 128, 1 * GB, 80 * GB)


def _run(cfg):
    return cfg.teacher, cfg.memory_budget
