"""End to end on a plain-text domain (only `text` records): the distilled data are text lines written
without loading the teacher, tuning learns them as text, and metrics.json and the report headline
raw-text perplexity (no chat perplexity is measured)."""

import json
from pathlib import Path

import pytest
from tiny_run import config_file, write_text_workspace

import tasks.teacher
from finescope_core.evaluate import metrics_schema_errors
from flows.cli import main


def test_a_plain_text_domain_runs_end_to_end_as_text(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = write_text_workspace(tmp_path / "ws")

    def no_teacher(*args: object, **kw: object) -> None:
        raise AssertionError("the distilled stage loaded the teacher model, though every record is text")

    monkeypatch.setattr(tasks.teacher, "private_model", no_teacher)
    cfg = config_file(root, tmp_path / "store", tmp_path / "cfg.yaml")
    out = tmp_path / "out"
    assert main(["run", "--config", str(cfg), "--out", str(out)]) == 0

    lines = [json.loads(x) for x in (out / "distilled" / "distilled.jsonl").read_text().splitlines()]
    curated = [json.loads(x) for x in (out / "curated" / "curated.jsonl").read_text().splitlines()]
    assert lines and [x["id"] for x in lines] == [r["id"] for r in curated]
    assert all(
        x == {"id": r["id"], "text": r["text"], "source": "text", "rejected": None}
        for x, r in zip(lines, curated, strict=True)
    )
    [summary] = (tmp_path / "store" / "tuned").glob("*/finetune.json")  # the one tuned artifact
    tuned = json.loads(summary.read_text())
    assert tuned["train_examples"] + tuned["eval_examples"] == len(lines)

    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics_schema_errors(metrics) == []
    assert metrics["primary"]["metric"] == "perplexity"
    assert all("chat_perplexity" not in m for m in metrics["models"].values())
    assert metrics["distillation"]["curated"]["kept_text"] == len(lines)
    assert not any(w.startswith("teacher") for w in metrics["warnings"])  # no fallback: nothing was asked
    report = (out / "report.md").read_text()
    first = [s for s in report.split("\n## ")[1:] if not s.startswith("Warnings\n")][0]  # warnings lead
    assert first.startswith("Primary metric\n\n**domain perplexity (raw text)**")
