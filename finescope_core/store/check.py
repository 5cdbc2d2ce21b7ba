"""Checking a stored stage directory against what its marker recorded: cheaply on reuse, fully on demand.

At commit the marker records each file's sha256 (`files`, which the artifact's hash and so every
downstream key is made of) and, beside it, each file's size (`sizes`) and, in a local store, its
modification time in nanoseconds (`mtimes`). These two stay out of `files`, so an artifact's hash
never depends on when its files were written. A reuse compares size and mtime (one `stat` per
file) and hashes a file only when its mtime moved; `full` hashes every file. An artifact committed
before sizes were recorded has nothing cheap to compare, so its files are hashed.
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def file_stats(root: Path, rels: Iterable[str]) -> tuple[dict[str, int], dict[str, int]]:
    """(size, mtime in ns) of each file `root / rel`, as the marker records them."""
    sizes, mtimes = {}, {}
    for rel in rels:
        st = (root / rel).stat()
        sizes[rel], mtimes[rel] = st.st_size, st.st_mtime_ns
    return sizes, mtimes


def local_damage(
    root: Path, manifest: Mapping[str, Any], *, full: bool = False, mtimes_field: str = "mtimes"
) -> list[str]:
    """What is wrong with the files of `manifest` under `root`: one `"<file>: <problem>"` per bad file.

    Args:
        full: hash every file, even one whose size and mtime match the record.
        mtimes_field: the marker field with the mtimes of these very files (a verified local copy of a
            remote artifact records its own under another name).
    """
    files: dict[str, str] = manifest.get("files", {})
    sizes: dict[str, int] = manifest.get("sizes") or {}
    mtimes: dict[str, int] = manifest.get(mtimes_field) or {}
    problems = []
    for rel, digest in sorted(files.items()):
        problem = _file_problem(root / rel, digest, sizes.get(rel), mtimes.get(rel), full)
        if problem is not None:
            problems.append(f"{rel}: {problem}")
    return problems


def _file_problem(path: Path, digest: str, size: int | None, mtime: int | None, full: bool) -> str | None:
    try:
        st = os.stat(path)
    except (FileNotFoundError, NotADirectoryError):
        return "missing"
    if not stat.S_ISREG(st.st_mode):
        return "not a regular file"
    if size is not None and st.st_size != size:
        return f"{st.st_size} bytes, {size} recorded"
    if not full and size is not None and st.st_mtime_ns == mtime:
        return None  # unchanged since commit, as far as a stat can tell; `store verify` hashes it
    if sha256_file(path) != digest:
        return "content does not match its recorded sha256"
    return None


def listed_damage(listed: Mapping[str, int], manifest: Mapping[str, Any]) -> list[str]:
    """The same check on a remote listing (relative path -> size): presence, and size where recorded.

    A remote file's content is hashed when it is downloaded (`ArtifactStore.local_path`)."""
    sizes: dict[str, int] = manifest.get("sizes") or {}
    problems = []
    for rel in sorted(manifest.get("files", {})):
        if rel not in listed:
            problems.append(f"{rel}: missing")
        elif rel in sizes and listed[rel] != sizes[rel]:
            problems.append(f"{rel}: {listed[rel]} bytes, {sizes[rel]} recorded")
    return problems


COPY_MTIMES = "copy_mtimes"
"""Marker field of a verified local copy of a remote artifact: the mtimes of the copy's own files."""


def sound_copy(dest: Path, manifest: Mapping[str, Any], marker: str = "_COMPLETE.json") -> bool:
    """Whether `dest` is a complete, unchanged local copy of exactly the artifact version `manifest`."""
    try:
        doc = json.loads((dest / marker).read_text())
    except (OSError, ValueError):
        return False
    same = {k: v for k, v in doc.items() if k != COPY_MTIMES} == manifest
    return same and not local_damage(dest, doc, mtimes_field=COPY_MTIMES)
