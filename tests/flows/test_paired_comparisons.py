"""The evaluate task stores each model's per-item numbers (lm-eval's per-sample values included) beside
metrics.json; they reproduce the stored metrics exactly, and the metrics document pairs them into its
`comparisons` section, which the report shows, a baseline included."""

from __future__ import annotations

import json
import math
from pathlib import Path

import yaml

from finescope_core.config import FinescopeConfig
from finescope_core.evaluate import ITEMS_FILE, mean_interval, metrics_schema_errors, perplexity_interval
from finescope_core.report.sections import evaluation_body
from finescope_core.tiny import save_tiny
from tasks.caching import artifact_dir
from tasks.context import RunContext, open_store
from tasks.evaluate import EvaluationKey, evaluate_task, evaluation_items
from tasks.models import ModelRef
from tasks.report import metrics_document

TASK = "tiny_mc"
MC = [
    {"question": f"{i} + 1", "choices": [str(i + 1), str(i + 2), "ten", "zero"], "answer": i % 2}
    for i in range(5)
]
TEXTS = [
    "some held-out domain text about eggs",
    "and another one, with 16 eggs",
    "2 + 2 = 4, so four",
    "ok then",
]


def _task_dir(root: Path) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "mc.jsonl").write_text("".join(json.dumps(i) + "\n" for i in MC))
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
                "metric_list": [{"metric": "acc"}],
            }
        )
    )
    return root


def test_evaluations_store_per_item_numbers_and_the_document_pairs_them(tmp_path):
    assert EvaluationKey.VERSION == "4"  # evaluations cached without per-item numbers are recomputed
    cfg = FinescopeConfig(
        seeds=["s.jsonl"],
        corpus=["c.jsonl"],
        store=str(tmp_path / "store"),
        device="cpu",
        evaluate={
            "lm_eval_tasks": [TASK],
            "lm_eval_include": str(_task_dir(tmp_path / "tasks")),
            "bootstrap_resamples": 200,
            "max_length": 48,
        },
    )
    data = {
        "domain": TEXTS,
        "chat": [["What is 2 + 2?", "It is 4."], ["Name a colour.", "Blue."]],
        "general": TEXTS[::-1],
        "mc": MC,
        "numeric": None,
    }
    evaluations = {
        name: evaluate_task.fn(
            cfg.evaluate,
            RunContext.of(cfg),
            name,
            ModelRef(path=str(save_tiny(tmp_path / name, seed=seed)), sha256=f"sha-{name}"),
            data,
        )
        for name, seed in (("base", 0), ("pruned", 1), ("tuned", 2), ("tuned-random", 3))
    }
    store = open_store(cfg)
    items = evaluation_items(store, evaluations)
    for name, manifest in evaluations.items():
        assert (artifact_dir(store, manifest) / ITEMS_FILE).is_file()
        doc, metrics = items[name], manifest.info
        assert doc is not None and (doc["seed"], doc["resamples"]) == (cfg.seed, 200)
        assert (
            set(doc["metrics"])
            == set(metrics["ci"])
            == {"perplexity", "chat_perplexity", "general_perplexity", "mc_accuracy", "mc_accuracy_norm"}
        )
        for metric, entry in doc["metrics"].items():
            again = (
                perplexity_interval(entry["nll"], entry["tokens"], resamples=200, seed=cfg.seed)
                if "nll" in entry
                else mean_interval(entry["values"], resamples=200, seed=cfg.seed)
            )
            assert again.to_dict() == metrics["ci"][metric], (name, metric)
        p = doc["metrics"]["perplexity"]
        assert math.isclose(math.exp(sum(p["nll"]) / sum(p["tokens"])), metrics["perplexity"], rel_tol=1e-12)
        acc = doc["lm_eval"][TASK]["acc"]
        assert acc["doc_ids"] == list(range(len(MC)))
        assert math.isclose(sum(acc["values"]) / len(acc["values"]), metrics["lm_eval"][TASK]["acc"]["value"])
        assert len(acc["values"]) == metrics["lm_eval"][TASK]["acc"]["n"]

    doc = metrics_document(evaluations, {}, items=items)
    assert metrics_schema_errors(json.loads(json.dumps(doc))) == []
    pairs = {(c["a"], c["b"]) for c in doc["comparisons"]}
    assert pairs == {
        ("tuned", "base"),
        ("tuned", "pruned"),
        ("tuned", "tuned-random"),
        ("tuned-random", "base"),
        ("pruned", "base"),
    }
    metrics = {c["metric"] for c in doc["comparisons"] if (c["a"], c["b"]) == ("tuned", "tuned-random")}
    assert metrics == {
        "chat_perplexity",
        "perplexity",
        "general_perplexity",
        "mc_accuracy",
        "mc_accuracy_norm",
        f"lm_eval:{TASK}:acc",
    }
    chat = next(
        c
        for c in doc["comparisons"]
        if (c["a"], c["b"], c["metric"]) == ("tuned", "tuned-random", "chat_perplexity")
    )
    ci = {
        name: evaluations[name].info["ci"]["chat_perplexity"]["value"] for name in ("tuned", "tuned-random")
    }
    assert math.isclose(chat["value"], ci["tuned"] / ci["tuned-random"], rel_tol=1e-9) and chat["n"] == 2
    body = evaluation_body(doc)
    assert "Paired comparisons (same items, bootstrap over items)" in body
    assert any(
        line.startswith("- tuned vs tuned-random — chat perplexity ratio") and ", n=2: tuned " in line
        for line in body.splitlines()
    )
    assert any(line.startswith("- tuned-random vs base — ") for line in body.splitlines())
    # without per-item numbers (an old artifact), the document has no comparisons, as before
    assert "comparisons" not in metrics_document(evaluations, {})
