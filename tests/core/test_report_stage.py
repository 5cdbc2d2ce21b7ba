"""The `report` stage's entry `run(inputs, section, ctx, work_dir, progress)`: the same files, the same
report and the same info as the path the task takes today (`report_stage` with the task's title)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from finescope_core.config import FinescopeConfig
from finescope_core.curate import SCORES_FILE, save_scores
from finescope_core.io import write_jsonl
from finescope_core.report import METRICS_FILE, REPORT_FILE, ReportInputs, ReportSettings, run
from finescope_core.report_stage import report_stage
from finescope_core.saliency import LayerSaliency
from finescope_core.stage import StageContext

METRICS: dict[str, Any] = {
    "models": {
        "base": {
            "perplexity": 8.1,
            "parameters": 1000,
            "ci": {"perplexity": {"value": 8.1, "low": 7.9, "high": 8.3, "n": 20}},
        },
        "pruned": {
            "perplexity": 30.5,
            "parameters": 700,
            "ci": {"perplexity": {"value": 30.5, "low": 29.0, "high": 32.0, "n": 20}},
        },
    },
    "stage_seconds": {"prune": 1.5},
    "warnings": ["3 duplicate corpus records removed"],
}
PRUNE_INFO = {
    "params_before": {"attention": 600, "mlp": 400},
    "params_after": {"attention": 420, "mlp": 280},
    "achieved_ratio": 0.3,
    "target_ratio": 0.3,
}


def _inputs(root: Path) -> ReportInputs:
    """A curated artifact with scores and a per-layer summary, a saliency artifact and SAE metrics."""
    curated = root / "curated"
    curated.mkdir()
    rows = [
        {"id": f"r{i}", "text": f"text {i}", "rank": i, "score": 1.0 - i / 10, "votes": 2} for i in range(4)
    ]
    write_jsonl(rows, curated / "curated.jsonl")
    save_scores(curated / SCORES_FILE, np.linspace(0.0, 1.0, 50), {3: np.ones((2, 4))})
    summary = {"layer_weighting": "vote", "per_layer": {"3": {"mean_top_score": 0.5}}}
    (curated / "curation.json").write_text(json.dumps(summary))
    saliency = LayerSaliency.from_scores(
        [1, 3], torch.rand(2, 16, generator=torch.Generator().manual_seed(0)), 4, "jacobian"
    )
    saliency_dir = saliency.save(root / "saliency")
    return ReportInputs(
        curated_dir=curated,
        metrics=METRICS,
        prune_info=PRUNE_INFO,
        saliency_dir=saliency_dir,
        sae_metrics={
            1: {"fvu": 0.1, "l0": 8.0, "dead_fraction": 0.0},
            3: {"fvu": 0.2, "l0": 6.0, "dead_fraction": 0.1},
        },
    )


def test_run_writes_what_the_tasks_report_stage_call_writes(tmp_path: Path) -> None:
    inputs = _inputs(tmp_path)
    cfg = FinescopeConfig(seeds=["s.jsonl"], corpus=["c.jsonl"], curate={"k_act": 4}, prune={"ratio": 0.25})
    old, new = tmp_path / "old", tmp_path / "new"
    old.mkdir()
    new.mkdir()
    # What tasks/report.py's build does today.
    title = f"finescope: {cfg.curate.method} curation, ratio {cfg.prune.ratio}"
    old_info = report_stage(inputs, title=title, k_act=cfg.curate.k_act, work=old)
    calls: list[tuple[int, int]] = []
    ctx = StageContext(device="cpu", dtype="float32", seed=0)
    new_info = run(
        inputs, ReportSettings.of(cfg), ctx, new, lambda done, total, **_: calls.append((done, total))
    )

    assert new_info == old_info
    assert old_info["sections"][:3] == ["Warnings", "Saliency per layer", "SAE metrics"]
    assert sorted(p.name for p in new.iterdir()) == sorted(p.name for p in old.iterdir())
    assert {REPORT_FILE, METRICS_FILE, "saliency.png", "retrieval.png"} <= {p.name for p in new.iterdir()}
    report = (new / REPORT_FILE).read_text(encoding="utf-8")
    assert report == (old / REPORT_FILE).read_text(encoding="utf-8")
    assert report.startswith("# finescope: sae curation, ratio 0.25\n")
    assert json.loads((new / METRICS_FILE).read_text()) == METRICS
    assert calls and calls[-1] == (1, 1)


def test_report_settings_are_the_three_config_values_the_report_key_reads() -> None:
    from tasks.report import ReportKey

    cfg = FinescopeConfig(seeds=["s.jsonl"], corpus=["c.jsonl"])
    settings = ReportSettings.of(cfg)
    assert {f: getattr(settings, f) for f in ReportKey.CONFIG} == {
        f: cfg.model_dump()[dotted.split(".")[0]][dotted.split(".")[1]]
        for f, dotted in ReportKey.CONFIG.items()
    }
