"""Looking into an artifact store and cleaning it up: what is committed, what killed runs left behind.

The store only grows: every changed setting adds artifacts under new keys, and a killed run leaves its
work dir (and, on an object store, possibly a half-uploaded directory). This module lists all of it with
sizes and deletes it safely: a committed artifact loses its marker first (`ArtifactStore.delete`), and a
leftover goes only once it has been left alone for a while and, for a work dir, only under an exclusive
lock that no running stage holds (`work_lock`).
"""

from __future__ import annotations

import contextlib
import datetime
import functools
import json
import os
import shutil
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from finescope_core.store import MARKER, ArtifactStore, lock_path, work_lock

RESULTS_DIR = "prefect-results"
"""Where Prefect's persisted task results go inside a store (`flows.runtime` writes them there)."""
OUTPUTS_DIR = "outputs"
"""Where runs without an `output` export theirs (`<store>/outputs/<name>/`): listed, never collected."""
DAY = 86400.0


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


def work_dirs(store: ArtifactStore) -> list[Leftover]:
    """The store's work dirs on this machine: `<work_base>/<stage>/<key>/`, with size, age and lock state."""
    base = store.work_base
    out = []
    for stage_dir in _subdirs(base):
        for work in _subdirs(stage_dir):
            try:
                size, modified = _tree_stats(work)
            except FileNotFoundError:  # its stage committed and removed it meanwhile
                continue
            out.append(
                Leftover("work dir", stage_dir.name, work.name, str(work), size, modified, in_use(work))
            )
    return out


def _subdirs(path: Path) -> list[Path]:
    try:
        return sorted(p for p in path.iterdir() if p.is_dir())
    except (FileNotFoundError, NotADirectoryError):
        return []


def _tree_stats(path: Path) -> tuple[int, float]:
    """(bytes, newest modification time) of a local directory tree."""
    size, newest = 0, path.stat().st_mtime
    for root, _, names in os.walk(path):
        for name in names:
            try:
                st = os.stat(os.path.join(root, name))
            except FileNotFoundError:  # a running stage replaced it meanwhile
                continue
            size += st.st_size
            newest = max(newest, st.st_mtime)
    return size, newest


def in_use(work: Path) -> bool:
    """Whether a running stage holds the work dir's lock (a missing lock file: nobody does)."""
    if not lock_path(work).exists():
        return False
    with work_lock(work, exclusive=True, blocking=False) as free:
        return not free


@dataclass(frozen=True)
class GarbageItem:
    """One thing `gc` deletes (or keeps, with `reason` saying why)."""

    kind: str
    where: str
    size: int
    reason: str
    stage: str = ""
    key: str = ""


@dataclass
class GarbagePlan:
    """What `gc` would delete and what it keeps on purpose (leftovers in use or too recent)."""

    delete: list[GarbageItem] = field(default_factory=list)
    kept: list[GarbageItem] = field(default_factory=list)

    @property
    def size(self) -> int:
        return sum(x.size for x in self.delete)


def find_garbage(
    store: ArtifactStore,
    listing: StoreListing,
    *,
    keep: set[tuple[str, str]] | None = None,
    keep_days: float | None = None,
    min_age_minutes: float = 60.0,
    now: float | None = None,
) -> GarbagePlan:
    """Decide what to collect.

    Args:
        keep: the (stage, key) pairs some config still uses; None: no config given, reachability is not a reason.
        keep_days: artifacts and Prefect results created within this many days stay; None: age is not a reason.
            With both, an artifact goes when it is unused *and* older (recent experiments survive).
        min_age_minutes: a leftover untouched for less than this stays, whatever its lock says (a
            commit to an object store has no lock, and an older run may not take one).
    """
    now = time.time() if now is None else now
    plan = GarbagePlan()
    for a in listing.artifacts:
        reasons = _artifact_reasons(a, keep, keep_days, now)
        if reasons:
            plan.delete.append(GarbageItem("artifact", a.uri, a.size, " and ".join(reasons), a.stage, a.key))
    for x in listing.leftovers:
        _sort_leftover(plan, x, keep, min_age_minutes, now)
    if keep_days is not None:
        old = [f for f in listing.results if now - f.modified > keep_days * DAY]
        plan.delete += [
            GarbageItem("prefect result", f.path, f.size, f"older than {keep_days:g} days") for f in old
        ]
    plan.delete += _stale_copies(
        store, listing, {(x.stage, x.key) for x in plan.delete if x.kind == "artifact"}
    )
    return plan


Keys = set[tuple[str, str]]


def _artifact_reasons(a: StoredArtifact, keep: Keys | None, keep_days: float | None, now: float) -> list[str]:
    if keep is None and keep_days is None:
        return []
    if keep is not None and (a.stage, a.key) in keep:
        return []
    if keep_days is not None and now - a.created <= keep_days * DAY:
        return []
    reasons = [] if keep is None else ["used by none of the given configs"]
    return reasons + ([] if keep_days is None else [f"created {(now - a.created) / DAY:.1f} days ago"])


