"""Giving memory back between stages, and what to say when a stage runs out of it.

A stage's model and tensors are freed when their last reference goes, but a model holds reference
cycles (modules, hooks, closures) that only the cycle collector breaks, the CUDA caching allocator
keeps freed blocks for the process, and glibc keeps freed heap pages below its mmap threshold. So
after a stage drops its references, `release_memory` runs all three, and the next stage starts from
what the process really holds.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import gc
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import torch

T = TypeVar("T")

OOM_FIXES = (
    "finetune.gradient_checkpointing: true",
    "a smaller micro-batch (prune.batch_size, finetune.batch_size with a larger finetune.grad_accum, "
    "teacher.batch_size, curate.batch_size)",
    "finetune.method: lora instead of full",
    "teacher.device_map: auto (or the teacher on a second GPU)",
    "teacher.backend: hf instead of vllm",
)
"""What frees the most for the least change, in the order worth trying."""


class StageOutOfMemory(RuntimeError):
    """A stage ran out of memory. Never retried: the same settings on the same device fail again."""


def release_memory() -> None:
    """Break reference cycles, hand the CUDA allocator's cached blocks back, and trim the C heap."""
    gc.collect()
    if torch.cuda.is_available():  # a no-op until CUDA is initialised
        torch.cuda.empty_cache()
    _malloc_trim()


@functools.cache
def _libc() -> ctypes.CDLL | None:
    if not sys.platform.startswith("linux"):
        return None
    name = ctypes.util.find_library("c")
    try:
        lib = ctypes.CDLL(name)
    except OSError:
        return None
    return lib if hasattr(lib, "malloc_trim") else None


def _malloc_trim() -> None:
    """glibc only: return free heap pages to the system (elsewhere the allocator does it or cannot)."""
    lib = _libc()
    if lib is not None:
        lib.malloc_trim(0)


def is_out_of_memory(error: BaseException) -> bool:
    """A torch allocation failure on any device (CUDA's `OutOfMemoryError`, the CPU allocator's
    RuntimeError) or Python's MemoryError."""
    if isinstance(error, torch.OutOfMemoryError | MemoryError | StageOutOfMemory):
        return True
    return isinstance(error, RuntimeError) and "DefaultCPUAllocator: can't allocate memory" in str(error)


def out_of_memory(stage: str, error: BaseException) -> StageOutOfMemory:
    """The error a stage raises instead of an allocation failure: what failed, and the fixes in order."""
    fixes = "; ".join(f"({i}) {fix}" for i, fix in enumerate(OOM_FIXES, start=1))
    return StageOutOfMemory(
        f"stage {stage!r} ran out of memory ({type(error).__name__}: {_first_line(error)}). "
        f"Fixes, in order: {fixes}"
    )


def _first_line(error: BaseException) -> str:
    lines = str(error).splitlines()
    return lines[0][:200] if lines else ""


def build_releasing(stage: str, build: Callable[[Path], T], work: Path) -> T:
    """`build(work)`, then the memory its models and tensors held given back (`release_memory`), so the
    next stage starts from what the process really holds. An allocation failure becomes a
    `StageOutOfMemory` with advice, raised without the failed frames (they hold the stage's tensors)."""
    try:
        return build(work)
    except Exception as e:
        if not is_out_of_memory(e) or isinstance(e, StageOutOfMemory):
            raise
        error = out_of_memory(stage, e)
    finally:
        release_memory()
    release_memory()  # the failed frames are gone now: what they held can go too
    raise error
