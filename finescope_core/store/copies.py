"""Reading an artifact's files on this machine: the local store's own directory, or a verified copy.

A local store's files are checked in place (size and mtime, sha256 where they moved). An object
store's are downloaded once per version under the store's `cache_dir`, every sha256 checked, and the
copy is reused while its own stats still match. Files that vanish because the artifact was replaced
meanwhile are read from the new version, if it holds the same content.
"""

from __future__ import annotations

import logging
import os
import shutil
import uuid
from pathlib import Path

from finescope_core.store.access import StoreAccess
from finescope_core.store.artifact import MARKER, Artifact, DamagedArtifact, write_json
from finescope_core.store.check import COPY_MTIMES, file_stats, local_damage, sound_copy

log = logging.getLogger("finescope.store")


def local_path(store: StoreAccess, artifact: Artifact) -> Path:
    """A local directory holding the artifact's files, checked against its marker.

    Raises:
        DamagedArtifact: files missing or not as recorded, or replaced by different content.
    """
    for attempt in range(3):
        try:
            return _checked_files(store, artifact)
        except DamagedArtifact:
            current = store.lookup(artifact.stage, artifact.key)
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


def _checked_files(store: StoreAccess, artifact: Artifact) -> Path:
    if not store.is_local:
        return _remote_copy(store, artifact)
    problems = store.verify(artifact)
    if problems:
        raise DamagedArtifact(store.damage_message(artifact, problems) + "; re-run to recompute it")
    return Path(store.files_path(artifact))


def _remote_copy(store: StoreAccess, artifact: Artifact) -> Path:
    """A verified copy under `cache_dir`, one per version, reused while its own stats still match."""
    dest = store.cache_dir / artifact.stage / artifact.key / (artifact.version or "_flat")
    if sound_copy(dest, artifact.manifest):
        return dest
    tmp = dest.with_name(f".{dest.name}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        _download(store, artifact, tmp)
        problems = local_damage(tmp, artifact.manifest, full=True)
        if problems:
            # A run checks a remote artifact by listing only, so it would reuse this one again.
            fix = f"finescope store rm {artifact.stage} --key {artifact.key} --yes"
            raise DamagedArtifact(
                f"{store.damage_message(artifact, problems)}; delete it (`{fix}`) and re-run"
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


def _download(store: StoreAccess, artifact: Artifact, dest: Path) -> None:
    """Fetch the artifact's files one by one (each retried), as listed in its marker."""
    source = store.files_path(artifact)
    dest.mkdir(parents=True)
    for rel in artifact.manifest.get("files", {}):
        (dest / rel).parent.mkdir(parents=True, exist_ok=True)
        try:
            store._io("download", store.fs.get_file, f"{source}/{rel}", str(dest / rel))
        except FileNotFoundError:
            raise DamagedArtifact(
                f"{artifact.uri}: {source}/{rel} is listed in its marker but missing; re-run to recompute it"
            ) from None
