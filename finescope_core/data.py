"""Data in: JSONL / Parquet / .txt / HF `save_to_disk` directories, local or any fsspec URI.

Every record keeps its original fields (and `id`, always a string, assigned stably when missing) so
that outputs can carry the user's records unchanged. Validation happens here, before any model work.
"""

from __future__ import annotations

import hashlib
import io
import json
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import PurePosixPath
from typing import Any

import fsspec

MAX_TEXT_CHARS = 1_000_000
"""A record longer than this is refused: it is almost always a broken file (one giant line)."""
INSTRUCTION_FIELDS = ("instruction", "input", "output")


class DataError(ValueError):
    """Bad input data; the message names the file (and line or row) and what to fix."""


@dataclass(frozen=True)
class Record:
    """One input record: its id, the text the model reads, and the original fields."""

    id: str
    text: str
    fields: dict[str, Any]
    origin: str
    """Where it came from, as `file:line` (or `file:row N`), for error messages."""

    @property
    def instruction(self) -> str | None:
        value = self.fields.get("instruction")
        return value if isinstance(value, str) else None

    @property
    def reference(self) -> str | None:
        """The reference answer (`output`) of an instruction record, if any."""
        value = self.fields.get("output")
        return value if isinstance(value, str) and value.strip() else None


@dataclass
class RecordSet:
    """Validated records from one or more inputs, with a content hash over ids and texts."""

    records: list[Record]
    sources: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.records)

    @property
    def texts(self) -> list[str]:
        return [r.text for r in self.records]

    @property
    def sha256(self) -> str:
        h = hashlib.sha256()
        for r in self.records:
            h.update(json.dumps([r.id, r.text, r.fields], sort_keys=True, default=str).encode())
            h.update(b"\n")
        return h.hexdigest()


def record_text(fields: dict[str, Any], origin: str) -> str:
    """The text a model reads for a record: `text`, or instruction (+ input) (+ output).

    Raises:
        DataError: neither `text` nor `instruction` present, non-string values, or empty text.
    """
    if "text" in fields:
        text = fields["text"]
        if not isinstance(text, str):
            raise DataError(f"{origin}: field 'text' must be a string, got {type(text).__name__}")
    elif "instruction" in fields:
        parts = []
        for name in INSTRUCTION_FIELDS:
            value = fields.get(name)
            if value is None:
                continue
            if not isinstance(value, str):
                raise DataError(f"{origin}: field {name!r} must be a string, got {type(value).__name__}")
            if value.strip():
                parts.append(value.strip())
        text = "\n\n".join(parts)
    else:
        found = ", ".join(sorted(fields)) or "none"
        raise DataError(
            f"{origin}: record has no 'text' and no 'instruction' field (fields found: {found}); "
            "give each record a 'text' or 'instruction'/'input'/'output'"
        )
    if not text.strip():
        raise DataError(f"{origin}: the record's text is empty; remove the record or fill it in")
    if len(text) > MAX_TEXT_CHARS:
        raise DataError(
            f"{origin}: the record is {len(text):,} characters (limit {MAX_TEXT_CHARS:,}); "
            "is the file one giant line? split it into records"
        )
    return text


def _fs_and_path(uri: str, storage_options: dict[str, Any] | None) -> tuple[fsspec.AbstractFileSystem, str]:
    fs, path = fsspec.core.url_to_fs(uri, **(storage_options or {}))
    return fs, path


def _expand(uri: str, storage_options: dict[str, Any] | None) -> list[tuple[fsspec.AbstractFileSystem, str, str]]:
    """(fs, path, display name) for each file named by `uri` (globs allowed)."""
    try:
        fs, path = _fs_and_path(uri, storage_options)
        if any(c in path for c in "*?["):
            paths = sorted(fs.glob(path))
            if not paths:
                raise DataError(f"{uri}: the pattern matches no file; check the pattern and the directory it names")
        else:
            if not fs.exists(path):
                raise DataError(
                    f"{uri}: no such file or directory; check the path (relative paths in a config file "
                    "are resolved against the file's directory)"
                )
            paths = [path]
    except DataError:
        raise
    except (OSError, ValueError, PermissionError) as e:
        raise DataError(f"{uri}: cannot be reached ({type(e).__name__}: {e}); check the path and credentials") from e
    protocol = uri.split("://", 1)[0] + "://" if "://" in uri else ""
    return [(fs, p, protocol + p if protocol else p) for p in paths]


def _is_hf_dataset_dir(fs: fsspec.AbstractFileSystem, path: str) -> bool:
    return fs.isdir(path) and (fs.exists(f"{path}/dataset_info.json") or fs.exists(f"{path}/state.json"))


def _read_jsonl(data: bytes, name: str) -> Iterator[tuple[dict[str, Any], str]]:
    for lineno, raw in enumerate(data.split(b"\n"), start=1):
        if not raw.strip():
            continue
        origin = f"{name}:{lineno}"
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise DataError(f"{origin}: not valid UTF-8 (byte {e.start}); re-encode the file as UTF-8") from None
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{origin}: malformed JSON ({e.msg} at column {e.colno}); fix or remove the line") from None
        if not isinstance(obj, dict):
            raise DataError(f"{origin}: each line must be a JSON object, got {type(obj).__name__}")
        yield obj, origin


def _read_txt(data: bytes, name: str) -> Iterator[tuple[dict[str, Any], str]]:
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise DataError(f"{name}:{line}: not valid UTF-8; re-encode the file as UTF-8") from None
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


def _read_hf_dir(uri: str, name: str, storage_options: dict[str, Any] | None) -> Iterator[tuple[dict[str, Any], str]]:
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


