"""Artifact store on any fsspec URI, with atomic stage directories and content-addressed cache keys.

A stage writes into a local work directory; `commit` publishes it under `<stage>/<key>/` and
writes `_COMPLETE.json` (file list with sha256) last. Only a directory with that marker exists as far
as readers are concerned, so a run killed mid-write leaves nothing that looks finished, and a deleted
artifact is simply a cache miss.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import fsspec
from fsspec.implementations.local import LocalFileSystem

MARKER = "_COMPLETE.json"


class StoreError(OSError):
    """The artifact store cannot be used; the message names the URI and what to check."""


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def cache_key(stage: str, version: str, config: Any, inputs: dict[str, str]) -> str:
    """Content-addressed key: the stage version, its config and the hashes of its inputs."""
    payload = json.dumps({"stage": stage, "version": version, "config": config, "inputs": inputs}, sort_keys=True, default=str)
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


class ArtifactStore:
    """Stage directories under one fsspec root (a local directory or e.g. `s3://bucket/prefix`)."""

    def __init__(self, uri: str, storage_options: dict[str, Any] | None = None, cache_dir: Path | None = None):
        self.uri = uri.rstrip("/")
        try:
            self.fs, self.root = fsspec.core.url_to_fs(self.uri, **(storage_options or {}))
        except (ImportError, ValueError) as e:
            raise StoreError(f"store {uri!r}: cannot open ({e})") from e
        self.is_local = isinstance(self.fs, LocalFileSystem)
        self.cache_dir = cache_dir or (Path(self.root) / ".cache" if self.is_local else Path(tempfile.gettempdir()) / "finescope-cache")

    def check_writable(self) -> None:
        """Write and delete a probe object, so bad credentials fail before any work."""
        probe = f"{self.root}/.probe-{uuid.uuid4().hex[:8]}"
        try:
            self.fs.makedirs(self.root, exist_ok=True)
            self.fs.pipe_file(probe, b"ok")
            self.fs.rm_file(probe)
        except Exception as e:  # botocore and fsspec raise many types; all mean "cannot write"
            raise StoreError(
                f"store {self.uri!r} is not writable ({type(e).__name__}: {e}); check the path, endpoint and credentials"
            ) from None

    def _path(self, stage: str, key: str) -> str:
        return f"{self.root}/{stage}/{key}"

    def artifact_uri(self, stage: str, key: str) -> str:
        return f"{self.uri}/{stage}/{key}"

    def lookup(self, stage: str, key: str) -> Artifact | None:
        """The committed artifact for (stage, key), or None (never committed, or deleted)."""
        marker = f"{self._path(stage, key)}/{MARKER}"
        try:
            if not self.fs.exists(marker):
                return None
            manifest = json.loads(self.fs.cat_file(marker))
        except FileNotFoundError:
            return None
        return Artifact(stage, key, self.artifact_uri(stage, key), manifest)

    @contextlib.contextmanager
    def work_dir(self, stage: str, key: str, *, resume: bool) -> Iterator[Path]:
        """A local directory for building (stage, key) that survives a crash, for stages that resume.

        It is tied to the key, so a re-run after a kill finds what the killed run wrote; it is removed
        once the stage has been committed. With `resume=False` any leftovers are cleared first.
        """
        if self.is_local:
            base = Path(self.root) / ".partial"
        else:
            digest = hashlib.sha256(self.uri.encode()).hexdigest()[:12]
            base = Path(tempfile.gettempdir()) / "finescope-partial" / digest
        path = base / stage / key
        if not resume:
            shutil.rmtree(path, ignore_errors=True)
        path.mkdir(parents=True, exist_ok=True)
        yield path
        shutil.rmtree(path, ignore_errors=True)

    def commit(self, local_dir: Path, stage: str, key: str, info: dict[str, Any]) -> Artifact:
        """Publish `local_dir` as (stage, key): hash every file, upload, then write the marker last."""
        files = {
            str(p.relative_to(local_dir)): sha256_file(p) for p in sorted(local_dir.rglob("*")) if p.is_file()
        }
        manifest = {"stage": stage, "key": key, "created": time.time(), "files": files, **info}
        (local_dir / MARKER).write_text(json.dumps(manifest, indent=2, default=str))
        target = self._path(stage, key)
        if self.is_local:
            self._commit_local(local_dir, Path(target))
        else:
            self._commit_remote(local_dir, target)
        return Artifact(stage, key, self.artifact_uri(stage, key), manifest)

    def _commit_local(self, local_dir: Path, target: Path) -> None:
        target.parent.mkdir(parents=True, exist_ok=True)
        moved = target.parent / f".{target.name}.tmp-{uuid.uuid4().hex[:8]}"
        shutil.copytree(local_dir, moved)
        if target.exists():  # an earlier, unfinished attempt: never complete, safe to replace
            shutil.rmtree(target)
        os.replace(moved, target)

    def _commit_remote(self, local_dir: Path, target: str) -> None:
        if self.fs.exists(target):
            self.fs.rm(target, recursive=True)
        for p in sorted(local_dir.rglob("*")):
            if p.is_file() and p.name != MARKER:
                self.fs.put_file(str(p), f"{target}/{p.relative_to(local_dir).as_posix()}")
        self.fs.put_file(str(local_dir / MARKER), f"{target}/{MARKER}")

    def local_path(self, artifact: Artifact) -> Path:
        """A local directory holding the artifact's files (the store itself when local; else a verified copy)."""
        if self.is_local:
            return Path(self._path(artifact.stage, artifact.key))
        dest = self.cache_dir / artifact.stage / artifact.key
        if (dest / MARKER).is_file() and json.loads((dest / MARKER).read_text()) == artifact.manifest:
            return dest
        tmp = dest.with_name(f".{dest.name}.tmp-{uuid.uuid4().hex[:8]}")
        self.fs.get(self._path(artifact.stage, artifact.key) + "/", str(tmp), recursive=True)
        for rel, digest in artifact.manifest.get("files", {}).items():
            if sha256_file(tmp / rel) != digest:
                shutil.rmtree(tmp, ignore_errors=True)
                raise StoreError(f"{artifact.uri}/{rel}: content does not match its recorded sha256; delete the artifact and re-run")
        if dest.exists():
            shutil.rmtree(dest)
        dest.parent.mkdir(parents=True, exist_ok=True)
        os.replace(tmp, dest)
        return dest
