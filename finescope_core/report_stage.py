"""The `report` stage's former module: its entry now lives in `finescope_core.report.stage`; these
names stay importable from here for the task that imports them (`tasks/report.py`)."""

from finescope_core.report.stage import ReportInputs, report_stage

__all__ = ["ReportInputs", "report_stage"]
