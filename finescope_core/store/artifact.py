"""What a committed artifact is: its content-addressed key, its marker and its version directories.

An artifact lives at `<stage>/<key>/` and exists for readers only once its marker, `MARKER`, is
there. The marker lists every file with its sha256 (and sizes, mtimes) and, when the files lie in a
version directory `<stage>/<key>/v-<id>/` rather than directly under the key, names it (`dir`).
"""

from __future__ import annotations

import hashlib
import json
import os
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

MARKER = "_COMPLETE.json"
VERSION_PREFIX = "v-"
"""Version directories inside `<stage>/<key>/` start with this (no stage writes such a top-level name)."""


class StoreError(OSError):
    """The artifact store cannot be used; the message names the URI and what to check."""


class DamagedArtifact(StoreError):
    """A committed artifact whose files are missing or differ from its marker; the message names them."""


def cache_key(stage: str, version: str, config: Any, inputs: dict[str, str]) -> str:
    """Content-addressed key: the stage version, its config and the hashes of its inputs."""
    payload = json.dumps(
        {"stage": stage, "version": version, "config": config, "inputs": inputs}, sort_keys=True, default=str
    )
    return hashlib.sha256(payload.encode()).hexdigest()[:20]


@dataclass(frozen=True)
class Artifact:
    """A committed stage directory: where it lives, and its marker's contents."""

    stage: str
    key: str
    uri: str
    manifest: dict[str, Any]

    @property
    def sha256(self) -> str:
        """One hash over the artifact's files, for downstream cache keys."""
        files = self.manifest.get("files", {})
        return hashlib.sha256(json.dumps(files, sort_keys=True).encode()).hexdigest()

    @property
    def version(self) -> str:
        """The version directory holding the files ("": they lie directly in `<stage>/<key>/`)."""
        return str(self.manifest.get("dir") or "")


def new_version() -> str:
    """A fresh version directory name: sortable by time, unique across concurrent committers."""
    return f"{VERSION_PREFIX}{time.strftime('%Y%m%dT%H%M%S', time.gmtime())}-{uuid.uuid4().hex[:8]}"


def write_json(path: Path, doc: dict[str, Any]) -> None:
    """Write a JSON file atomically: a reader sees the old file or the new one, never half of one."""
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        tmp.write_text(json.dumps(doc, indent=2, default=str))
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
