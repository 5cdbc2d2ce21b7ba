"""The multiple-choice and numeric eval files: JSON lines, local or any fsspec URI, checked item by item."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from typing import Any

import fsspec

from finescope_core.evaluate.choice import check_mc_item
from finescope_core.evaluate.errors import EvalError
from finescope_core.evaluate.numeric import check_numeric_item


def _jsonl_objects(path: str, storage_options: dict[str, Any] | None) -> Iterator[tuple[Any, str]]:
    """(parsed object, "file:line") for every non-blank line of a JSONL file or URI."""
    try:
        with fsspec.open(path, "rb", **(storage_options or {})) as f:
            data = f.read()
    except FileNotFoundError:
        raise EvalError(
            f"eval file {path} does not exist; check evaluate.mc_file / evaluate.numeric_file"
        ) from None
    for lineno, raw in enumerate(data.split(b"\n"), start=1):
        if not raw.strip():
            continue
        origin = f"{path}:{lineno}"
        try:
            yield json.loads(raw.decode("utf-8")), origin
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise EvalError(f"{origin}: not a valid UTF-8 JSON line ({e}); fix or remove the line") from None


def _load_items(
    path: str, check: Callable[[Any, str], dict[str, Any]], storage_options: dict[str, Any] | None
) -> list[dict[str, Any]]:
    """Every item of an eval file, each checked by `check` with its file:line; an empty file is refused."""
    items = [check(obj, origin) for obj, origin in _jsonl_objects(path, storage_options)]
    if not items:
        raise EvalError(f"eval file {path} holds no items; add one JSON object per line")
    return items


def load_mc_items(path: str, *, storage_options: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """Multiple-choice items from a JSONL file/URI: one `{question, choices, answer}` object per line.

    Raises:
        EvalError: unreadable file, bad JSON, or a bad item, naming file:line and the field.
    """
    return _load_items(path, check_mc_item, storage_options)


def load_numeric_items(path: str, *, storage_options: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """Numeric-answer items from a JSONL file/URI: one `{question, answer}` object per line.

    Raises:
        EvalError: unreadable file, bad JSON, or a bad item, naming file:line and the field.
    """
    return _load_items(path, check_numeric_item, storage_options)
