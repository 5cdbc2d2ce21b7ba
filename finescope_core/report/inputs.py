"""What the `report` stage reads."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class ReportInputs:
    """What the report shows, as local directories and plain numbers."""

    curated_dir: Path
    """The curated artifact (curated.jsonl, and scores.safetensors when the method scores records)."""
    metrics: Mapping[str, Any]
    """metrics.json: `{"models": {name: {...}}, "stage_seconds": {...}}`."""
    prune_info: Mapping[str, Any]
    """The prune stage's info: params_before / params_after / achieved_ratio / target_ratio."""
    saliency_dir: Path | None = None
    sae_metrics: Mapping[int, Mapping[str, float]] | None = None
    """SAE metrics by layer, when the method trained SAEs."""
