"""The file formats records are read from: JSONL, JSON, Parquet, .txt and HF `save_to_disk` directories,
local or any fsspec URI, each raw record with its origin (`file:line`, `file:row N`) for error messages.
"""

from __future__ import annotations

import io
import json
from collections.abc import Iterator
from pathlib import PurePosixPath
from typing import Any

import fsspec

from finescope_core.local_paths import missing_reason

REQUEST_FIELDS = ("messages", "instruction", "prompt")
"""The fields a record's request comes from, in order of precedence."""
RECORD_FIELDS = ("text", *REQUEST_FIELDS)
"""A record has at least one of these (not null); the other supported fields only come with one of them."""


class DataError(ValueError):
    """Bad input data; the message names the file (and line or row) and what to fix."""


def _fs_and_path(uri: str, storage_options: dict[str, Any] | None) -> tuple[fsspec.AbstractFileSystem, str]:
    fs, path = fsspec.core.url_to_fs(uri, **(storage_options or {}))
    return fs, path


def _is_local(fs: fsspec.AbstractFileSystem) -> bool:
    return "file" in (fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,))


def _expand(
    uri: str, storage_options: dict[str, Any] | None
) -> list[tuple[fsspec.AbstractFileSystem, str, str]]:
    """(fs, path, display name) for each file named by `uri` (globs allowed)."""
    try:
        fs, path = _fs_and_path(uri, storage_options)
        if any(c in path for c in "*?["):
            paths = sorted(fs.glob(path))
            if not paths:
                raise DataError(
                    f"{uri}: the pattern matches no file; check the pattern and the directory it names"
                )
        else:
            if not fs.exists(path):
                reason = missing_reason(path) if _is_local(fs) else "no such file or directory"
                if not reason.startswith("no such"):  # a symlink loop or a broken link: its own fix
                    raise DataError(f"{uri}: {reason}")
                raise DataError(
                    f"{uri}: no such file or directory; check the path (relative paths in a config file "
                    "are resolved against the file's directory)"
                )
            paths = [path]
    except DataError:
        raise
    except (OSError, ValueError, PermissionError) as e:
        raise DataError(
            f"{uri}: cannot be reached ({type(e).__name__}: {e}); check the path and credentials"
        ) from e
    protocol = uri.split("://", 1)[0] + "://" if "://" in uri else ""
    return [(fs, p, protocol + p if protocol else p) for p in paths]


def _is_hf_dataset_dir(fs: fsspec.AbstractFileSystem, path: str) -> bool:
    return bool(
        fs.isdir(path) and (fs.exists(f"{path}/dataset_info.json") or fs.exists(f"{path}/state.json"))
    )


def _read_jsonl(data: bytes, name: str) -> Iterator[tuple[dict[str, Any], str]]:
    for lineno, raw in enumerate(data.split(b"\n"), start=1):
        if not raw.strip():
            continue
        origin = f"{name}:{lineno}"
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise DataError(
                f"{origin}: not valid UTF-8 (byte {e.start}); re-encode the file as UTF-8"
            ) from None
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(
                f"{origin}: malformed JSON ({e.msg} at column {e.colno}); fix or remove the line"
            ) from None
        if not isinstance(obj, dict):
            hint = " (a file holding one JSON array should be named .json)" if isinstance(obj, list) else ""
            raise DataError(f"{origin}: each line must be a JSON object, got {type(obj).__name__}{hint}")
        yield obj, origin


