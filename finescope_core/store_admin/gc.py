"""`finescope store gc`: deciding what to collect from a listing, and collecting it safely.

A committed artifact loses its marker first (`ArtifactStore.delete`); a leftover goes only once it
has been left alone for a while and, for a work dir, only under an exclusive lock that no running
stage holds (`local_dirs.remove_work_dir`).
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from finescope_core.store import ArtifactStore
from finescope_core.store_admin.listing import Leftover, StoredArtifact, StoreListing
from finescope_core.store_admin.local_dirs import remove_orphan_locks, remove_work_dir, subdirs, tree_stats
from finescope_core.store_admin.scanning import in_current_version

DAY = 86400.0


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
        keep: the (stage, key) pairs some config still uses; None: no config given, reachability is
            not a reason.
        keep_days: artifacts and Prefect results created within this many days stay; None: age is not
            a reason. With both, an artifact goes when it is unused *and* older (recent experiments survive).
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
    for stage_dir in subdirs(store.cache_dir):
        for copy in subdirs(stage_dir):
            here = (stage_dir.name, copy.name)
            if copy.name.startswith("."):
                continue
            if here not in current:
                out.append(
                    GarbageItem(
                        "cached copy",
                        str(copy),
                        tree_stats(copy)[0],
                        "its artifact is gone from the store",
                        *here,
                    )
                )
                continue
            old = [v for v in subdirs(copy) if v.name != current[here] and not v.name.startswith(".")]
            why = "a version the store no longer names"
            out += [GarbageItem("cached copy", str(v), tree_stats(v)[0], why, *here) for v in old]
    return out


def collect(store: ArtifactStore, items: Iterable[GarbageItem], min_age_minutes: float = 60.0) -> int:
    """Delete the items `find_garbage` chose; returns the bytes freed.

    Items that changed since the listing (committed or named by a marker again, locked) are skipped."""
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
