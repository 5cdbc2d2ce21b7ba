"""Reading a store into a `StoreListing`: one recursive listing, then one read per marker.

What a marker names is a committed artifact (its current version); everything else under a key is a
leftover: a superseded version, an unfinished commit. This machine's work dirs are added from disk.
"""

from __future__ import annotations

import contextlib
import datetime
import functools
import json
import os
from typing import Any

from finescope_core.store import MARKER, ArtifactStore
from finescope_core.store_admin.listing import (
    OUTPUTS_DIR,
    RESULTS_DIR,
    Leftover,
    StoredArtifact,
    StoredFile,
    StoreListing,
)
from finescope_core.store_admin.local_dirs import work_dirs


def scan(store: ArtifactStore) -> StoreListing:
    """List the store (one recursive listing, then one read per marker) and this machine's work dirs."""
    listing = StoreListing(store.uri)
    groups: dict[tuple[str, str], list[StoredFile]] = {}
    for path, info in _find(store, store.root).items():
        if info.get("type") == "directory":  # an object store that keeps empty directories (SeaweedFS)
            continue
        rel = path.removeprefix(store.root.rstrip("/") + "/")
        parts = rel.split("/")
        item = StoredFile(path, int(info.get("size") or 0), _mtime(info))
        if parts[0] == ".partial":  # a local store's work dirs: `work_dirs` looks at them on disk
            continue
        if parts[0] == RESULTS_DIR:
            listing.results.append(item)
        elif parts[0] == OUTPUTS_DIR:
            listing.outputs.append(item)
        elif len(parts) == 1 and parts[0].startswith(".probe-"):
            listing.leftovers.append(Leftover("probe", "", "", path, item.size, item.modified))
        elif len(parts) >= 3 and not parts[0].startswith("."):  # <stage>/<key>/...; no stage name is hidden
            groups.setdefault((parts[0], parts[1]), []).append(item)
        else:
            listing.other.append(item)
    markers = _read_markers(store, [k for k, files in groups.items() if _has_marker(store, k, files)])
    for (stage, key), files in sorted(groups.items()):
        size, modified = sum(f.size for f in files), max(f.modified for f in files)
        if (stage, key) in markers:
            record = markers[stage, key]
            current, superseded = _split_versions(store, stage, key, record, files)
            listing.artifacts.append(
                StoredArtifact(
                    stage,
                    key,
                    store.artifact_uri(stage, key),
                    sum(f.size for f in current),
                    len(current),
                    record,
                )
            )
            listing.leftovers += _old_versions(store, stage, key, record, superseded)
            continue
        path = f"{store.root}/{stage}/{key}"
        if store.is_local:  # copies keep their source's mtimes: the directory's own tells when the copy began
            modified = max(modified, os.stat(path).st_mtime)
        listing.leftovers.append(Leftover("unfinished commit", stage, key, path, size, modified))
    listing.leftovers += work_dirs(store)
    return listing


def _split_versions(
    store: ArtifactStore, stage: str, key: str, record: dict[str, Any], files: list[StoredFile]
) -> tuple[list[StoredFile], dict[str, list[StoredFile]]]:
    """The files of the version the marker names (marker included), and the others by their top-level
    name under the key: versions superseded by a later commit, or a commit in progress."""
    base = f"{store.root}/{stage}/{key}/"
    current: list[StoredFile] = []
    others: dict[str, list[StoredFile]] = {}
    for f in files:
        rel = f.path.removeprefix(base)
        name = rel.split("/")[0]
        if rel == MARKER or in_current_version(record, name):
            current.append(f)
        else:
            others.setdefault(name, []).append(f)
    return current, others


def in_current_version(record: dict[str, Any], name: str) -> bool:
    """Whether `<stage>/<key>/<name>` belongs to the version the marker `record` names."""
    version = record.get("dir")
    if version:
        return bool(name == version)
    return any(rel.split("/")[0] == name for rel in record.get("files", {}))


def _old_versions(
    store: ArtifactStore, stage: str, key: str, record: dict[str, Any], others: dict[str, list[StoredFile]]
) -> list[Leftover]:
    """Superseded versions as leftovers. A reader that read the old marker may still be reading one, so
    its age counts from when the current version was committed, or from its own newest change if later
    (a local version's ctime moves when a commit renames it into place)."""
    out = []
    for name, files in sorted(others.items()):
        path = f"{store.root}/{stage}/{key}/{name}"
        modified = max([float(record.get("created", 0.0)), *(f.modified for f in files)])
        if store.is_local:
            with contextlib.suppress(OSError):
                st = os.stat(path)
                modified = max(modified, st.st_mtime, st.st_ctime)
        out.append(Leftover("old version", stage, key, path, sum(f.size for f in files), modified))
    return out


def _find(store: ArtifactStore, root: str) -> dict[str, dict[str, Any]]:
    try:
        found = store._io("list", functools.partial(store.fs.find, root, detail=True))
    except FileNotFoundError:
        return {}
    return found if isinstance(found, dict) else {}


def _has_marker(store: ArtifactStore, key: tuple[str, str], files: list[StoredFile]) -> bool:
    """A marker directly inside; `.<key>.tmp-*` copies of a local commit in progress hold one too, but
    `lookup` never reads them, so they are leftovers."""
    marker = f"{store.root}/{key[0]}/{key[1]}/{MARKER}"
    return not key[1].startswith(".") and any(f.path == marker for f in files)


def _read_markers(store: ArtifactStore, keys: list[tuple[str, str]]) -> dict[tuple[str, str], dict[str, Any]]:
    """The marker of each (stage, key), read in one batch (s3fs fetches them concurrently)."""
    paths = {f"{store.root}/{stage}/{key}/{MARKER}": (stage, key) for stage, key in keys}
    if not paths:
        return {}
    raw = store._io("read markers", functools.partial(store.fs.cat, list(paths), on_error="omit"))
    out = {}
    for path, body in raw.items():
        try:
            out[paths[path]] = json.loads(body)
        except ValueError:  # unreadable, yet a marker: `lookup` would fail on it too, `ls` shows it empty
            out[paths[path]] = {}
    return out


def _mtime(info: dict[str, Any]) -> float:
    """Modification time from a listing entry, whatever the filesystem calls it."""
    for name in ("mtime", "LastModified", "last_modified", "created"):
        value = info.get(name)
        if isinstance(value, int | float):
            return float(value)
        if isinstance(value, datetime.datetime):
            return value.timestamp()
    return 0.0
