"""`io.read_jsonl_rows`: one shard's lines of a records file, without parsing the others."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from finescope_core.io import JsonlError, read_jsonl, read_jsonl_rows


def _write(path: Path, n: int) -> list[dict]:
    rows = [
        {"id": f"r{i}", "text": "é" * (i % 5) + f" line {i}\\n"} for i in range(n)
    ]  # non-ASCII, escaped newlines
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return rows


@pytest.mark.parametrize(("start", "stop"), [(0, 0), (0, 1), (3, 9), (0, 25), (24, 25), (25, 25)])
def test_slices_equal_the_slices_of_the_whole_file(tmp_path: Path, start: int, stop: int) -> None:
    path = tmp_path / "records.jsonl"
    _write(path, 25)
    assert read_jsonl_rows(path, start, stop) == read_jsonl(path)[start:stop]


def test_a_rewritten_file_is_indexed_again(tmp_path: Path) -> None:
    path = tmp_path / "records.jsonl"
    _write(path, 10)
    assert len(read_jsonl_rows(path, 0, 10)) == 10
    rows = _write(path, 30)
    assert read_jsonl_rows(path, 20, 30) == rows[20:30]


def test_bad_ranges_and_lines_are_named(tmp_path: Path) -> None:
    path = tmp_path / "records.jsonl"
    _write(path, 5)
    with pytest.raises(JsonlError, match=r"lines \[3, 9\) requested, the file has 5"):
        read_jsonl_rows(path, 3, 9)
    path.write_text('{"id": "a"}\n[1, 2]\n', encoding="utf-8")
    with pytest.raises(JsonlError, match=r"records.jsonl:2: each line must be a JSON object"):
        read_jsonl_rows(path, 1, 2)
