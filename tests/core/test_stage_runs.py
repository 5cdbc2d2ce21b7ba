"""The `run` entries of the `distilled` and `evaluation` stages give the files and info of the calls
the tasks made before (`generate_distilled`; `evaluate_model`, `with_harness`, `items_document`)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from finescope_core.config import EvalConfig, TeacherConfig
from finescope_core.data import Record
from finescope_core.evaluate import ITEMS_FILE, METRICS_FILE, EvalInputs, evaluate_model, items_document
from finescope_core.evaluate import run as run_evaluation
from finescope_core.progress import no_progress
from finescope_core.stage import StageContext
from finescope_core.teacher import DISTILLED_FILE, DistillInputs, generate_distilled
from finescope_core.teacher import run as run_distilled
from finescope_core.tiny import byte_tokenizer, tiny_model

CTX = StageContext(device="cpu", dtype="float32", seed=3)


def _records() -> list[Record]:
    rows = [
        {"instruction": "Add 3 and 4.", "output": "3 + 4 = 7\n#### 7"},
        {"instruction": "Say hi.", "output": "Hello there."},
        {"instruction": "Name a colour."},
    ]
    return [
        Record(id=f"r{i}", text=" ".join(f.values()), fields=f, origin=f"test:{i}")
        for i, f in enumerate(rows)
    ]


def test_distilled_run_writes_what_generate_distilled_writes(tmp_path: Path) -> None:
    model, tok, records = tiny_model().eval(), byte_tokenizer(), _records()
    section = TeacherConfig(max_new_tokens=8, batch_size=2)
    (tmp_path / "new").mkdir()
    info = run_distilled(DistillInputs(model, tok, records), section, CTX, tmp_path / "new", no_progress)
    old = generate_distilled(
        model, tok, records, section, tmp_path / "old" / "distilled.jsonl", seed=CTX.seed
    )
    new_text = (tmp_path / "new" / DISTILLED_FILE).read_text()
    assert new_text == (tmp_path / "old" / "distilled.jsonl").read_text()
    drop = {"seconds", "records_per_second", "tokens_per_second"}  # wall-clock measures
    assert {k: v for k, v in info.items() if k not in drop} == {
        k: v for k, v in old.to_dict().items() if k not in drop
    }


def test_evaluation_run_writes_the_metrics_and_items_of_the_former_task_body(tmp_path: Path) -> None:
    model, tok = tiny_model().eval(), byte_tokenizer()
    data = {
        "domain": ["the cat sat on the mat", "a dog ran far away"],
        "chat": [["Say hi.", "Hello there."]],
        "general": ["some other text here"],
        "mc": [{"question": "Colour of grass?", "choices": ["green", "red"], "answer": 0}],
        "numeric": [{"question": "What is 2 + 2?", "answer": 4}],
    }
    section = EvalConfig(max_length=32, max_new_tokens=4, bootstrap_resamples=100)
    info = run_evaluation(EvalInputs(model, tok, data, "base"), section, CTX, tmp_path, no_progress)
    items: dict[str, Any] = {}
    old = evaluate_model(
        model,
        tok,
        domain_texts=data["domain"],
        chat_pairs=[tuple(p) for p in data["chat"]],
        general_texts=data["general"],
        mc_items=data["mc"],
        numeric_items=data["numeric"],
        cfg=section,
        seed=CTX.seed,
        items=items,
    )
    assert info == old == json.loads((tmp_path / METRICS_FILE).read_text())
    doc = items_document(items, seed=CTX.seed, resamples=100, lm_eval={})
    assert json.loads((tmp_path / ITEMS_FILE).read_text()) == json.loads(json.dumps(doc))
