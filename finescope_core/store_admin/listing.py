"""What `finescope store ls` shows: a store's committed artifacts, leftovers, results and the rest.

The types here are the listing's vocabulary; `scanning.scan` fills a `StoreListing` from the store,
`gc` decides from it what to collect.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

RESULTS_DIR = "prefect-results"
"""Where Prefect's persisted task results go inside a store (`flows.runtime` writes them there)."""
OUTPUTS_DIR = "outputs"
"""Where runs without an `output` export theirs (`<store>/outputs/<name>/`): listed, never collected."""


@dataclass(frozen=True)
class StoredArtifact:
    """A committed artifact as `ls` shows it: its marker's record, and its size in the store."""

    stage: str
    key: str
    uri: str
    size: int
    files: int
    record: dict[str, Any]

    @property
    def created(self) -> float:
        return float(self.record.get("created", 0.0))

    @property
    def description(self) -> str:
        return describe(self.record)


@dataclass(frozen=True)
class Leftover:
    """Something that is not a committed artifact: a work dir, an unfinished commit, a write probe.

    `path` is a local path for a work dir (they live on the machine that ran the stage) and a path in
    the store's filesystem otherwise.
    """

    kind: str
    stage: str
    key: str
    path: str
    size: int
    modified: float
    in_use: bool = False


@dataclass(frozen=True)
class StoredFile:
    path: str
    size: int
    modified: float


@dataclass
class StoreListing:
    """Everything under a store's root, sorted into artifacts, leftovers, Prefect results and the rest."""

    uri: str
    artifacts: list[StoredArtifact] = field(default_factory=list)
    leftovers: list[Leftover] = field(default_factory=list)
    results: list[StoredFile] = field(default_factory=list)
    outputs: list[StoredFile] = field(default_factory=list)
    """Exported run outputs: the user's, so gc never touches them (`rm -r <store>/outputs/<name>`)."""
    other: list[StoredFile] = field(default_factory=list)

    def by_stage(self) -> dict[str, list[StoredArtifact]]:
        out: dict[str, list[StoredArtifact]] = {}
        for a in sorted(self.artifacts, key=lambda a: (a.stage, a.created)):
            out.setdefault(a.stage, []).append(a)
        return out

    def to_json(self) -> dict[str, Any]:
        """The listing for `finescope store ls --json`: sizes in bytes, times in seconds since the epoch."""
        stages = {
            stage: {
                "count": len(arts),
                "size": sum(a.size for a in arts),
                "artifacts": [
                    {
                        "key": a.key,
                        "uri": a.uri,
                        "size": a.size,
                        "files": a.files,
                        "created": a.created,
                        "description": a.description,
                    }
                    for a in arts
                ],
            }
            for stage, arts in self.by_stage().items()
        }
        return {
            "uri": self.uri,
            "stages": stages,
            "total": {"count": len(self.artifacts), "size": sum(a.size for a in self.artifacts)},
            "leftovers": [
                {
                    "kind": x.kind,
                    "stage": x.stage,
                    "key": x.key,
                    "path": x.path,
                    "size": x.size,
                    "modified": x.modified,
                    "in_use": x.in_use,
                }
                for x in self.leftovers
            ],
            "leftovers_size": sum(x.size for x in self.leftovers),
            "prefect_results": {"files": len(self.results), "size": sum(f.size for f in self.results)},
            "outputs": {"files": len(self.outputs), "size": sum(f.size for f in self.outputs)},
            "other": {"files": len(self.other), "size": sum(f.size for f in self.other)},
        }


def describe(record: dict[str, Any], limit: int = 100) -> str:
    """A one-line summary of an artifact's record: its small info values, then its small config values."""
    info = record.get("info") or {}
    config = record.get("config") or {}
    parts = [f"{k}={_compact(v)}" for k, v in info.items() if _small(v)]
    if isinstance(config, dict):
        parts += [f"{k}={_compact(v)}" for k, v in config.items() if _small(v) and k not in info]
    inputs = "+".join(record.get("inputs") or {})
    text = " ".join(parts) or (f"from {inputs}" if inputs else "-")
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _small(value: Any) -> bool:
    if isinstance(value, bool | int | float | str):
        return len(str(value)) <= 24
    return (
        isinstance(value, list) and len(value) <= 4 and all(isinstance(v, int | float | str) for v in value)
    )


def _compact(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return json.dumps(value, separators=(",", ":")) if isinstance(value, list) else str(value)


def artifacts_of(listing: StoreListing, stage: str, key_prefix: str | None = None) -> list[StoredArtifact]:
    """The committed artifacts of `stage` whose key starts with `key_prefix` (all of them without one)."""
    return [
        a
        for a in listing.artifacts
        if a.stage == stage and (key_prefix is None or a.key.startswith(key_prefix))
    ]


def human(size: float) -> str:
    """1536 -> '1.5 KiB'."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if size < 1024 or unit == "TiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} TiB"
