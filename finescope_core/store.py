"""Artifact store on any fsspec URI, with atomic stage directories and content-addressed cache keys.

A stage writes into a local work directory; `commit` publishes it under `<stage>/<key>/` with a
marker, `_COMPLETE.json` (file list with sha256, sizes, mtimes), made visible last. Only a directory
with that marker exists as far as readers are concerned, so a run killed mid-write leaves nothing that
looks finished, and a deleted artifact is simply a cache miss.

A commit never removes a complete artifact that a reader may hold. The first commit of a key in a
local store renames the whole directory, marker inside, into place; any later commit of the same key
(a damaged artifact recomputed, a concurrent run) and every commit to an object store writes a new
version directory `<stage>/<key>/v-<id>/` and then replaces the marker, which names that version
(`dir`), in one atomic step. Superseded versions stay until `finescope store gc` collects them.

Every call to a remote store is retried with exponential backoff when it fails for a transient reason
(connection refused or reset, timeout, 5xx), never for a permanent one (bad credentials, permission,
not found).
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

from finescope_core.store_check import COPY_MTIMES, file_stats, listed_damage, local_damage, sound_copy
from finescope_core.store_check import sha256_file as sha256_file  # re-exported: callers import it from here
from finescope_core.store_retry import TRANSIENT_ERRNOS as TRANSIENT_ERRNOS
from finescope_core.store_retry import TRANSIENT_TYPES as TRANSIENT_TYPES
from finescope_core.store_retry import RetryPolicy as RetryPolicy
from finescope_core.store_retry import is_transient as is_transient

try:
    import fcntl
except ImportError:  # no flock (Windows): work dirs are then told apart by age alone
    fcntl = None  # type: ignore[assignment]

MARKER = "_COMPLETE.json"
log = logging.getLogger("finescope.store")


VERSION_PREFIX = "v-"
"""Version directories inside `<stage>/<key>/` start with this (no stage writes such a top-level name)."""
READ_ONLY_ERRNOS = {errno.EROFS, errno.EACCES, errno.EPERM}


class StoreError(OSError):
    """The artifact store cannot be used; the message names the URI and what to check."""


class DamagedArtifact(StoreError):
    """A committed artifact whose files are missing or differ from its marker; the message names them."""


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
        """Where the work dirs of this store live: always on this machine's disk, also for a remote store."""
        if self.is_local:
            return Path(self.root) / ".partial"
        return Path(tempfile.gettempdir()) / "finescope-partial" / self._digest

    @contextlib.contextmanager
    def work_dir(self, stage: str, key: str, *, resume: bool) -> Iterator[Path]:
        """A local directory for building (stage, key) that survives a crash, for stages that resume.

        It is tied to the key, so a re-run after a kill finds what the killed run wrote; it is removed
        once the stage has been committed. With `resume=False` any leftovers are cleared first. An
        exclusive lock is held meanwhile: a second run of the same key on this machine waits for the
        first (and should then look the key up again), two runs never write one work dir, and
        `finescope store gc` never removes it under a running stage.
        """
        path = self.work_base / stage / key
        with contextlib.ExitStack() as held:
            try:
                held.enter_context(self._hold(path, stage, key))
                if not resume:
                    shutil.rmtree(path, ignore_errors=True)
                path.mkdir(parents=True, exist_ok=True)
            except OSError as e:  # before any work: a read-only store cannot build what it lacks
                raise StoreError(
                    f"store {self.uri!r}: cannot create the work dir of stage {stage!r} (key {key}) in "
                    f"{self.work_base} ({type(e).__name__}: {e}); this stage is not stored and must be "
                    "computed: make the store writable, or point `store` at a writable copy of it"
                ) from None
            yield path
            shutil.rmtree(path, ignore_errors=True)

    @staticmethod
    @contextlib.contextmanager
    def _hold(path: Path, stage: str, key: str) -> Iterator[None]:
        """The work dir's exclusive lock; says so when another run holds it and waits for it."""
        with work_lock(path, exclusive=True, blocking=False) as free:
            if free:
                yield
                return
        log.warning("%s %s: another run is building it; waiting for it to finish", stage, key)
        with work_lock(path, exclusive=True):
            yield

    def commit(self, local_dir: Path, stage: str, key: str, info: dict[str, Any]) -> Artifact:
        """Publish `local_dir` as (stage, key): hash every file, upload, then make the marker visible last."""
        rels = [p.relative_to(local_dir).as_posix() for p in sorted(local_dir.rglob("*")) if p.is_file()]
        files = {rel: sha256_file(local_dir / rel) for rel in rels}
        manifest = {
            "stage": stage,
            "key": key,
            "created": time.time(),
            "files": files,
            "sizes": file_stats(local_dir, rels)[0],
            **info,
        }
        target = self._path(stage, key)
        if self.is_local:
            manifest = self._commit_local(local_dir, Path(target), manifest)
        else:
            manifest = self._commit_remote(local_dir, target, manifest)
        return Artifact(stage, key, self.artifact_uri(stage, key), manifest)

    def _commit_local(self, local_dir: Path, target: Path, manifest: dict[str, Any]) -> dict[str, Any]:
        """The first commit renames the directory, marker inside, into place; a later one (the key's
        directory exists: a damaged artifact replaced, a concurrent run) becomes a version beside the
        files in use and switches the marker. Mtimes are recorded from the files in the store."""
        target.parent.mkdir(parents=True, exist_ok=True)
        staging = target.parent / f".{target.name}.tmp-{uuid.uuid4().hex[:8]}"
        try:
            shutil.copytree(local_dir, staging)
            manifest = {**manifest, "mtimes": file_stats(staging, manifest["files"])[1]}
            write_json(staging / MARKER, manifest)
            try:
                os.rename(staging, target)
                return manifest
            except OSError as e:
                if e.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                    raise
            (staging / MARKER).unlink()
            version = new_version()
            os.rename(staging, target / version)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        manifest = {**manifest, "dir": version}
        write_json(target / MARKER, manifest)
        log.info(
            "%s %s: committed as version %s beside the earlier files", manifest["stage"], target.name, version
        )
        return manifest

    def _commit_remote(self, local_dir: Path, target: str, manifest: dict[str, Any]) -> dict[str, Any]:
        """Upload into a fresh version directory, then put the marker (one object: atomic) naming it."""
        version = new_version()
        for rel in manifest["files"]:
            self._io("upload", self.fs.put_file, str(local_dir / rel), f"{target}/{version}/{rel}")
        manifest = {**manifest, "dir": version}
        body = json.dumps(manifest, indent=2, default=str).encode()
        self._io("upload marker", self.fs.pipe_file, f"{target}/{MARKER}", body)
        return manifest

    def delete(self, stage: str, key: str) -> None:
        """Remove the artifact (stage, key), all its versions and, for a remote store, its local copies.

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
        if found is not None and self.verify(found):
            self._io("delete marker", self.fs.rm_file, f"{target}/{MARKER}")

    def remove_tree(self, path: str) -> None:
        """Delete everything under `path` (a path inside this store's filesystem); gone already is fine."""
        with contextlib.suppress(FileNotFoundError):
            self._io("delete", self.fs.rm, path, True)

    def local_path(self, artifact: Artifact) -> Path:
        """A local directory holding the artifact's files, checked against its marker.

        Local store: the store's own directory, size and mtime checked (sha256 where they moved);
        remote: a verified copy (every sha256 checked on download). Files that vanish because the
        artifact was replaced meanwhile are read from the new version, if it holds the same content.

        Raises:
            DamagedArtifact: files missing or not as recorded, or replaced by different content.
        """
        for attempt in range(3):
            try:
                return self._checked_files(artifact)
            except DamagedArtifact:
                current = self.lookup(artifact.stage, artifact.key)
                if attempt == 2 or current is None or current.manifest == artifact.manifest:
                    raise
                if current.sha256 != artifact.sha256:
                    raise DamagedArtifact(
                        f"{artifact.uri} was replaced by different content while this run "
                        "read it; re-run to use the new version"
                    ) from None
                log.info("%s was replaced while being read; reading its new version", artifact.uri)
                artifact = current
        raise AssertionError("unreachable")

    def _checked_files(self, artifact: Artifact) -> Path:
        if not self.is_local:
            return self._remote_copy(artifact)
        problems = self.verify(artifact)
        if problems:
            raise DamagedArtifact(self.damage_message(artifact, problems) + "; re-run to recompute it")
        return Path(self.files_path(artifact))

    def _remote_copy(self, artifact: Artifact) -> Path:
        """A verified copy under `cache_dir`, one per version, reused while its own stats still match."""
        dest = self.cache_dir / artifact.stage / artifact.key / (artifact.version or "_flat")
        if sound_copy(dest, artifact.manifest):
            return dest
        tmp = dest.with_name(f".{dest.name}.tmp-{uuid.uuid4().hex[:8]}")
        try:
            self._download(artifact, tmp)
            problems = local_damage(tmp, artifact.manifest, full=True)
            if problems:
                # A run checks a remote artifact by listing only, so it would reuse this one again.
                fix = f"finescope store rm {artifact.stage} --key {artifact.key} --yes"
                raise DamagedArtifact(
                    f"{self.damage_message(artifact, problems)}; delete it (`{fix}`) and re-run"
                )
            own_mtimes = file_stats(tmp, artifact.manifest["files"])[1]
            write_json(tmp / MARKER, {**artifact.manifest, COPY_MTIMES: own_mtimes})
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        if sound_copy(dest, artifact.manifest):  # another process on this machine made the copy meanwhile
            shutil.rmtree(tmp, ignore_errors=True)
            return dest
        shutil.rmtree(dest, ignore_errors=True)  # a damaged copy: nobody can use it
        os.replace(tmp, dest)
        return dest

    def _download(self, artifact: Artifact, dest: Path) -> None:
        """Fetch the artifact's files one by one (each retried), as listed in its marker."""
        source = self.files_path(artifact)
        dest.mkdir(parents=True)
        for rel in artifact.manifest.get("files", {}):
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            try:
                self._io("download", self.fs.get_file, f"{source}/{rel}", str(dest / rel))
            except FileNotFoundError:
                raise DamagedArtifact(
                    f"{artifact.uri}: {source}/{rel} is listed in its marker but missing; "
                    "re-run to recompute it"
                ) from None
