"""Artifact store on any fsspec URI, with atomic stage directories and content-addressed cache keys.

A stage writes into a local work directory; `commit` publishes it under `<stage>/<key>/` and
writes `_COMPLETE.json` (file list with sha256) last. Only a directory with that marker exists as far
as readers are concerned, so a run killed mid-write leaves nothing that looks finished, and a deleted
artifact is simply a cache miss. Every call to a remote store is retried with exponential backoff
when it fails for a transient reason (connection refused or reset, timeout, 5xx), never for a
permanent one (bad credentials, permission, not found).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import fsspec
from fsspec.implementations.local import LocalFileSystem

try:
    import fcntl
except ImportError:  # no flock (Windows): work dirs are then told apart by age alone
    fcntl = None  # type: ignore[assignment]

MARKER = "_COMPLETE.json"
log = logging.getLogger("finescope.store")


class StoreError(OSError):
    """The artifact store cannot be used; the message names the URI and what to check."""


def _transient_types() -> tuple[type[BaseException], ...]:
    """Exception types that mean "the storage service did not answer", whatever the client library."""
    types: list[type[BaseException]] = [ConnectionError, TimeoutError]
    with contextlib.suppress(ImportError):
        from fsspec.exceptions import FSTimeoutError

        types.append(FSTimeoutError)
    with contextlib.suppress(ImportError):
        from botocore.exceptions import ConnectionError as BotoConnectionError
        from botocore.exceptions import HTTPClientError

        types += [BotoConnectionError, HTTPClientError]
    with contextlib.suppress(ImportError):
        from aiohttp import ClientConnectionError, ClientPayloadError

        types += [ClientConnectionError, ClientPayloadError]
    return tuple(types)


TRANSIENT_TYPES = _transient_types()
# s3fs maps 5xx answers to these errno values (InternalError: EREMOTEIO, ServiceUnavailable/SlowDown: EBUSY).
TRANSIENT_ERRNOS = {getattr(errno, "EREMOTEIO", errno.EIO), errno.EBUSY, errno.EAGAIN, errno.ETIMEDOUT,
                    errno.ECONNRESET, errno.ECONNREFUSED, errno.ECONNABORTED}


def is_transient(error: BaseException) -> bool:
    """Whether retrying may help: connection trouble, timeouts and 5xx; never auth, permission or not-found."""
    if isinstance(error, PermissionError | FileNotFoundError | FileExistsError | IsADirectoryError | NotADirectoryError):
        return False
    if isinstance(error, TRANSIENT_TYPES):
        return True
    status = getattr(error, "response", None)
    if isinstance(status, dict):  # botocore ClientError not translated by the filesystem
        return int(status.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)) >= 500
    if isinstance(error, OSError) and error.errno in TRANSIENT_ERRNOS:
        return True
    cause = error.__cause__
    return cause is not None and cause is not error and is_transient(cause)


@dataclass(frozen=True)
class RetryPolicy:
    """Bounded exponential backoff for transient storage errors."""

    attempts: int = 6
    """Tries in all (1: no retry); the defaults ride out about half a minute of outage."""
    first_delay: float = 1.0
    """Seconds before the second try; doubled after each failure."""
    max_delay: float = 16.0
    """Cap on one wait."""

    def call(self, what: str, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """`fn(*args, **kwargs)`, retried while it fails with a transient error and tries are left.

        Args:
            what: the operation, for the log line of each retry.
        Returns:
            What `fn` returns; the last error is raised once the tries are spent.
        """
        delay = self.first_delay
        for attempt in range(1, self.attempts + 1):
            try:
                return fn(*args, **kwargs)
            except Exception as e:
                if attempt == self.attempts or not is_transient(e):
                    raise
                log.warning("%s failed (%s: %s); retry %d/%d in %.1fs", what, type(e).__name__, e, attempt,
                            self.attempts - 1, delay)
                time.sleep(delay)
                delay = min(delay * 2, self.max_delay)
        raise AssertionError("unreachable")


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def lock_path(work: Path) -> Path:
    """The lock file beside a work dir (inside it, it would be committed with the stage's files)."""
    return work.with_name(f"{work.name}.lock")


@contextlib.contextmanager
def work_lock(work: Path, *, exclusive: bool = False, blocking: bool = True) -> Iterator[bool]:
    """Hold a flock on `lock_path(work)`: shared while a stage builds in `work`, exclusive to remove it.

    The kernel drops the lock when its process dies, so the work dir of a killed run can be collected
    while that of a running stage never is. Yields False when `blocking` is off and another process
    holds a conflicting lock. A lock file unlinked by a collector while we waited is not ours: retry.
    """
    if fcntl is None:
        yield True
        return
    lock = lock_path(work)
    flags = (fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH) | (0 if blocking else fcntl.LOCK_NB)
    while True:
        lock.parent.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        except FileNotFoundError:  # a collector removed the empty stage directory just now
            continue
        try:
            try:
                fcntl.flock(fd, flags)
            except BlockingIOError:
                yield False
                return
            if _same_file(fd, lock):
                yield True
                return
        finally:
            os.close(fd)


def _same_file(fd: int, path: Path) -> bool:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return False
    own = os.fstat(fd)
    return (own.st_dev, own.st_ino) == (st.st_dev, st.st_ino)


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
        self._secrets = [v for k, v in (storage_options or {}).items() if k in ("key", "secret", "token") and v]
        self._digest = hashlib.sha256(self.uri.encode()).hexdigest()[:12]
        default_cache = Path(self.root) / ".cache" if self.is_local else Path(tempfile.gettempdir()) / "finescope-cache" / self._digest
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

    def check_writable(self) -> None:
        """Write and delete a probe object, so bad credentials fail before any work.

        A wrong endpoint looks like an outage, so this waits out only one short blip, not a long one.
        """
        probe = f"{self.root}/.probe-{uuid.uuid4().hex[:8]}"
        quick = RetryPolicy(attempts=min(2, self.retry.attempts), first_delay=self.retry.first_delay)
        try:
            for what, fn, *args in (("create root", self.fs.makedirs, self.root, True),
                                    ("write probe", self.fs.pipe_file, probe, b"ok"),
                                    ("delete probe", self.fs.rm_file, probe)):
                if self.is_local:
                    fn(*args)
                else:
                    quick.call(f"{self.uri}: {what}", fn, *args)
        except Exception as e:  # botocore and fsspec raise many types; all mean "cannot write"
            detail = self._redact(f"{type(e).__name__}: {e}")
            raise StoreError(
                f"store {self.uri!r} is not writable ({detail}); check the path, endpoint and credentials"
            ) from None

    def _path(self, stage: str, key: str) -> str:
        return f"{self.root}/{stage}/{key}"

    def artifact_uri(self, stage: str, key: str) -> str:
        return f"{self.uri}/{stage}/{key}"

    def lookup(self, stage: str, key: str) -> Artifact | None:
        """The committed artifact for (stage, key), or None (never committed, or deleted)."""
        marker = f"{self._path(stage, key)}/{MARKER}"
        try:  # one read, no listing: a stale directory listing cannot hide or fake a marker
            manifest = json.loads(self._io("read marker", self.fs.cat_file, marker))
        except (FileNotFoundError, NotADirectoryError):
            return None
        return Artifact(stage, key, self.artifact_uri(stage, key), manifest)

    @property
    def work_base(self) -> Path:
        """Where the work dirs of this store live: always on this machine's disk, also for a remote store."""
        if self.is_local:
            return Path(self.root) / ".partial"
        return Path(tempfile.gettempdir()) / "finescope-partial" / self._digest

    @contextlib.contextmanager
    def work_dir(self, stage: str, key: str, *, resume: bool) -> Iterator[Path]:
        """A local directory for building (stage, key) that survives a crash, for stages that resume.

        It is tied to the key, so a re-run after a kill finds what the killed run wrote; it is removed
        once the stage has been committed. With `resume=False` any leftovers are cleared first. A
        shared lock is held meanwhile, so `finescope store gc` never removes it under a running stage.
        """
        path = self.work_base / stage / key
        with work_lock(path):
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
        if self._io("exists", self.fs.exists, target):
            self._io("remove unfinished", self.fs.rm, target, True)
        for p in sorted(local_dir.rglob("*")):
            if p.is_file() and p.name != MARKER:
                self._io("upload", self.fs.put_file, str(p), f"{target}/{p.relative_to(local_dir).as_posix()}")
        self._io("upload marker", self.fs.put_file, str(local_dir / MARKER), f"{target}/{MARKER}")

    def delete(self, stage: str, key: str) -> None:
        """Remove the artifact (stage, key) and, for a remote store, its verified local copy.

        The marker goes first, so a deletion cut short leaves a cache miss, never a corrupt hit. Should a
        run commit the same key meanwhile and lose files to this deletion, its marker goes as well.
        """
        target = self._path(stage, key)
        with contextlib.suppress(FileNotFoundError):
            self._io("delete marker", self.fs.rm_file, f"{target}/{MARKER}")
        self.remove_tree(target)
        if self.is_local:
            with contextlib.suppress(OSError):  # the stage's last artifact: no empty directory left behind
                os.rmdir(Path(target).parent)
        else:
            shutil.rmtree(self.cache_dir / stage / key, ignore_errors=True)
        found = self.lookup(stage, key)
        if found is not None and not self._complete(found):
            self._io("delete marker", self.fs.rm_file, f"{target}/{MARKER}")

    def remove_tree(self, path: str) -> None:
        """Delete everything under `path` (a path inside this store's filesystem); gone already is fine."""
        with contextlib.suppress(FileNotFoundError):
            self._io("delete", self.fs.rm, path, True)

    def _complete(self, artifact: Artifact) -> bool:
        """Whether every file the marker lists is present (listed, not hashed)."""
        source = self._path(artifact.stage, artifact.key)
        present = {p.removeprefix(source + "/") for p in self._io("list", self.fs.find, source)}
        return set(artifact.manifest.get("files", {})) <= present

    def _download(self, artifact: Artifact, dest: Path) -> None:
        """Fetch the artifact's files one by one (each retried), as listed in its marker."""
        source = self._path(artifact.stage, artifact.key)
        dest.mkdir(parents=True)
        for rel in [*artifact.manifest.get("files", {}), MARKER]:
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            try:
                self._io("download", self.fs.get_file, f"{source}/{rel}", str(dest / rel))
            except FileNotFoundError:
                raise StoreError(f"{artifact.uri}/{rel} is listed in its marker but missing; delete the artifact and re-run") from None

    @staticmethod
    def _verify(artifact: Artifact, local: Path) -> None:
        """Raise StoreError unless every file of the marker is in `local` with its recorded sha256."""
        for rel, digest in artifact.manifest.get("files", {}).items():
            path = local / rel
            if not path.is_file() or sha256_file(path) != digest:
                raise StoreError(f"{artifact.uri}/{rel}: content does not match its recorded sha256; delete the artifact and re-run")

    def local_path(self, artifact: Artifact) -> Path:
        """A local directory holding the artifact's files (the store itself when local; else a verified copy)."""
        if self.is_local:
            return Path(self._path(artifact.stage, artifact.key))
        dest = self.cache_dir / artifact.stage / artifact.key
        if (dest / MARKER).is_file() and json.loads((dest / MARKER).read_text()) == artifact.manifest:
            return dest
        tmp = dest.with_name(f".{dest.name}.tmp-{uuid.uuid4().hex[:8]}")
        try:
            self._download(artifact, tmp)
            self._verify(artifact, tmp)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        if dest.exists():
            shutil.rmtree(dest)
        os.replace(tmp, dest)
        return dest
