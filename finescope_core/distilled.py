"""The distilled-data file a teacher run writes: resuming it after a kill, reading it back, its counts.

One JSON line per record, appended batch by batch, so a killed run leaves complete lines (and at most
one partial last line, cut off on resume): a request's line is (`id`, `prompt`, `response`, `source`,
`rejected`), tuned on as chat; a plain-text record's line under `teacher.text_records: text` is (`id`,
`text`, `source: "text"`, `rejected: null`), tuned on as text (`text_line`).
"""

from __future__ import annotations

import json
import os
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from finescope_core.data import Record

DISTILLED_FILE = "distilled.jsonl"
"""The `distilled` artifact's file: one JSON line per record, in output order."""


TEXT_SOURCE = "text"
"""`source` of a text line: the record's own text, learned as text; the teacher never saw it."""


class TeacherError(ValueError):
    """Bad teacher input (records, resume file); the message names it and the fix."""


@dataclass
class TeacherSummary:
    """Counts over the whole output file; `generated`, `new_tokens` and `seconds` cover this call only.

    `kept_teacher + fell_back_to_reference + dropped` are the records the teacher was asked about;
    `kept_text` the plain-text records written as text lines without asking it."""

    total: int
    generated: int
    kept_teacher: int
    fell_back_to_reference: int
    dropped: int
    resumed_from: int
    kept_text: int = 0
    """Plain-text records written as text lines (`teacher.text_records: text`), not sent to the teacher."""
    rejected: dict[str, int] = field(default_factory=dict)
    """Rejection reason -> number of records (fallbacks and drops together)."""
    fell_back: dict[str, int] = field(default_factory=dict)
    """Rejection reason -> records that kept their reference answer instead of the teacher's response."""
    dropped_by_reason: dict[str, int] = field(default_factory=dict)
    """Rejection reason -> records dropped (rejected, and no reference to fall back to)."""
    max_new_tokens_used: int | None = None
    """The generation budget this run used (`teacher.max_new_tokens`, `auto` resolved)."""
    new_tokens: int = 0
    seconds: float = 0.0

    @property
    def tokens_per_second(self) -> float:
        return self.new_tokens / self.seconds if self.seconds > 0 else 0.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self) | {"tokens_per_second": self.tokens_per_second}


def text_line(record: Record) -> dict[str, Any]:
    """The line of a plain-text record learned as text: its own text, no teacher response."""
    return {"id": record.id, "text": record.text, "source": TEXT_SOURCE, "rejected": None}


def check_ids(records: Sequence[Record]) -> None:
    seen: dict[str, str] = {}
    for r in records:
        if r.id in seen:
            raise TeacherError(
                f"record id {r.id!r} appears twice ({seen[r.id]} and {r.origin}); resuming needs unique "
                "ids: give the records distinct `id` fields or remove the duplicate"
            )
        seen[r.id] = r.origin


def read_done(out_path: Path, ids: set[str]) -> list[dict[str, Any]]:
    """The complete lines of an earlier run's file, after cutting a partial last line off the file.

    Raises:
        TeacherError: a complete line that is not JSON, or ids this input does not have (another run's file).
    """
    if not out_path.exists():
        return []
    data = out_path.read_bytes()
    end = data.rfind(b"\n") + 1
    if end < len(data):
        # A kill mid-write leaves a partial line: drop it so appending continues on a line boundary.
        with out_path.open("r+b") as f:
            f.truncate(end)
            f.flush()
            os.fsync(f.fileno())
    lines = []
    for lineno, raw in enumerate(data[:end].splitlines(), start=1):
        try:
            lines.append(json.loads(raw))
        except json.JSONDecodeError as e:
            raise TeacherError(
                f"{out_path}:{lineno} is not valid JSON ({e}); delete {out_path} to start over"
            ) from None
    stray = [str(line.get("id")) for line in lines if line.get("id") not in ids]
    if stray:
        raise TeacherError(
            f"{out_path} holds ids that are not in this input (e.g. {stray[0]!r}): it belongs to another "
            "run; delete it or write to another path"
        )
    return lines


def pending_batches(
    records: Sequence[Record], done: set[str], batch_size: int
) -> Iterator[tuple[int, list[Record]]]:
    """(batch number, records still to do), batches fixed over the whole input so a resume keeps them."""
    for start in range(0, len(records), batch_size):
        todo = [r for r in records[start : start + batch_size] if r.id not in done]
        if todo:
            yield start // batch_size, todo


def summarise(
    lines: list[dict[str, Any]], generated: int, resumed: int, tokens: int, seconds: float
) -> TeacherSummary:
    sources = Counter(line.get("source") for line in lines)
    reasons = Counter(line["rejected"] for line in lines if line.get("rejected"))
    fell_back = Counter(
        line["rejected"] for line in lines if line.get("rejected") and line.get("source") == "reference"
    )
    dropped = Counter(
        line["rejected"] for line in lines if line.get("rejected") and line.get("source") is None
    )
    return TeacherSummary(
        total=len(lines),
        generated=generated,
        kept_teacher=sources["teacher"],
        fell_back_to_reference=sources["reference"],
        dropped=sources[None],
        resumed_from=resumed,
        kept_text=sources[TEXT_SOURCE],
        rejected=dict(sorted(reasons.items())),
        fell_back=dict(sorted(fell_back.items())),
        dropped_by_reason=dict(sorted(dropped.items())),
        new_tokens=tokens,
        seconds=seconds,
    )


def read_distilled(path: Path) -> list[dict[str, Any]]:
    """The usable rows of a distilled file (dropped records left out): dicts with id, prompt, response,
    source for a request; id, text, source (`TEXT_SOURCE`) for a text line (`is_text_row`)."""
    rows = []
    for lineno, raw in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not raw.strip():
            continue
        try:
            line = json.loads(raw)
        except json.JSONDecodeError as e:
            raise TeacherError(
                f"{path}:{lineno} is not valid JSON ({e}); regenerate the distilled data"
            ) from None
        if line.get("source") == TEXT_SOURCE:
            rows.append({k: line[k] for k in ("id", "text", "source")})
        elif line.get("response") is not None:
            rows.append({k: line[k] for k in ("id", "prompt", "response", "source")})
    return rows


def is_text_row(row: dict[str, Any]) -> bool:
    """True for a row `read_distilled` gives for a text line (learned as text, not as chat)."""
    return row.get("source") == TEXT_SOURCE


def row_text(row: dict[str, Any]) -> str:
    """Everything a row teaches, as one string: its text, or its request and response."""
    return str(row["text"]) if is_text_row(row) else f"{row['prompt']}\n\n{row['response']}"
