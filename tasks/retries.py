"""How stage tasks are retried: I/O trouble again, never bad input, a broken store or out of memory."""

from __future__ import annotations

from typing import Any

from finescope_core.memory import StageOutOfMemory, is_out_of_memory
from finescope_core.store import (
    StoreError,
    is_transient,
)


def _retry_transient(task: Any, task_run: Any, state: Any) -> bool:
    """Retry I/O trouble, never bad input or bad settings (ValueError), a broken store (StoreError) nor
    an out-of-memory error (the same settings on the same device fail again)."""
    try:
        state.result()
    except (ValueError, StoreError, StageOutOfMemory):
        return False
    except Exception as e:
        return not is_out_of_memory(e)
    return False


def _retry_storage_outage(task: Any, task_run: Any, state: Any) -> bool:
    """Retry a compute stage only when the store stayed unreachable through the store's own retries."""
    try:
        state.result()
    except Exception as e:
        return is_transient(e) and not is_out_of_memory(e)
    return False


IO_RETRIES: dict[str, Any] = dict(
    retries=3, retry_delay_seconds=[2, 10, 30], retry_condition_fn=_retry_transient
)
# Compute stages: a model or data error must fail at once, but a longer storage outage is worth waiting out.
STORE_RETRIES: dict[str, Any] = dict(
    retries=2, retry_delay_seconds=[30, 60], retry_condition_fn=_retry_storage_outage
)
GPU_TAGS = ["finescope-gpu"]
