"""`finetune.method: auto` and `finetune.lr: auto`: resolved once from the memory plan and the budget, into
the method and rate the `tuned` key holds; the choice and its reason in run.json and finetune.json."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import pytest

from finescope_core.config import FinescopeConfig, FinetuneConfig
from finescope_core.config.finetune import LR_FULL, LR_LORA
from finescope_core.finetune import lora_finetune
from finescope_core.finetune_choice import AUTO_MARGIN, choose_method, resolve_finetune
from finescope_core.memplan import GB, memory_plan
from finescope_core.tiny import byte_tokenizer, save_tiny, tiny_model
from tasks.context import RunContext
from tasks.export import RunRecord, run_manifest
from tasks.finetune import tuned_key


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    return str(save_tiny(tmp_path_factory.mktemp("choice") / "model", "llama"))


def config(model_dir: str, budget: float | None = None, **finetune: Any) -> FinescopeConfig:
    return FinescopeConfig(
        model=model_dir,
        seeds=["s.jsonl"],
        corpus=["c.jsonl"],
        device="cpu",
        model_dtype="float32",
        memory_budget=budget,
        finetune=finetune,
    )


def full_need(model_dir: str) -> int:
    """The `tuned` stage's predicted peak under full tuning: what `auto` compares with the budget."""
    return memory_plan(config(model_dir, method="full")).by_stage()["tuned"]


def test_auto_picks_lora_when_full_tuning_does_not_fit_the_budget(
    model_dir: str, caplog: pytest.LogCaptureFixture
) -> None:
    need = full_need(model_dir)
    # Full tuning fits the raw budget but not the margin: auto still picks LoRA.
    budget = need / (1 - AUTO_MARGIN / 2) / GB
    with caplog.at_level(logging.INFO, logger="finescope"):
        resolved, choice = resolve_finetune(config(model_dir, budget))
    assert (choice.method, choice.lr, choice.requested) == ("lora", LR_LORA, "auto")
    assert choice.full_need == need and choice.budget == int(budget * GB)
    assert choice.budget_source == "memory_budget"
    assert "exceeds" in choice.reason and f"{need / GB:.2f} GB" in choice.reason
    assert (resolved.finetune.method, resolved.finetune.lr) == ("lora", LR_LORA)
    assert "finetune.method auto -> lora" in caplog.text


def test_auto_picks_full_tuning_when_it_fits_with_the_margin(model_dir: str) -> None:
    need = full_need(model_dir)
    budget = need / (1 - AUTO_MARGIN) / GB * 1.01
    resolved, choice = resolve_finetune(config(model_dir, budget))
    assert (choice.method, choice.lr) == ("full", LR_FULL)
    assert "fits" in choice.reason
    assert (resolved.finetune.method, resolved.finetune.lr) == ("full", LR_FULL)


def test_auto_without_a_budget_on_a_cpu_reads_the_available_ram(
    model_dir: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    import finescope_core.finetune_choice as fc

    class Memory:
        available = 10**12

    monkeypatch.setattr(fc.psutil, "virtual_memory", lambda: Memory())
    choice = choose_method(config(model_dir))
    assert (choice.method, choice.budget, choice.budget_source) == ("full", 10**12, "available RAM")
    Memory.available = 1000
    assert choose_method(config(model_dir)).method == "lora"


def test_an_auto_that_resolves_to_full_has_the_key_of_an_explicit_full(model_dir: str) -> None:
    def key(cfg: FinescopeConfig) -> str:
        resolved, _ = resolve_finetune(cfg)
        return tuned_key(resolved.finetune, RunContext.of(resolved), "p", "d", "teacher").key

    roomy = full_need(model_dir) / GB * 10
    auto_full = key(config(model_dir, roomy))
    assert auto_full == key(config(model_dir, roomy, method="full"))
    assert auto_full == key(config(model_dir, None, method="full", lr=LR_FULL))
    auto_lora = key(config(model_dir, 1e-6))
    assert auto_lora == key(config(model_dir, None, method="lora", lr=LR_LORA))
    assert auto_lora != auto_full


def test_a_number_for_lr_wins_and_explicit_methods_are_not_planned(model_dir: str) -> None:
    _, choice = resolve_finetune(config(model_dir, 1e-6, lr=3e-3))
    assert (choice.method, choice.lr) == ("lora", 3e-3)
    _, explicit = resolve_finetune(config(model_dir, 1e-6, method="full"))
    assert (explicit.method, explicit.lr, explicit.full_need, explicit.reason) == (
        "full",
        LR_FULL,
        None,
        "set in the config",
    )


def test_old_configs_load_unchanged_and_auto_lr_needs_a_method() -> None:
    old = FinetuneConfig.model_validate({"method": "lora", "lr": 2e-4})
    assert (old.method, old.lr, old.learning_rate()) == ("lora", 2e-4, 2e-4)
    assert FinetuneConfig(method="full").learning_rate() == LR_FULL
    with pytest.raises(ValueError, match="finetune.method is still auto"):
        FinetuneConfig().learning_rate()
    with pytest.raises(ValueError):
        FinetuneConfig.model_validate({"lr": 0})


def test_run_json_and_finetune_json_carry_the_choice(model_dir: str, tmp_path: Path) -> None:
    cfg, choice = resolve_finetune(config(model_dir, 1e-6))
    record = RunRecord.of(cfg, choice.to_json())
    manifest = json.loads(run_manifest(record, "specialize", {}, 1.0, {}))
    assert manifest["finetune_method"]["method"] == "lora"
    assert manifest["finetune_method"]["reason"] == choice.reason
    assert manifest["config"]["finetune"]["method"] == "lora"

    rows = [{"prompt": "Add 2 and 3.", "response": "5"}] * 4
    section = cfg.finetune.model_copy(update={"rank": 4, "alpha": 8, "max_length": 64, "kd_weight": 0.0})
    out = tmp_path / "tuned"
    lora_finetune(tiny_model(), byte_tokenizer(), rows, section, out, method_choice=choice.to_json())
    written = json.loads((out / "finetune.json").read_text())
    assert written["method_choice"] == choice.to_json() and written["lr"] == LR_LORA


def test_the_core_refuses_an_unresolved_method(tmp_path: Path) -> None:
    from finescope_core.finetune.errors import FinetuneError

    with pytest.raises(FinetuneError, match="finetune.method: auto is resolved before the run"):
        lora_finetune(tiny_model(), byte_tokenizer(), [], FinetuneConfig(), tmp_path / "o")
