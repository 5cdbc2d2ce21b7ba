"""Small file helpers shared by the stages: JSON lines in and out, and atomic writes.

A stage writing inside its store work dir needs no atomic write: the store commits the whole
directory at once (`ArtifactStore.commit`). `write_atomic` is for files written anywhere else
(exported outputs, demo data, resume files that a killed run may leave half written).
"""

from __future__ import annotations

import functools
import json
import os
import uuid
from collections.abc import Iterable
from pathlib import Path
from typing import IO, Any

import numpy as np


class JsonlError(ValueError):
    """A JSON lines file with a bad line; the message names the file and line."""


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """The objects of a JSON lines file, blank lines skipped.

    Raises:
        JsonlError: a line that is not a JSON object, naming `path:line` and the fix.
    """
    with Path(path).open(encoding="utf-8") as f:
        return [_parse_line(path, lineno, line) for lineno, line in enumerate(f, 1) if line.strip()]


def _parse_line(path: str | Path, lineno: int, line: str | bytes) -> dict[str, Any]:
    """One JSON lines line as an object, or a JsonlError naming `path:lineno` and the fix."""
    try:
        row = json.loads(line)
    except json.JSONDecodeError as e:
        raise JsonlError(f"{path}:{lineno}: not valid JSON ({e.msg}); fix or remove the line") from None
    if not isinstance(row, dict):
        raise JsonlError(f"{path}:{lineno}: each line must be a JSON object, got {type(row).__name__}")
    return row


def dump_jsonl(rows: Iterable[dict[str, Any]], f: IO[str]) -> None:
    """One JSON object per line to an open text file, UTF-8, non-ASCII kept as is."""
    for row in rows:
        f.write(json.dumps(row, ensure_ascii=False, default=str) + "\n")


def write_jsonl(rows: Iterable[dict[str, Any]], path: str | Path, *, atomic: bool = False) -> Path:
    """Write `rows` as JSON lines to `path` (atomically: see `write_atomic`)."""
    path = Path(path)
    if atomic:
        return write_atomic(path, lambda f: dump_jsonl(rows, f))
    with path.open("w", encoding="utf-8") as f:
        dump_jsonl(rows, f)
    return path


def write_atomic(path: str | Path, write: Any) -> Path:
    """Write `path` through a temporary file beside it, renamed into place.

    Readers see the old file or the new one, never half of one.

    Args:
        write: called with the open temporary text file (or a str / bytes to write as they are).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # A plain open (not mkstemp, which creates 0600 files), so the file gets the usual umask mode.
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        if isinstance(write, bytes):
            tmp.write_bytes(write)
        elif isinstance(write, str):
            tmp.write_text(write, encoding="utf-8")
        else:
            with tmp.open("x", encoding="utf-8") as f:
                write(f)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


@functools.lru_cache(maxsize=16)
def _line_offsets(path: str, size: int, mtime_ns: int) -> np.ndarray:
    """Byte offset of each line start of `path` (and of its end): [lines + 1] int64. Keyed by the file's
    size and modification time, so a changed file is indexed again."""
    offsets = [0]
    with open(path, "rb") as f:
        for line in f:
            offsets.append(offsets[-1] + len(line))
    return np.asarray(offsets, dtype=np.int64)


def read_jsonl_rows(path: str | Path, start: int, stop: int) -> list[dict[str, Any]]:
    """Lines [start, stop) of a JSON lines file with one object on every line (no blank lines), read
    without parsing the others; the file's line index is built once per process.

    Raises:
        JsonlError: a range outside the file, or a line that is not a JSON object (naming `path:line`).
    """
    st = os.stat(path)
    offsets = _line_offsets(str(path), st.st_size, st.st_mtime_ns)
    lines = len(offsets) - 1
    if not 0 <= start <= stop <= lines:
        raise JsonlError(f"{path}: lines [{start}, {stop}) requested, the file has {lines}")
    with open(path, "rb") as f:
        f.seek(int(offsets[start]))
        data = f.read(int(offsets[stop] - offsets[start]))
    return [_parse_line(path, lineno, line) for lineno, line in enumerate(data.splitlines(), start + 1)]
