"""The `report` stage: report.md with a section (and a plot) per stage, and the run's metrics.json.

`run` is the stage's entry (`finescope_core.stage`): it reads the run's artifacts from local
directories (`ReportInputs`) and the three settings the report shows (`ReportSettings`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from finescope_core.config import FinescopeConfig
from finescope_core.progress import Progress
from finescope_core.report.document import REPORT_FILE, write_report
from finescope_core.report.inputs import ReportInputs
from finescope_core.report.sections import report_sections
from finescope_core.stage import StageContext

METRICS_FILE = "metrics.json"
"""The run's metrics document (`{"models": ..., "stage_seconds": ...}`), beside the report."""

__all__ = [
    "METRICS_FILE",
    "REPORT_FILE",
    "ReportInputs",
    "ReportSettings",
    "report_stage",
    "run",
]


@dataclass(frozen=True)
class ReportSettings:
    """The report's section of the config: the three settings it names (its title, the saliency plot)."""

    ratio: float
    """`prune.ratio`: the target pruning ratio, in the title."""
    method: str
    """`curate.method`: how the data was curated, in the title."""
    k_act: int
    """`curate.k_act`: coordinates kept per layer, marked on the saliency plot."""

    @classmethod
    def of(cls, cfg: FinescopeConfig) -> ReportSettings:
        """The settings of a run's config."""
        return cls(ratio=cfg.prune.ratio, method=cfg.curate.method, k_act=cfg.curate.k_act)

    @property
    def title(self) -> str:
        """The report's title."""
        return f"finescope: {self.method} curation, ratio {self.ratio}"


def run(
    inputs: ReportInputs, section: ReportSettings, ctx: StageContext, work_dir: Path, progress: Progress
) -> dict[str, Any]:
    """The stage's entry: report.md (with its plots) and metrics.json in `work_dir`.

    `ctx` is unused: the report runs no model, so device, precision and seed do not reach it.

    Returns:
        `{"sections": [heading, ...]}`.
    """
    info = report_stage(inputs, title=section.title, k_act=section.k_act, work=work_dir)
    progress(1, 1)
    return info


def report_stage(inputs: ReportInputs, *, title: str, k_act: int, work: Path) -> dict[str, Any]:
    """Write report.md (with its plots) and metrics.json into `work`; returns the section headings."""
    sections = report_sections(inputs, k_act, work)
    (work / METRICS_FILE).write_text(json.dumps(inputs.metrics, indent=2))
    write_report(work, title=title, sections=sections)
    return {"sections": [s.heading for s in sections]}
