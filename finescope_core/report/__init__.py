"""The run's report: PNG plots of each stage's numbers and a markdown page that links them.

`plots` draws (plain data in, a PNG out, never a model), `tables` writes the markdown tables,
`document` the page (`report.md`, and the same page with its plots inlined), `sections` one
section per stage from the run's artifacts, and `stage` the `report` stage's entry (`run`).
"""

from finescope_core.report.document import REPORT_FILE, ReportError, ReportSection, embed_images, write_report
from finescope_core.report.plots import (
    plot_eval,
    plot_parameters,
    plot_retrieval_scores,
    plot_sae_metrics,
    plot_saliency,
)
from finescope_core.report.sections import (
    evaluation_body,
    layer_weights_section,
    primary_section,
    report_sections,
)
from finescope_core.report.stage import METRICS_FILE, ReportInputs, ReportSettings, report_stage, run
from finescope_core.report.tables import (
    ACCURACY_LABELS,
    LOWER_IS_BETTER,
    METRIC_LABELS,
    PAIRED_LABELS,
    comparisons,
    example_records_table,
    harness_rows,
    harness_table,
    interval_cell,
    markdown_table,
    metric_rows,
    paired_lines,
    paired_rows,
)

__all__ = [
    "ACCURACY_LABELS",
    "LOWER_IS_BETTER",
    "METRICS_FILE",
    "METRIC_LABELS",
    "PAIRED_LABELS",
    "REPORT_FILE",
    "ReportError",
    "ReportInputs",
    "ReportSection",
    "ReportSettings",
    "comparisons",
    "embed_images",
    "evaluation_body",
    "example_records_table",
    "harness_rows",
    "harness_table",
    "interval_cell",
    "layer_weights_section",
    "markdown_table",
    "metric_rows",
    "paired_lines",
    "paired_rows",
    "plot_eval",
    "plot_parameters",
    "plot_retrieval_scores",
    "plot_sae_metrics",
    "plot_saliency",
    "primary_section",
    "report_sections",
    "report_stage",
    "run",
    "write_report",
]
