"""bench/bench_recovery.py chooses hyper-parameters on GSM8K problems that no config reports: checked
against the items a `finescope demo` build actually reports (eval file, lm-eval documents, split)."""

import tempfile
from pathlib import Path

from bench.bench_recovery import bench_split
from bench.recovery_items import _split_settings
from finescope_core.data import load_records
from finescope_core.demo import build_demo_corpus
from finescope_core.evaluate.split import split_position
from finescope_core.io import read_jsonl


def test_bench_problems_are_disjoint_from_every_reported_item():
    train, scored = bench_split(128, 50)
    chosen = train + scored
    assert len({r["id"] for r in chosen}) == 178
    with tempfile.TemporaryDirectory() as tmp:
        data = build_demo_corpus(Path(tmp))
        eval_ids = {r["id"] for r in read_jsonl(data.evals["math"])}
        docs = " ".join(str(row) for f in sorted(data.lm_eval.glob("*.jsonl")) for row in read_jsonl(f))
        corpus_ids = {r.id for r in load_records([str(data.corpus)], role="corpus").records}
    settings = _split_settings()
    assert settings, "no config found"
    for r in chosen:
        assert r["id"] not in eval_ids, r["id"]
        assert r["instruction"][:80] not in docs, r["id"]  # neither a document nor the worked example
        assert r["id"] in corpus_ids
        assert all(split_position(r["id"], seed) >= fraction for fraction, _, seed in settings), r["id"]
