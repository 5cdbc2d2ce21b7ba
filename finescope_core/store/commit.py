"""Publishing a work dir as a committed artifact, its marker made visible last.

A commit never removes a complete artifact that a reader may hold. The first commit of a key in a
local store renames the whole directory, marker inside, into place; any later commit of the same key
(a damaged artifact recomputed, a concurrent run) and every commit to an object store writes a new
version directory `<stage>/<key>/v-<id>/` and then replaces the marker, which names that version
(`dir`), in one atomic step. Superseded versions stay until `finescope store gc` collects them.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import shutil
import time
import uuid
from pathlib import Path
from typing import Any

from finescope_core.store.access import StoreAccess
from finescope_core.store.artifact import MARKER, Artifact, new_version, write_json
from finescope_core.store.check import file_stats, sha256_file

log = logging.getLogger("finescope.store")


def commit(store: StoreAccess, local_dir: Path, stage: str, key: str, info: dict[str, Any]) -> Artifact:
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
    target = store._path(stage, key)
    if store.is_local:
        manifest = _commit_local(local_dir, Path(target), manifest)
    else:
        manifest = _commit_remote(store, local_dir, target, manifest)
    return Artifact(stage, key, store.artifact_uri(stage, key), manifest)


def _commit_local(local_dir: Path, target: Path, manifest: dict[str, Any]) -> dict[str, Any]:
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


def _commit_remote(
    store: StoreAccess, local_dir: Path, target: str, manifest: dict[str, Any]
) -> dict[str, Any]:
    """Upload into a fresh version directory, then put the marker (one object: atomic) naming it."""
    version = new_version()
    for rel in manifest["files"]:
        store._io("upload", store.fs.put_file, str(local_dir / rel), f"{target}/{version}/{rel}")
    manifest = {**manifest, "dir": version}
    body = json.dumps(manifest, indent=2, default=str).encode()
    store._io("upload marker", store.fs.pipe_file, f"{target}/{MARKER}", body)
    return manifest
