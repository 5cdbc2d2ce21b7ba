"""The documents of the lm-eval tasks a run reads from local JSON data, for the contamination check.

A task YAML under `evaluate.lm_eval_include` with `dataset_path: json` names its data in
`dataset_kwargs.data_files`; lm-eval's `json` loader (HF datasets) reads the rows of the task's split
in file order, so row i here is lm-eval's doc_id i. Stock tasks (data from the hub) and other dataset
loaders cannot be read here; `task_documents` returns None for them and the report says so.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from finescope_core.evaluate.harness import _LenientLoader, _yaml_data_files
from finescope_core.evaluate.leakage import document_text


def _task_yaml(include: Path, task: str) -> tuple[Path, dict[str, Any]] | None:
    for path in sorted(include.rglob("*.y*ml")):
        try:
            text = path.read_text(encoding="utf-8")
            doc = yaml.load(text, Loader=_LenientLoader)  # noqa: S506  # a SafeLoader subclass
        except (yaml.YAMLError, OSError, UnicodeDecodeError):
            continue
        if isinstance(doc, dict) and doc.get("task") == task:
            return path, doc
    return None


def _split_file(doc: dict[str, Any]) -> list[str]:
    """The data files of the split the task evaluates (`test_split`, else `validation_split`)."""
    files = (doc.get("dataset_kwargs") or {}).get("data_files")
    split = doc.get("test_split") or doc.get("validation_split")
    if isinstance(files, dict) and split in files:
        value = files[split]
        return [v for v in (value if isinstance(value, list) else [value]) if isinstance(v, str)]
    return _yaml_data_files(doc) if not isinstance(files, dict) else []


def _rows(path: Path) -> list[dict[str, Any]]:
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".jsonl":
        return [json.loads(line) for line in text.splitlines() if line.strip()]
    data = json.loads(text)
    return data if isinstance(data, list) else []


def task_documents(include: str | None, task: str) -> list[dict[str, Any]] | None:
    """The documents of `task` in lm-eval's order, or None when they cannot be read locally."""
    if include is None or not Path(include).is_dir():
        return None
    found = _task_yaml(Path(include), task)
    if found is None or found[1].get("dataset_path") != "json":
        return None
    path, doc = found
    files = [Path(f) if Path(f).is_absolute() else path.parent / f for f in _split_file(doc)]
    if not files or not all(f.is_file() for f in files):
        return None
    return [row for f in files for row in _rows(f)]


def harness_texts(include: str | None, tasks: Sequence[str]) -> dict[str, list[str]]:
    """Task -> the text of each of its documents (`leakage.document_text`), for every readable task."""
    out: dict[str, list[str]] = {}
    for task in dict.fromkeys(tasks):
        docs = task_documents(include, task)
        if docs is not None:
            out[task] = [document_text(d) for d in docs]
    return out
