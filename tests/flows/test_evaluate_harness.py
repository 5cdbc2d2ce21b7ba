"""The evaluate task runs lm-eval tasks on the model it loaded, stores them in metrics.json (schema-valid,
shown in the report table), keys them by the task files' content, and refuses a bad setup first."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from finescope_core.config import FinescopeConfig
from finescope_core.evaluate import EvalError, metrics_schema_errors
from finescope_core.report import harness_table
from finescope_core.tiny import save_tiny
from flows.specialize import specialize_flow
from tasks.caching import artifact_dir
from tasks.context import RunContext, open_store
from tasks.evaluate import evaluate_task, evaluation_key
from tasks.models import ModelRef

TASK = "tiny_mc"
ITEMS = [
    {"question": f"{i} + 1", "choices": [str(i + 1), str(i + 2), "ten", "zero"], "answer": 0}
    for i in range(6)
]


def _task_dir(root: Path) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "mc.jsonl").write_text("".join(json.dumps(i) + "\n" for i in ITEMS))
    (root / "mc.yaml").write_text(
        yaml.safe_dump(
            {
                "task": TASK,
                "dataset_path": "json",
                "dataset_kwargs": {"data_files": {"test": str(root / "mc.jsonl")}},
                "test_split": "test",
                "output_type": "multiple_choice",
                "doc_to_text": "Question: {{question}}\nAnswer:",
                "doc_to_choice": "{{choices}}",
                "doc_to_target": "answer",
                "metric_list": [{"metric": "acc"}, {"metric": "acc_norm"}],
            }
        )
    )
    return root


def _data(texts: list[str]) -> dict:
    """The evaluation stage's input (`tasks.evalset.EvalData.payload()`): domain texts only."""
    return {"domain": texts, "chat": [], "general": [], "mc": None, "numeric": None}


def _cfg(tmp_path: Path, **evaluate) -> FinescopeConfig:
    return FinescopeConfig(
        seeds=["s.jsonl"], corpus=["c.jsonl"], store=str(tmp_path / "store"), device="cpu", evaluate=evaluate
    )


def test_evaluate_task_adds_lm_eval_results_to_the_models_metrics(tmp_path):
    include = _task_dir(tmp_path / "tasks")
    model_dir = save_tiny(tmp_path / "model")
    cfg = _cfg(tmp_path, lm_eval_tasks=[TASK], lm_eval_include=str(include), lm_eval_limit=4)
    texts = ["some held-out domain text", "and another one"]
    data = _data(texts)
    manifest = evaluate_task.fn(
        cfg.evaluate, RunContext.of(cfg), "base", ModelRef(path=str(model_dir), sha256="m"), data
    )
    metrics = json.loads((artifact_dir(open_store(cfg), manifest) / "metrics.json").read_text())
    assert set(metrics["lm_eval"][TASK]) == {"acc", "acc_norm"}
    assert metrics["lm_eval"][TASK]["acc"]["n"] == 4
    models = {name: metrics for name in ("base", "pruned", "tuned")}
    assert metrics_schema_errors({"models": models}) == []
    table = harness_table(models)
    assert f"| {TASK} | acc | 4 |" in table and "| base | pruned | tuned |" in table

    # An edited task file is a new evaluation key; turning lm-eval off forgets the directory.
    before = evaluation_key(cfg.evaluate, RunContext.of(cfg), "m", data).key
    (include / "mc.jsonl").write_text(json.dumps(ITEMS[0]) + "\n")
    assert evaluation_key(cfg.evaluate, RunContext.of(cfg), "m", data).key != before
    off = _cfg(tmp_path, lm_eval_include=str(include))
    plain = _cfg(tmp_path)
    assert (
        evaluation_key(off.evaluate, RunContext.of(off), "m", data).key
        == evaluation_key(plain.evaluate, RunContext.of(plain), "m", data).key
    )


def test_a_bad_lm_eval_setup_is_refused_before_the_model_loads(tmp_path):
    missing = _cfg(tmp_path, lm_eval_tasks=[TASK], lm_eval_include=str(tmp_path / "nowhere"))
    # The model path does not exist either: the lm-eval check must come first.
    with pytest.raises(EvalError, match=r"evaluate\.lm_eval_include: .*nowhere is not a directory"):
        evaluate_task.fn(
            missing.evaluate,
            RunContext.of(missing),
            "base",
            ModelRef(path=str(tmp_path / "no-model"), sha256="m"),
            _data(["text"]),
        )
    unknown = _cfg(tmp_path, lm_eval_tasks=["not_a_task"], lm_eval_include=str(_task_dir(tmp_path / "tasks")))
    with pytest.raises(EvalError, match=r"evaluate\.lm_eval_tasks: \['not_a_task'\] not found"):
        evaluate_task.fn(
            unknown.evaluate,
            RunContext.of(unknown),
            "base",
            ModelRef(path=str(tmp_path / "no-model"), sha256="m"),
            _data(["text"]),
        )
    # The flow refuses it before curation (its seeds and corpus do not even exist).
    with pytest.raises(EvalError, match=r"evaluate\.lm_eval_include"):
        specialize_flow(missing)
