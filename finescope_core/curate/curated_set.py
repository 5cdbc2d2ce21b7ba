"""The curated set on disk: the records with their rank, score, votes and layers (JSONL + Parquet), the
stage summary, and every corpus record's score with the seeds' embeddings (for the report)."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from safetensors.torch import load_file, save_file

from finescope_core import retrieval
from finescope_core.data import Record, RecordSet
from finescope_core.io import write_jsonl

OUTPUT_FIELDS = ("rank", "score", "votes", "layers")
"""Columns finescope adds to each curated record; input fields with these names are kept as `input_<name>`."""

CURATED_FILE = "curated.jsonl"
"""The curated records, best first: their own fields (with id) and the `OUTPUT_FIELDS`."""
CURATED_PARQUET = "curated.parquet"
"""The same records as a Parquet table."""
SUMMARY_FILE = "curation.json"
"""The stage summary (its info): record counts, the vote per layer, what was excluded."""


def curated_rows(corpus: RecordSet, voted: Sequence[retrieval.VotedRecord]) -> list[dict[str, Any]]:
    """The output records: original fields (with id) + rank, score, votes, layers."""
    rows = []
    for rank, v in enumerate(voted, start=1):
        record: Record = corpus.records[v.row]
        fields = {(f"input_{k}" if k in OUTPUT_FIELDS else k): val for k, val in record.fields.items()}
        score = float(v.mean_score) if math.isfinite(v.mean_score) else 0.0
        rows.append(
            {**fields, "rank": rank, "score": score, "votes": float(v.votes), "layers": list(v.layers)}
        )
    return rows


def write_curated(rows: list[dict[str, Any]], out_dir: Path, summary: dict[str, Any]) -> dict[str, Any]:
    """Write curated.jsonl, curated.parquet and curation.json into out_dir."""
    write_jsonl(rows, out_dir / CURATED_FILE)
    pq.write_table(_arrow_table(rows), out_dir / CURATED_PARQUET)
    summary = {"records": len(rows), **summary}  # first: `store ls` shows the leading info fields
    (out_dir / SUMMARY_FILE).write_text(json.dumps(summary, indent=2, default=str))
    return summary


def _arrow_table(rows: list[dict[str, Any]]) -> pa.Table:
    try:
        return pa.Table.from_pylist(rows)
    except (pa.ArrowInvalid, pa.ArrowTypeError):
        # Heterogeneous user fields (a column that is a string here and a list there): keep them as JSON text.
        fixed = [
            {
                k: (v if k in OUTPUT_FIELDS or isinstance(v, str) else json.dumps(v, default=str))
                for k, v in r.items()
            }
            for r in rows
        ]
        return pa.Table.from_pylist(fixed)


SCORES_FILE = "scores.safetensors"


def save_scores(path: Path, mean_scores: np.ndarray, seed_emb: Mapping[int, np.ndarray]) -> None:
    """Keep every corpus record's score (4 bytes a record, for the report's histogram) and the seeds'
    embeddings per layer; never the corpus's embeddings (they stay in their own stages)."""
    tensors = {"corpus_scores": torch.from_numpy(np.ascontiguousarray(mean_scores, dtype=np.float32))}
    tensors.update(
        {
            f"seeds.{k}": torch.from_numpy(np.ascontiguousarray(v, dtype=np.float32))
            for k, v in seed_emb.items()
        }
    )
    save_file(tensors, str(path))


def load_scores(path: Path) -> tuple[np.ndarray, dict[int, np.ndarray]]:
    """(every corpus record's mean score [N], {layer: seed embeddings}) that `save_scores` kept."""
    tensors = load_file(str(path))
    seeds = {int(k.split(".", 1)[1]): v.numpy() for k, v in tensors.items() if k.startswith("seeds.")}
    return tensors["corpus_scores"].numpy(), seeds
