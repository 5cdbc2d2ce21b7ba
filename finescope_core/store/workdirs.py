"""Work dirs: where a stage builds its files before the commit, and the locks that guard them.

A work dir is tied to its (stage, key), so a re-run after a kill finds what the killed run wrote.
While a stage builds in it, the stage holds an exclusive flock on a lock file beside it; the kernel
drops that lock when the process dies, so `finescope store gc` can tell the work dir of a killed run
(collectable) from that of a running stage (never touched).
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

from finescope_core.store.artifact import StoreError

try:
    import fcntl
except ImportError:  # no flock (Windows): work dirs are then told apart by age alone
    fcntl = None  # type: ignore[assignment]

log = logging.getLogger("finescope.store")


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


@contextlib.contextmanager
def building_dir(work_base: Path, uri: str, stage: str, key: str, *, resume: bool) -> Iterator[Path]:
    """The work dir `<work_base>/<stage>/<key>` of the store `uri`, held exclusively while in use.

    With `resume=False` any leftovers are cleared first; the directory is removed once the block
    ends without an error (the stage has been committed). A second run of the same key on this
    machine waits for the first (and should then look the key up again).
    """
    path = work_base / stage / key
    with contextlib.ExitStack() as held:
        try:
            held.enter_context(_hold(path, stage, key))
            if not resume:
                shutil.rmtree(path, ignore_errors=True)
            path.mkdir(parents=True, exist_ok=True)
        except OSError as e:  # before any work: a read-only store cannot build what it lacks
            raise StoreError(
                f"store {uri!r}: cannot create the work dir of stage {stage!r} (key {key}) in "
                f"{work_base} ({type(e).__name__}: {e}); this stage is not stored and must be "
                "computed: make the store writable, or point `store` at a writable copy of it"
            ) from None
        yield path
        shutil.rmtree(path, ignore_errors=True)


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