def _read_json(data: bytes, name: str) -> Iterator[tuple[dict[str, Any], str]]:
    """A `.json` file: a JSON array of records, `{"<field>": [records]}`, one record, or JSONL.

    JSONL named `.json` is common (HF `to_json` writes it), so a document that is more than one JSON
    value is read line by line, unless it starts with `[` (then it is a broken array).
    """
    text = _decode(data, name)
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as e:
        if e.msg == "Extra data" and not text.lstrip().startswith("["):
            yield from _read_jsonl(data, name)
            return
        raise DataError(
            f"{name}:{e.lineno}:{e.colno}: malformed JSON ({e.msg}); fix the file (a .json file holds one "
            "JSON array of records, or one JSON object per line)"
        ) from None
    if isinstance(doc, dict) and (key := _wrapped_list(doc)) is None:
        yield doc, f"{name}:1"  # one record, perhaps pretty-printed
        return
    if isinstance(doc, dict):
        items, what, label = doc[key], repr(key), f"{key} "
    elif isinstance(doc, list):
        items, what, label = doc, "the array", ""
    else:
        raise DataError(f"{name}: holds a JSON {type(doc).__name__}; give a JSON array of record objects")
    for i, item in enumerate(items):
        origin = f"{name}:{label}item {i}"
        if not isinstance(item, dict):
            raise DataError(f"{origin}: each item of {what} must be a JSON object, got {type(item).__name__}")
        yield item, origin


def _wrapped_list(doc: dict[str, Any]) -> str | None:
    """The key of `{"data": [records]}`: a document whose only field is a list and not a record field."""
    if len(doc) != 1:
        return None
    key, value = next(iter(doc.items()))
    return key if isinstance(value, list) and key not in RECORD_FIELDS else None


def _decode(data: bytes, name: str) -> str:
    """A whole file as UTF-8 text; a bad byte is reported with its line."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise DataError(f"{name}:{line}: not valid UTF-8; re-encode the file as UTF-8") from None


def _read_txt(data: bytes, name: str) -> Iterator[tuple[dict[str, Any], str]]:
    text = _decode(data, name)
    for lineno, line in enumerate(text.splitlines(), start=1):
        if line.strip():
            yield {"text": line.strip()}, f"{name}:{lineno}"


def _read_parquet(data: bytes, name: str) -> Iterator[tuple[dict[str, Any], str]]:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(io.BytesIO(data))
    except Exception as e:  # pyarrow raises several unrelated types for corrupt files
        raise DataError(f"{name}: not a readable Parquet file ({e})") from None
    for row, obj in enumerate(table.to_pylist()):
        yield obj, f"{name}:row {row}"


def _read_hf_dir(
    uri: str, name: str, storage_options: dict[str, Any] | None
) -> Iterator[tuple[dict[str, Any], str]]:
    import datasets

    try:
        ds = datasets.load_from_disk(uri, storage_options=storage_options)
    except Exception as e:  # datasets wraps many failure types
        raise DataError(f"{name}: not a readable HF save_to_disk directory ({e})") from None
    if isinstance(ds, datasets.DatasetDict):
        split = "train" if "train" in ds else next(iter(ds))
        ds = ds[split]
        name = f"{name}[{split}]"
    for row, obj in enumerate(ds):
        yield dict(obj), f"{name}:row {row}"


def iter_raw(uri: str, storage_options: dict[str, Any] | None) -> Iterator[tuple[dict[str, Any], str, str]]:
    """(fields, origin, file stem) for every raw record behind `uri`."""
    for fs, path, name in _expand(uri, storage_options):
        stem = PurePosixPath(path).name.split(".")[0]
        if _is_hf_dataset_dir(fs, path):
            for obj, origin in _read_hf_dir(name, name, storage_options):
                yield obj, origin, stem
            continue
        if fs.isdir(path):
            raise DataError(
                f"{name}: is a directory but not an HF save_to_disk dataset; name the files inside it"
            )
        suffix = "".join(PurePosixPath(path).suffixes[-1:]).lower()
        readers = {".jsonl": _read_jsonl, ".json": _read_json, ".txt": _read_txt, ".parquet": _read_parquet}
        if suffix not in readers:
            raise DataError(
                f"{name}: unsupported file type {suffix or '(none)'}; use .jsonl, .json, .parquet, .txt "
                "or an HF dataset dir"
            )
        try:
            with fs.open(path, "rb") as f:
                data = f.read()
        except PermissionError as e:  # not transient: the user must fix it (other OSErrors stay retryable)
            raise DataError(
                f"{name}: cannot be read ({e.strerror}); check the file's permissions and the credentials"
            ) from e
        if not data.strip():
            raise DataError(f"{name}: the file is empty; fill it or remove it from the config")
        for obj, origin in readers[suffix](data, name):
            yield obj, origin, stem