def _sort_leftover(
    plan: GarbagePlan, x: Leftover, keep: Keys | None, min_age_minutes: float, now: float
) -> None:
    item = GarbageItem(x.kind, x.path, x.size, "", x.stage, x.key)
    age_min = (now - x.modified) / 60
    if x.in_use:
        plan.kept.append(_with(item, "in use by a running stage"))
    elif age_min < min_age_minutes:
        plan.kept.append(
            _with(
                item,
                f"modified {age_min:.0f} min ago (under {min_age_minutes:g}); may belong to a running stage",
            )
        )
    elif x.kind == "work dir" and keep is not None and (x.stage, x.key) in keep:
        plan.kept.append(_with(item, "a planned run of a given config resumes from it"))
    else:
        held = "no running stage holds it; " if x.kind == "work dir" else ""
        plan.delete.append(_with(item, f"{held}untouched for {age_min / 60:.1f} h"))


def _with(item: GarbageItem, reason: str) -> GarbageItem:
    return GarbageItem(item.kind, item.where, item.size, reason, item.stage, item.key)


def _stale_copies(
    store: ArtifactStore, listing: StoreListing, doomed: set[tuple[str, str]]
) -> list[GarbageItem]:
    """Verified local copies of a remote store's artifacts (`<cache>/<stage>/<key>/<version>/`) whose
    artifact is deleted or about to be, or whose version the marker no longer names."""
    if store.is_local:
        return []
    current = {
        (a.stage, a.key): a.record.get("dir") or "_flat"
        for a in listing.artifacts
        if (a.stage, a.key) not in doomed
    }
    out = []
    for stage_dir in _subdirs(store.cache_dir):
        for copy in _subdirs(stage_dir):
            here = (stage_dir.name, copy.name)
            if copy.name.startswith("."):
                continue
            if here not in current:
                out.append(
                    GarbageItem(
                        "cached copy",
                        str(copy),
                        _tree_stats(copy)[0],
                        "its artifact is gone from the store",
                        *here,
                    )
                )
                continue
            old = [v for v in _subdirs(copy) if v.name != current[here] and not v.name.startswith(".")]
            why = "a version the store no longer names"
            out += [GarbageItem("cached copy", str(v), _tree_stats(v)[0], why, *here) for v in old]
    return out


def collect(store: ArtifactStore, items: Iterable[GarbageItem], min_age_minutes: float = 60.0) -> int:
    """Delete the items `find_garbage` chose; returns the bytes freed (items that changed meanwhile are skipped)."""
    freed = 0
    for item in items:
        if _remove(store, item, min_age_minutes):
            freed += item.size
    remove_orphan_locks(store)
    return freed


def _remove(store: ArtifactStore, item: GarbageItem, min_age_minutes: float) -> bool:
    if item.kind == "artifact":
        store.delete(item.stage, item.key)
    elif item.kind == "work dir":
        return remove_work_dir(Path(item.where), min_age_minutes)
    elif item.kind == "unfinished commit" and item.key.startswith("."):  # a local commit's copy: never read
        store.remove_tree(item.where)
    elif item.kind == "unfinished commit":
        if store.lookup(item.stage, item.key) is not None:  # committed since the listing: not garbage
            return False
        store.delete(item.stage, item.key)
    elif item.kind == "old version":
        found = store.lookup(item.stage, item.key)
        if found is not None and in_current_version(found.manifest, item.where.rsplit("/", 1)[-1]):
            return False  # the marker names it again (an older store's files, reused): in use
        store.remove_tree(item.where)
    elif item.kind == "cached copy":
        shutil.rmtree(item.where, ignore_errors=True)
    else:  # probe, prefect result: single files
        store.remove_tree(item.where)
    return True


def remove_work_dir(work: Path, min_age_minutes: float = 0.0) -> bool:
    """Delete a work dir under its exclusive lock, unless a stage holds it or it was touched recently."""
    with work_lock(work, exclusive=True, blocking=False) as free:
        if not free or (work.exists() and time.time() - _tree_stats(work)[1] < min_age_minutes * 60):
            return False
        shutil.rmtree(work, ignore_errors=True)
        lock_path(work).unlink(missing_ok=True)  # waiters notice the unlinked file and lock a new one
    return True


def remove_orphan_locks(store: ArtifactStore) -> None:
    """Lock files whose work dir is gone (a stage that finished leaves its lock file behind)."""
    for stage_dir in _subdirs(store.work_base):
        for lock in stage_dir.glob("*.lock"):
            work = lock.with_name(lock.name.removesuffix(".lock"))
            if not work.exists():
                with work_lock(work, exclusive=True, blocking=False) as free:
                    if free and not work.exists():
                        lock.unlink(missing_ok=True)
        with contextlib.suppress(OSError):  # only when empty; a stage starting now re-creates it
            stage_dir.rmdir()


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
