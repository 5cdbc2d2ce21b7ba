"""Copy a run's outputs (files and directories) to a local directory or any fsspec URI.

Each output replaces the previous one of the same name whole: a local one is copied under a hidden
temporary name and renamed into place, so a reader never sees half of a model directory; a remote one
is uploaded under a temporary name too, and the old one is removed only once the new one is complete.
The caller writes `run.json` last, so its presence says the export finished.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import fsspec


@dataclass(frozen=True)
class Output:
    """One output: a copy of a local file or directory, or a text file, plus text files added to it.

    `files` are written inside a directory output (a model card `README.md`, a patched
    `adapter_config.json`), replacing same-named files of the source; for a file output without a
    `source`, `text` is its content.
    """

    name: str
    source: Path | None = None
    text: str | None = None
    files: dict[str, str] = field(default_factory=dict)

    def check(self) -> None:
        if self.source is None and self.text is None:
            raise ValueError(f"output {self.name}: give a source or a text")
        if self.source is not None and not self.source.exists():
            raise FileNotFoundError(f"output {self.name}: its source {self.source} does not exist")
        if self.files and (self.source is None or not self.source.is_dir()):
            raise ValueError(f"output {self.name}: extra files need a directory source")


class ExportError(OSError):
    """An output location that cannot be written; the message names it and the fix."""


def output_uri(dest: str, name: str) -> str:
    """Where output `name` lands under `dest`."""
    return f"{dest.rstrip('/')}/{name}" if "://" in dest else str(Path(dest) / name)


def export_outputs(
    outputs: Sequence[Output], dest: str, storage_options: dict[str, Any] | None = None
) -> dict[str, str]:
    """Write each output to `dest/<name>`, replacing what was there, in the order given.

    Args:
        outputs: what to write; names may contain `/`.
        dest: a local directory (created) or an fsspec URI such as `s3://bucket/runs/math`.

    Returns:
        Output name -> its URI.

    Raises:
        ExportError: `dest` exists and is not a directory, or cannot be created.
    """
    for out in outputs:
        out.check()
    if "://" in dest and not dest.startswith("file://"):
        fs, root = fsspec.core.url_to_fs(dest, **(storage_options or {}))
        return {out.name: _put_remote(fs, root, out, dest) for out in outputs}
    local = Path(dest.removeprefix("file://")).expanduser()
    if local.exists() and not local.is_dir():
        raise ExportError(f"output location {dest} is a file; give a directory (--out / output:)")
    try:
        local.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ExportError(
            f"output location {dest} cannot be created ({e.strerror}); choose another --out / output:"
        ) from e
    return {out.name: str(_put_local(local, out)) for out in outputs}


def _stage(out: Output, tmp: Path) -> None:
    """The output's full content at `tmp` (a local path that does not exist yet)."""
    if out.source is None:
        tmp.write_text(out.text or "", encoding="utf-8")
    elif out.source.is_dir():
        shutil.copytree(out.source, tmp)
        for rel, text in out.files.items():
            (tmp / rel).write_text(text, encoding="utf-8")
    else:
        shutil.copyfile(out.source, tmp)


def _put_local(root: Path, out: Output) -> Path:
    target = root / out.name
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.{uuid.uuid4().hex[:8]}.tmp")
    _stage(out, tmp)
    if target.is_dir() and not target.is_symlink():
        # A directory cannot be replaced by rename: move the old one aside first, then drop it.
        old = target.with_name(f".{target.name}.{uuid.uuid4().hex[:8]}.old")
        os.replace(target, old)
        os.replace(tmp, target)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, target)
    return target


def _put_remote(fs: fsspec.AbstractFileSystem, root: str, out: Output, dest: str) -> str:
    """Upload under a temporary prefix, then swap it in: no rename on object stores, so copy server-side."""
    target = f"{root.rstrip('/')}/{out.name}"
    with tempfile.TemporaryDirectory(prefix="finescope-export-") as scratch:
        staged = Path(scratch) / "out"
        if out.source is not None and out.source.is_dir() and not out.files:
            staged = out.source  # nothing to add: upload the source as it is
        else:
            _stage(out, staged)
        if staged.is_file():
            fs.put_file(str(staged), target)  # one object: a single PUT becomes visible whole
            return output_uri(dest, out.name)
        files = sorted(p.relative_to(staged).as_posix() for p in staged.rglob("*") if p.is_file())
        tmp = f"{root.rstrip('/')}/.{out.name.replace('/', '_')}.{uuid.uuid4().hex[:8]}.tmp"
        for rel in files:
            fs.put_file(str(staged / rel), f"{tmp}/{rel}")
    if fs.exists(target):
        fs.rm(target, recursive=True)
    for rel in files:
        fs.copy(f"{tmp}/{rel}", f"{target}/{rel}")
    fs.rm(tmp, recursive=True)
    return output_uri(dest, out.name)
