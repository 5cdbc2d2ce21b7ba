"""The one progress callback every stage takes: `progress(done, total, **info)`.

Stages report after each batch or step; the orchestration layer decides how to show it (log lines,
Prefect progress artifacts). `info` carries what a stage knows beyond the count (`loss=0.41`,
`metric="perplexity"`); a callback may ignore it.
"""

from __future__ import annotations

from typing import Protocol


class Progress(Protocol):
    """Called after each unit of work: `done` of `total` units (total 0 when unknown)."""

    def __call__(self, done: int, total: int, /, **info: float | str) -> None: ...


def no_progress(done: int, total: int, /, **info: float | str) -> None:
    """The callback of a caller that does not watch."""
