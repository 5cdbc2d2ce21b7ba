"""Looking into an artifact store and cleaning it up: what is committed, what killed runs left behind.

The store only grows: every changed setting adds artifacts under new keys, and a killed run leaves
its work dir (and, on an object store, possibly a half-uploaded directory). These modules list all
of it with sizes (`listing`: what `ls` shows; `scanning`: reading the store into it; `local_dirs`:
this machine's work dirs) and delete it safely (`gc`): a committed artifact loses its marker first
(`ArtifactStore.delete`), and a leftover goes only once it has been left alone for a while and, for
a work dir, only under an exclusive lock that no running stage holds (`work_lock`).
"""

from finescope_core.store_admin.gc import DAY, GarbageItem, GarbagePlan, Keys, collect, find_garbage
from finescope_core.store_admin.listing import (
    OUTPUTS_DIR,
    RESULTS_DIR,
    Leftover,
    StoredArtifact,
    StoredFile,
    StoreListing,
    artifacts_of,
    describe,
    human,
)
from finescope_core.store_admin.local_dirs import in_use, remove_orphan_locks, remove_work_dir, work_dirs
from finescope_core.store_admin.scanning import in_current_version, scan

__all__ = [
    "DAY",
    "OUTPUTS_DIR",
    "RESULTS_DIR",
    "GarbageItem",
    "GarbagePlan",
    "Keys",
    "Leftover",
    "StoreListing",
    "StoredArtifact",
    "StoredFile",
    "artifacts_of",
    "collect",
    "describe",
    "find_garbage",
    "human",
    "in_current_version",
    "in_use",
    "remove_orphan_locks",
    "remove_work_dir",
    "scan",
    "work_dirs",
]
