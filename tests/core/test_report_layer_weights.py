"""The report's "Layer weights" section, from the curated artifact's curation.json."""

from __future__ import annotations

import json
from pathlib import Path

from finescope_core.report.sections import layer_weights_section


def test_layer_weights_section_shows_each_layers_weight(tmp_path: Path) -> None:
    summary = {
        "layer_weighting": "quality",
        "effective_top_m": 100,
        "per_layer": {
            "11": {"mean_top_score": 0.5, "weight": 0.25},
            "3": {"mean_top_score": 0.71234567, "weight": 1.75},
        },
    }
    (tmp_path / "curation.json").write_text(json.dumps(summary))
    section = layer_weights_section(tmp_path)
    assert section is not None and section.heading == "Layer weights"
    assert "Weighting `quality`, per-layer top-100." in section.body
    lines = section.body.splitlines()
    assert lines.index("| 3 | 1.75 | 0.7123 |") < lines.index("| 11 | 0.25 | 0.5 |")  # by layer, numerically


def test_plain_vote_shows_weight_one_and_random_has_no_section(tmp_path: Path) -> None:
    (tmp_path / "curation.json").write_text(json.dumps({"per_layer": {"-1": {"mean_top_score": 0.4}}}))
    section = layer_weights_section(tmp_path)
    assert section is not None and "| -1 | 1 | 0.4 |" in section.body and "sentence embedding" in section.body
    (tmp_path / "curation.json").write_text(json.dumps({"method": "random"}))
    assert layer_weights_section(tmp_path) is None
    assert layer_weights_section(tmp_path / "missing") is None
