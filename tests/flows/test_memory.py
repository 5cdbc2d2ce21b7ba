"""Memory discipline between stages: one shared model, private copies evict it, stages give memory
back when they end, an out-of-memory error fails at once with advice."""

from __future__ import annotations

import gc
import weakref
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from prefect import flow, task

import tasks.common as common
from finescope_core.memory import StageOutOfMemory
from finescope_core.store import ArtifactStore
from finescope_core.tiny import save_tiny, tiny_model
from tasks.common import IO_RETRIES, STORE_RETRIES, StageKey, cached_model, private_model, run_cached


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

    assert is_out_of_memory(RuntimeError("[enforce fail] DefaultCPUAllocator: can't allocate memory: you tried"))
    assert not is_out_of_memory(RuntimeError("shape mismatch"))
