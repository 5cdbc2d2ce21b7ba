"""The GSM8K problems `bench_recovery.py` may tune and score on: none that a config under `configs/` reports.

`finescope demo` (which runs `configs/demo.yaml` and `configs/quality.yaml`) reports on GSM8K test
problems the demo corpus leaves out (the domain items of `eval-math.jsonl`, the lm-eval tasks' documents
and their worked example) and on the corpus's evaluation split (the general items). Hyper-parameters
chosen on any of those would be tuned to the very items the README's tables report. The bench therefore
draws only from demo-corpus GSM8K problems outside the evaluation split of every config.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

from finescope_core.config import load_config
from finescope_core.data import load_records
from finescope_core.demo import build_demo_corpus, gsm8k_records
from finescope_core.evaluate.split import evaluation_split
from finescope_core.io import read_jsonl

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def _split_settings() -> set[tuple[float, int, int]]:
    """(split_fraction, split_max, seed) of every config under `configs/`."""
    out = set()
    for path in sorted(CONFIGS.glob("*.yaml")):
        cfg = load_config(path, {"seeds": ["unused.jsonl"], "corpus": ["unused.jsonl"]})
        out.add((cfg.evaluate.split_fraction, cfg.evaluate.split_max, cfg.seed))
    return out


def bench_problems() -> tuple[list[dict[str, Any]], set[str]]:
    """(the GSM8K problems the bench may use, in GSM8K order; the ids of every GSM8K problem a config
    reports on)."""
    with tempfile.TemporaryDirectory() as tmp:
        data = build_demo_corpus(Path(tmp))
        corpus = load_records([str(data.corpus)], role="corpus").records
        in_corpus = {r.id for r in corpus}
        # Every split a config draws (no seed-copy exclusion: a superset of what any run holds out).
        split: set[str] = set()
        for fraction, cap, seed in _split_settings():
            split |= {r.id for r in evaluation_split(corpus, fraction, cap, seed)}
        eval_ids = {r["id"] for r in read_jsonl(data.evals["math"])}
    problems = gsm8k_records()
    # Left out of the corpus: the eval file's items, the lm-eval documents and their worked example.
    reported = {r["id"] for r in problems if r["id"] not in in_corpus} | (split & {r["id"] for r in problems})
    assert eval_ids <= reported
    return [r for r in problems if r["id"] not in reported], reported
