"""`ArtifactStore`: the one object the stages use to look up, build, commit, read and delete artifacts.

It adds to `StoreAccess` (paths, markers, checks, retried calls) the operations that each live in
their own module: building in a work dir (`workdirs`), committing (`commit`) and reading verified
files (`copies`). Deleting stays here: it is the reverse of a commit and needs all of the above.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from finescope_core.store.access import StoreAccess
from finescope_core.store.artifact import MARKER, Artifact
from finescope_core.store.commit import commit as commit_dir
from finescope_core.store.copies import local_path as checked_local_path
from finescope_core.store.workdirs import building_dir


class ArtifactStore(StoreAccess):
    """Stage directories under one fsspec root (a local directory or e.g. `s3://bucket/prefix`).

    Constructed as `StoreAccess` (uri, storage_options, cache_dir, retry).
    """

    @contextlib.contextmanager
    def work_dir(self, stage: str, key: str, *, resume: bool) -> Iterator[Path]:
        """A local directory for building (stage, key) that survives a crash, for stages that resume.

        It is tied to the key, so a re-run after a kill finds what the killed run wrote; it is removed
        once the stage has been committed. With `resume=False` any leftovers are cleared first. An
        exclusive lock is held meanwhile: a second run of the same key on this machine waits for the
        first (and should then look the key up again), two runs never write one work dir, and
        `finescope store gc` never removes it under a running stage.
        """
        with building_dir(self.work_base, self.uri, stage, key, resume=resume) as path:
            yield path

    def commit(self, local_dir: Path, stage: str, key: str, info: dict[str, Any]) -> Artifact:
        """Publish `local_dir` as (stage, key): hash every file, upload, then make the marker visible last."""
        return commit_dir(self, local_dir, stage, key, info)

    def local_path(self, artifact: Artifact) -> Path:
        """A local directory holding the artifact's files, checked against its marker.

        Local store: the store's own directory, size and mtime checked (sha256 where they moved);
        remote: a verified copy (every sha256 checked on download). Files that vanish because the
        artifact was replaced meanwhile are read from the new version, if it holds the same content.

        Raises:
            DamagedArtifact: files missing or not as recorded, or replaced by different content.
        """
        return checked_local_path(self, artifact)

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
