"""Memory discipline between stages: one shared model, private copies evict it, stages give memory
back when they end, an out-of-memory error fails at once with advice."""

from __future__ import annotations

import gc
import json
import weakref
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from prefect import flow, task

import tasks.models as common
from finescope_core.memory import StageOutOfMemory
from finescope_core.store import ArtifactStore
from finescope_core.tiny import save_tiny, tiny_model
from tasks.caching import run_cached
from tasks.keymodels import StageKey
from tasks.models import cached_model, private_model
from tasks.retries import IO_RETRIES, STORE_RETRIES


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str]:
    root = tmp_path_factory.mktemp("memory")
    a = save_tiny(root / "a", "llama", seed=0)
    b = save_tiny(root / "b", "llama", seed=1)
    return str(a), str(b)


@pytest.fixture(autouse=True)
def no_shared_model() -> Iterator[None]:
    common.evict_shared_model()
    yield
    common.evict_shared_model()


@pytest.fixture
def no_automatic_gc() -> Iterator[None]:
    """Only an explicit collection breaks cycles meanwhile, so the test sees who ran one."""
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


def test_shared_model_is_one_copy(models: tuple[str, str], no_automatic_gc: None) -> None:
    a, b = models
    first = weakref.ref(cached_model(a, "cpu")[0])
    assert cached_model(a, "cpu")[0] is first(), "the same model is served again"
    cached_model(b, "cpu")
    assert first() is None, "loading another model evicted the first: never two shared copies"


def test_private_copy_evicts_the_shared_one(models: tuple[str, str], no_automatic_gc: None) -> None:
    a, _ = models
    shared = weakref.ref(cached_model(a, "cpu")[0])
    own, _tok = private_model(a, "cpu")
    assert shared() is None and own is not None


def test_a_stage_gives_its_memory_back_when_it_ends(tmp_path: Path, no_automatic_gc: None) -> None:
    held: list[weakref.ref[Any]] = []

    def build(work: Path) -> dict[str, Any]:
        model = tiny_model("llama")
        model.__dict__["_cycle"] = [model]  # a cycle: freed only by the cycle collector
        held.append(weakref.ref(model))
        (work / "x.txt").write_text("x")
        return {}

    run_cached(ArtifactStore(str(tmp_path / "store")), StageKey("probe", "1", {}, {}), build)
    assert held and held[0]() is None


def test_out_of_memory_becomes_advice_and_is_never_retried(tmp_path: Path) -> None:
    store = ArtifactStore(str(tmp_path / "store"))
    calls: list[int] = []

    def build(work: Path) -> dict[str, Any]:
        calls.append(1)
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    for retries in (IO_RETRIES, STORE_RETRIES):

        @task(**{**retries, "retry_delay_seconds": 0})
        def stage() -> None:
            run_cached(store, StageKey("finetuned", "1", {}, {}), build)

        @flow
        def run() -> None:
            stage()

        calls.clear()
        with pytest.raises(StageOutOfMemory) as raised:
            run()
        assert len(calls) == 1, f"retried as if it were I/O: {len(calls)} attempts"
        message = str(raised.value)
        assert "'finetuned'" in message and "Tried to allocate 2.00 GiB" in message
        assert message.index("gradient_checkpointing") < message.index("finetune.method: lora")
    assert store.lookup("finetuned", StageKey("finetuned", "1", {}, {}).key) is None


def test_cpu_allocator_failure_is_out_of_memory_too() -> None:
    from finescope_core.memory import is_out_of_memory

    assert is_out_of_memory(
        RuntimeError("[enforce fail] DefaultCPUAllocator: can't allocate memory: you tried")
    )
    assert not is_out_of_memory(RuntimeError("shape mismatch"))


# ------------------------------------------------------------------------------------------- budget


def _workspace(root: Path) -> Path:
    save_tiny(root / "model", "qwen2", hidden=64, layers=2, heads=8, kv_heads=4, intermediate=256)
    rows = [
        {"id": f"q{i}", "instruction": f"What is {i} plus {i + 1}?", "output": f"{2 * i + 1}"}
        for i in range(40)
    ]
    (root / "corpus.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (root / "seeds.jsonl").write_text(
        json.dumps({"instruction": "What is 100 plus 7?", "output": "107"}) + "\n"
    )
    return root


