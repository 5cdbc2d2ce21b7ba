"""Per-batch progress, in the terminal and in Prefect."""

from __future__ import annotations

import time
from typing import Any
from uuid import UUID

from prefect.artifacts import create_progress_artifact, update_progress_artifact

from tasks.context import logger


class Progress:
    """Per-batch progress, shown in the terminal (a log line every ~10%) and in Prefect (a progress
    artifact)."""

    MIN_UPDATE_SECONDS = 2.0

    def __init__(self, what: str):
        self.what = what
        self.logged_decile = -1
        self.shown_pct = -1
        self.shown_at = float("-inf")
        self.start = time.perf_counter()
        self.artifact_id: UUID | None = None
        try:
            made = create_progress_artifact(0.0, description=f"{what}: 0 %")
            self.artifact_id = made if isinstance(made, UUID) else None  # sync call: an id, not a coroutine
        except Exception:  # no Prefect run context (a plain function call): terminal only
            self.artifact_id = None

    def __call__(self, done: int, total: int, /, **info: Any) -> None:
        """The `finescope_core.progress.Progress` protocol; `info` (loss, metric...) joins the log line."""
        if total <= 0:  # size unknown up front: no percentage to show
            return
        pct = min(100, int(100 * done / total))
        now = time.perf_counter()
        # Each update is an API call: at most one per MIN_UPDATE_SECONDS, so short batches stay cheap.
        if done >= total or (pct >= self.shown_pct + 2 and now - self.shown_at >= self.MIN_UPDATE_SECONDS):
            self.shown_at = now
            self._show(pct, done, total)
        if pct // 10 > self.logged_decile or done >= total:
            self.logged_decile = pct // 10
            detail = _short(f" {info}") if info else ""
            elapsed = time.perf_counter() - self.start
            logger().info("%s: %d/%d (%d%%, %.0fs)%s", self.what, done, total, pct, elapsed, detail)

    def _show(self, pct: int, done: int, total: int) -> None:
        self.shown_pct = pct
        if self.artifact_id is None:
            return
        try:
            # The value in the description too: the UI's artifact list shows the description, not the bar.
            shown = f"{self.what}: {pct} % ({done}/{total})"
            update_progress_artifact(self.artifact_id, float(pct), description=shown)
        except Exception:  # the UI is a convenience; never fail a stage over it
            self.artifact_id = None


def _short(text: str, limit: int = 160) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."