def _iter_raw(uri: str, storage_options: dict[str, Any] | None) -> Iterator[tuple[dict[str, Any], str, str]]:
    """(fields, origin, file stem) for every raw record behind `uri`."""
    for fs, path, name in _expand(uri, storage_options):
        stem = PurePosixPath(path).name.split(".")[0]
        if _is_hf_dataset_dir(fs, path):
            for obj, origin in _read_hf_dir(name, name, storage_options):
                yield obj, origin, stem
            continue
        if fs.isdir(path):
            raise DataError(f"{name}: is a directory but not an HF save_to_disk dataset; name the files inside it")
        suffix = "".join(PurePosixPath(path).suffixes[-1:]).lower()
        readers = {".jsonl": _read_jsonl, ".json": _read_jsonl, ".txt": _read_txt, ".parquet": _read_parquet}
        if suffix not in readers:
            raise DataError(f"{name}: unsupported file type {suffix or '(none)'}; use .jsonl, .parquet, .txt or an HF dataset dir")
        try:
            with fs.open(path, "rb") as f:
                data = f.read()
        except PermissionError as e:  # not transient: the user must fix it (other OSErrors stay retryable)
            raise DataError(f"{name}: cannot be read ({e.strerror}); check the file's permissions and the credentials") from e
        if not data.strip():
            raise DataError(f"{name}: the file is empty; fill it or remove it from the config")
        for obj, origin in readers[suffix](data, name):
            yield obj, origin, stem


def load_records(uris: Sequence[str], *, role: str, storage_options: dict[str, Any] | None = None) -> RecordSet:
    """Read and validate all records behind `uris`.

    Args:
        uris: files, globs, HF dataset dirs; local paths or fsspec URIs.
        role: what these inputs are ("seeds", "corpus"), used in error messages.

    Raises:
        DataError: missing/empty/malformed inputs, bad records, duplicate ids — naming file and line.
    """
    if not uris:
        raise DataError(f"no {role} given; list at least one file under `{role}:` in the config")
    records: list[Record] = []
    seen: dict[str, str] = {}
    for uri in uris:
        count_before = len(records)
        for index, (fields, origin, stem) in enumerate(_iter_raw(uri, storage_options)):
            records.append(_make_record(fields, origin, f"{stem}-{index:06d}", seen))
        if len(records) == count_before:
            raise DataError(f"{uri}: contains no records ({role}); add records or remove it from `{role}:` in the config")
    return RecordSet(records=records, sources=list(uris))


def _make_record(fields: dict[str, Any], origin: str, default_id: str, seen: dict[str, str]) -> Record:
    text = record_text(fields, origin)
    raw_id = fields.get("id")
    if raw_id is None:
        rid = default_id
    elif isinstance(raw_id, str | int) and not isinstance(raw_id, bool) and str(raw_id).strip():
        rid = str(raw_id)
    else:
        raise DataError(f"{origin}: 'id' must be a non-empty string or integer, got {raw_id!r}")
    # The id is a string everywhere from here on (fields, outputs, look-ups): integer ids are the norm in
    # JSONL and HF exports, and an int in the fields would not match `Record.id` when read back.
    fields = {"id": rid, **fields} if raw_id is None else {**fields, "id": rid}
    if rid in seen:
        raise DataError(f"{origin}: duplicate id {rid!r} (first at {seen[rid]}); ids must be unique across all inputs")
    seen[rid] = origin
    return Record(id=rid, text=text, fields=fields, origin=origin)


def normalise_text(text: str) -> str:
    """Whitespace- and case-insensitive form used to spot exact duplicates."""
    return " ".join(text.split()).casefold()


@dataclass(frozen=True)
class PreparedCorpus:
    """The corpus with exact duplicates taken out (the first copy stays), and the ids taken out."""

    corpus: RecordSet
    dropped_duplicates: list[str]


def deduplicate(corpus: RecordSet) -> PreparedCorpus:
    """Remove exact duplicates (whitespace- and case-insensitive); independent of any seeds."""
    seen: set[str] = set()
    kept: list[Record] = []
    duplicates: list[str] = []
    for r in corpus.records:
        key = normalise_text(r.text)
        if key in seen:
            duplicates.append(r.id)
        else:
            seen.add(key)
            kept.append(r)
    return PreparedCorpus(RecordSet(kept, corpus.sources), duplicates)


def seed_copies(corpus: RecordSet, seeds: RecordSet) -> list[int]:
    """Rows of corpus records whose text is a seed's: they must never be "retrieved"."""
    seed_texts = {normalise_text(r.text) for r in seeds.records}
    return [i for i, r in enumerate(corpus.records) if normalise_text(r.text) in seed_texts]


def check_sizes(usable: int, *, needed: int, what: str) -> None:
    """Refuse a corpus with fewer usable records than a stage asks for."""
    if usable < needed:
        raise DataError(
            f"the corpus has {usable} usable records (after removing duplicates and copies of seeds) but "
            f"{what} asks for {needed}; lower {what} or add corpus records"
        )


def write_jsonl(records: Iterable[dict[str, Any]], f: io.TextIOBase) -> None:
    """One JSON object per line, UTF-8, non-ASCII kept as is."""
    for obj in records:
        f.write(json.dumps(obj, ensure_ascii=False, default=str) + "\n")


def heldout_split(rows: Sequence[dict[str, Any]], fraction: float, seed: int) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Split records into (train, held-out) by a seeded hash of their id.

    A record's side depends only on its id and the seed, so the split is stable when the curated set
    grows or is re-ordered, and pruning, tuning and evaluation all agree on it.
    """
    train, held = [], []
    for row in rows:
        digest = hashlib.sha256(f"{seed}:{row['id']}".encode()).digest()
        (held if int.from_bytes(digest[:8], "big") / 2**64 < fraction else train).append(row)
    return train, held
