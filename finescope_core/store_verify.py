"""`finescope store verify`: check every committed artifact of a store against its marker.

A run checks each artifact it reuses cheaply (size and mtime, sha256 where they moved). This checks
them all, hashing every file of a local store, so damage is found before a run needs the artifact.
An object store is checked by listing (presence and size): its files are hashed whenever a run
downloads them, and hashing here would mean downloading the whole store.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from finescope_core.store import Artifact, ArtifactStore
from finescope_core.store_admin import StoreListing, scan


@dataclass(frozen=True)
class CheckedArtifact:
    """One artifact as `verify` found it: `problems` empty when sound."""

    stage: str
    key: str
    uri: str
    files: int
    problems: list[str]


@dataclass
class VerifyReport:
    """Every committed artifact of a store, checked."""

    uri: str
    full: bool
    checked: list[CheckedArtifact] = field(default_factory=list)

    @property
    def damaged(self) -> list[CheckedArtifact]:
        return [c for c in self.checked if c.problems]

    def to_json(self) -> dict[str, Any]:
        return {
            "uri": self.uri,
            "full": self.full,
            "checked": len(self.checked),
            "damaged": [
                {"stage": c.stage, "key": c.key, "uri": c.uri, "problems": c.problems} for c in self.damaged
            ],
        }


def verify_store(
    store: ArtifactStore,
    listing: StoreListing | None = None,
    *,
    full: bool = True,
    progress: Callable[[int, int], None] | None = None,
) -> VerifyReport:
    """Check each committed artifact's files against its marker.

    Args:
        full: hash every file of a local store (else size and mtime, hashing only files whose mtime moved).
        progress: called with (done, total) after each artifact.
    """
    listing = listing if listing is not None else scan(store)
    report = VerifyReport(store.uri, full)
    total = len(listing.artifacts)
    for i, a in enumerate(sorted(listing.artifacts, key=lambda a: (a.stage, a.key)), 1):
        if not isinstance(a.record.get("files"), dict):  # `scan` keeps an unreadable marker as {}
            problems = ["_COMPLETE.json: unreadable, or lists no files"]
        else:
            problems = store.verify(Artifact(a.stage, a.key, a.uri, a.record), full=full)
        report.checked.append(
            CheckedArtifact(a.stage, a.key, a.uri, len(a.record.get("files") or {}), problems)
        )
        if progress is not None:
            progress(i, total)
    return report
