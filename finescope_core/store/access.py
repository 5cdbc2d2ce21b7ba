"""One store root on any fsspec filesystem: opening it, retried calls, paths, markers and file checks.

`StoreAccess` is what every store operation builds on: where `<stage>/<key>/` lies, reading a
marker, checking an artifact's files against it, and each remote call retried with exponential
backoff when it fails for a transient reason (connection refused or reset, timeout, 5xx), never for
a permanent one (bad credentials, permission, not found). A local store is called directly.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
import tempfile
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import fsspec
from fsspec.implementations.local import LocalFileSystem

from finescope_core.store.artifact import MARKER, Artifact, StoreError
from finescope_core.store.check import listed_damage, local_damage
from finescope_core.store.retry import RetryPolicy

log = logging.getLogger("finescope.store")

READ_ONLY_ERRNOS = {errno.EROFS, errno.EACCES, errno.EPERM}


class StoreAccess:
    """Stage directories under one fsspec root (a local directory or e.g. `s3://bucket/prefix`).

    Args:
        uri: the root; anything fsspec opens.
        storage_options: filesystem options (for s3: key, secret, client_kwargs.endpoint_url...).
        cache_dir: where verified copies of remote artifacts go (default: a per-URI temp dir).
        retry: backoff for transient errors of remote calls.
    """

    def __init__(
        self,
        uri: str,
        storage_options: dict[str, Any] | None = None,
        cache_dir: Path | None = None,
        retry: RetryPolicy | None = None,
    ):
        self.uri = uri.rstrip("/")
        try:
            self.fs, self.root = fsspec.core.url_to_fs(self.uri, **(storage_options or {}))
        except (ImportError, ValueError) as e:
            raise StoreError(f"store {uri!r}: cannot open ({e})") from e
        self.is_local = isinstance(self.fs, LocalFileSystem)
        self.retry = retry or RetryPolicy()
        self._secrets = [
            v for k, v in (storage_options or {}).items() if k in ("key", "secret", "token") and v
        ]
        self._digest = hashlib.sha256(self.uri.encode()).hexdigest()[:12]
        default_cache = (
            Path(self.root) / ".cache"
            if self.is_local
            else Path(tempfile.gettempdir()) / "finescope-cache" / self._digest
        )
        self.cache_dir = cache_dir or default_cache

    def _io(self, what: str, fn: Callable[..., Any], *args: Any) -> Any:
        """A remote filesystem call, retried on transient errors (local calls are not retried)."""
        if self.is_local:
            return fn(*args)
        return self.retry.call(f"{self.uri}: {what}", fn, *args)

    def _redact(self, text: str) -> str:
        for secret in self._secrets:
            text = text.replace(str(secret), "***")
        return text

    def check_writable(self) -> bool:
        """Write and delete a probe object, so bad credentials fail before any work.

        A wrong endpoint looks like an outage, so this waits out only one short blip, not a long one.
        An existing local store that refuses writes (a read-only mount) is not an error here: a run
        whose stages are all stored reuses them without writing, and a stage that must be computed
        fails before its work (`work_dir`). Returns whether the store is writable.
        """
        probe = f"{self.root}/.probe-{uuid.uuid4().hex[:8]}"
        quick = RetryPolicy(attempts=min(2, self.retry.attempts), first_delay=self.retry.first_delay)
        existed = self.is_local and Path(self.root).is_dir()
        try:
            for what, fn, *args in (
                ("create root", self.fs.makedirs, self.root, True),
                ("write probe", self.fs.pipe_file, probe, b"ok"),
                ("delete probe", self.fs.rm_file, probe),
            ):
                if self.is_local:
                    fn(*args)
                else:
                    quick.call(f"{self.uri}: {what}", fn, *args)
        except OSError as e:
            if not (existed and e.errno in READ_ONLY_ERRNOS):
                raise self._unwritable(e) from None
            log.warning(
                "store %s is read-only (%s): stored stages are reused, a stage to compute fails", self.uri, e
            )
            return False
        except Exception as e:  # botocore and fsspec raise many types; all mean "cannot write"
            raise self._unwritable(e) from None
        return True

    def _unwritable(self, e: BaseException) -> StoreError:
        detail = self._redact(f"{type(e).__name__}: {e}")
        return StoreError(
            f"store {self.uri!r} is not writable ({detail}); check the path, endpoint and credentials"
        )

    def _path(self, stage: str, key: str) -> str:
        return f"{self.root}/{stage}/{key}"

    def artifact_uri(self, stage: str, key: str) -> str:
        return f"{self.uri}/{stage}/{key}"

    def lookup(self, stage: str, key: str) -> Artifact | None:
        """The committed artifact for (stage, key), or None (never committed, or deleted).

        This reads the marker only; `verify` checks the files it lists before a reuse."""
        marker = f"{self._path(stage, key)}/{MARKER}"
        try:  # one read, no listing: a stale directory listing cannot hide or fake a marker
            manifest = json.loads(self._io("read marker", self.fs.cat_file, marker))
        except (FileNotFoundError, NotADirectoryError):
            return None
        return Artifact(stage, key, self.artifact_uri(stage, key), manifest)

    def files_path(self, artifact: Artifact) -> str:
        """Where the artifact's files lie in the store's filesystem: its version directory, if any."""
        base = self._path(artifact.stage, artifact.key)
        return f"{base}/{artifact.version}" if artifact.version else base

    def verify(self, artifact: Artifact, *, full: bool = False) -> list[str]:
        """What is wrong with the artifact's files, one `"<file>: <problem>"` each; [] when sound.

        Local store: size and mtime against the marker, sha256 where they moved (every file with
        `full`). Object store: presence and size from one listing (contents are hashed on download).
        """
        if self.is_local:
            return local_damage(Path(self.files_path(artifact)), artifact.manifest, full=full)
        return listed_damage(self._listed_sizes(self.files_path(artifact)), artifact.manifest)

    def _listed_sizes(self, path: str) -> dict[str, int]:
        try:
            found = self._io("list", lambda: self.fs.find(path, detail=True))
        except FileNotFoundError:
            return {}
        files = {p: i for p, i in found.items() if i.get("type") != "directory"}
        return {p.removeprefix(path + "/"): int(i.get("size") or 0) for p, i in files.items()}

    def damage_message(self, artifact: Artifact, problems: list[str]) -> str:
        shown = "; ".join(problems[:5]) + (f"; and {len(problems) - 5} more" if len(problems) > 5 else "")
        return f"{artifact.stage} artifact {artifact.key} ({self.files_path(artifact)}) is damaged: {shown}"

    @property
    def work_base(self) -> Path:
        """Where this store's work dirs live: always on this machine's disk, also for a remote store."""
        if self.is_local:
            return Path(self.root) / ".partial"
        return Path(tempfile.gettempdir()) / "finescope-partial" / self._digest

    def remove_tree(self, path: str) -> None:
        """Delete everything under `path` (a path inside this store's filesystem); gone already is fine."""
        with contextlib.suppress(FileNotFoundError):
            self._io("delete", self.fs.rm, path, True)
