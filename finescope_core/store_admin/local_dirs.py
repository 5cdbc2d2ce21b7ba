"""The local directory trees this machine keeps for a store: work dirs and their lock files.

A work dir goes only under its exclusive lock (`work_lock`), which no running stage holds, so a
collector never removes the files of a stage at work; the kernel frees a killed run's lock.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import time
from pathlib import Path

from finescope_core.store import ArtifactStore, lock_path, work_lock
from finescope_core.store_admin.listing import Leftover


def work_dirs(store: ArtifactStore) -> list[Leftover]:
    """The store's work dirs on this machine: `<work_base>/<stage>/<key>/`, with size, age and lock state."""
    base = store.work_base
    out = []
    for stage_dir in subdirs(base):
        for work in subdirs(stage_dir):
            try:
                size, modified = tree_stats(work)
            except FileNotFoundError:  # its stage committed and removed it meanwhile
                continue
            out.append(
                Leftover("work dir", stage_dir.name, work.name, str(work), size, modified, in_use(work))
            )
    return out


def subdirs(path: Path) -> list[Path]:
    try:
        return sorted(p for p in path.iterdir() if p.is_dir())
    except (FileNotFoundError, NotADirectoryError):
        return []


def tree_stats(path: Path) -> tuple[int, float]:
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


def remove_work_dir(work: Path, min_age_minutes: float = 0.0) -> bool:
    """Delete a work dir under its exclusive lock, unless a stage holds it or it was touched recently."""
    with work_lock(work, exclusive=True, blocking=False) as free:
        if not free or (work.exists() and time.time() - tree_stats(work)[1] < min_age_minutes * 60):
            return False
        shutil.rmtree(work, ignore_errors=True)
        lock_path(work).unlink(missing_ok=True)  # waiters notice the unlinked file and lock a new one
    return True


def remove_orphan_locks(store: ArtifactStore) -> None:
    """Lock files whose work dir is gone (a stage that finished leaves its lock file behind)."""
    for stage_dir in subdirs(store.work_base):
        for lock in stage_dir.glob("*.lock"):
            work = lock.with_name(lock.name.removesuffix(".lock"))
            if not work.exists():
                with work_lock(work, exclusive=True, blocking=False) as free:
                    if free and not work.exists():
                        lock.unlink(missing_ok=True)
        with contextlib.suppress(OSError):  # only when empty; a stage starting now re-creates it
            stage_dir.rmdir()
