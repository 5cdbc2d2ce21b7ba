"""The one progress callback every stage takes: `progress(done, total, **info)`.

Stages report after each batch or step; the orchestration layer decides how to show it (log lines,
Prefect progress artifacts). `info` carries what a stage knows beyond the count (`loss=0.41`,
`metric="perplexity"`, or one value per layer for stages that train every layer at once:
`fvu=[0.12, 0.3]`); a callback may ignore it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

Info = float | str | Sequence[float]
"""A value a stage reports beside the count."""


class Progress(Protocol):
    """Called after each unit of work: `done` of `total` units (total 0 when unknown)."""

    def __call__(self, done: int, total: int, /, **info: Info) -> None: ...


def no_progress(done: int, total: int, /, **info: Info) -> None:
    """The callback of a caller that does not watch."""