def test_too_small_budget_is_refused_before_any_model_load(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from transformers import AutoModelForCausalLM

    from finescope_core.config import FinescopeConfig
    from finescope_core.memplan import memory_plan
    from flows.cli import main

    root = _workspace(tmp_path)
    cfg = FinescopeConfig(
        model=str(root / "model"),
        seeds=[str(root / "seeds.jsonl")],
        corpus=[str(root / "corpus.jsonl")],
        store=str(root / "store"),
        device="cpu",
        curate={"final_size": 20, "top_m": 20},
        # pinned: under `auto` a budget too small for full tuning picks LoRA instead of refusing the run
        finetune={"method": "full"},
    )
    stages = memory_plan(cfg).stages
    biggest = max(stages, key=lambda s: s.peak)
    budget_gb = biggest.peak * 0.99 / 1e9
    first_over = next(s for s in stages if s.peak > budget_gb * 1e9)
    loads: list[Any] = []
    real = AutoModelForCausalLM.from_pretrained
    monkeypatch.setattr(
        AutoModelForCausalLM, "from_pretrained", lambda *a, **k: loads.append(a) or real(*a, **k)
    )
    cfg_file = tmp_path / "cfg.json"
    cfg_file.write_text(cfg.model_dump_json())
    assert main(["store", "plan", "--config", str(cfg_file)]) == 0
    planned = [line.split() for line in capsys.readouterr().out.splitlines()]
    peak = {line[1]: line[2] for line in planned if len(line) > 3 and line[3] == "GB"}
    assert peak["pruned"] == f"{memory_plan(cfg).by_stage()['pruned'] / 1e9:.2f}", (
        "store plan shows each stage's peak"
    )
    code = main(
        ["run", "--config", str(cfg_file), "--out", str(tmp_path / "out"), "--memory_budget", str(budget_gb)]
    )
    err = capsys.readouterr().err
    assert code == 2 and loads == [], "refused before any model was loaded"
    message = err[err.index("finescope: error:") :]
    assert f"stage {first_over.name!r} needs about {first_over.peak / 1e9:.2f} GB" in message
    assert f"the memory budget is {budget_gb:.2f} GB" in message
    assert message.index("gradient_checkpointing") < message.index("finetune.method: lora")
    assert not (root / "store" / "pruned").exists()


def test_plan_counts_parameters_exactly_and_grows_with_the_settings() -> None:
    from finescope_core.config import FinescopeConfig
    from finescope_core.memplan import plan_memory
    from finescope_core.tiny import tiny_config

    config = tiny_config("llama", hidden=64, layers=2, heads=8, kv_heads=4, intermediate=256)
    params = sum(
        p.numel()
        for p in tiny_model("llama", hidden=64, layers=2, heads=8, kv_heads=4, intermediate=256).parameters()
    )

    def peaks(**fields: Any) -> dict[str, int]:
        cfg = FinescopeConfig(seeds=["s"], corpus=["c"], device="cpu", model_dtype="float32", **fields)
        plan = plan_memory(cfg, config)
        assert plan.model_bytes == params * 4
        return plan.by_stage()

    base = peaks()
    assert peaks(finetune={"gradient_checkpointing": True})["tuned"] < base["tuned"]
    # Full tuning's optimiser states outweigh LoRA's where activations are small; at long batches on a
    # tiny model the float32 LoRA branches' saved inputs (`_lora_inputs`) can outweigh them.
    short = {"batch_size": 1, "max_length": 16}
    assert (
        peaks(finetune={"method": "full", **short})["tuned"]
        > peaks(finetune={"method": "lora", **short})["tuned"]
    )
    assert base["tuned"] == peaks(finetune={"method": "full"})["tuned"], "unresolved auto: planned as full"
    assert peaks(finetune={"kd_weight": 0.0})["tuned"] < base["tuned"]
    assert peaks(prune={"batch_size": 8})["pruned"] > base["pruned"]
