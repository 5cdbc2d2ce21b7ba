"""Artifact store on any fsspec URI, with atomic stage directories and content-addressed cache keys.

A stage writes into a local work directory; `commit` publishes it under `<stage>/<key>/` with a
marker, `_COMPLETE.json` (file list with sha256, sizes, mtimes), made visible last. Only a directory
with that marker exists as far as readers are concerned, so a run killed mid-write leaves nothing that
looks finished, and a deleted artifact is simply a cache miss.

One idea per module:

- `artifact`: keys, the marker, version directory names, the store's errors;
- `access`: one store root, local or remote: retried calls, paths, reading markers, checking files;
- `check`: an artifact's files against its marker; `retry`: which errors are transient, and backoff;
- `workdirs`: where a stage builds, and the locks that keep `gc` off a running stage's work dir;
- `commit`: publishing a work dir, a new version beside the files a reader may hold;
- `copies`: an artifact's files on this machine, checked (for an object store: a verified copy);
- `artifact_store`: `ArtifactStore`, the object the stages use, and deletion.
"""

from finescope_core.store.access import READ_ONLY_ERRNOS, StoreAccess
from finescope_core.store.artifact import (
    MARKER,
    VERSION_PREFIX,
    Artifact,
    DamagedArtifact,
    StoreError,
    cache_key,
    new_version,
    write_json,
)
from finescope_core.store.artifact_store import ArtifactStore
from finescope_core.store.check import sha256_file
from finescope_core.store.retry import TRANSIENT_ERRNOS, TRANSIENT_TYPES, RetryPolicy, is_transient
from finescope_core.store.workdirs import lock_path, work_lock

__all__ = [
    "MARKER",
    "READ_ONLY_ERRNOS",
    "TRANSIENT_ERRNOS",
    "TRANSIENT_TYPES",
    "VERSION_PREFIX",
    "Artifact",
    "ArtifactStore",
    "DamagedArtifact",
    "RetryPolicy",
    "StoreAccess",
    "StoreError",
    "cache_key",
    "is_transient",
    "lock_path",
    "new_version",
    "sha256_file",
    "work_lock",
    "write_json",
]
