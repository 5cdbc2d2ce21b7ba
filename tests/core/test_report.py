"""Tests of finescope_core.report: every plot writes a real PNG without leaking figures; markdown is safe."""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pytest
from matplotlib.image import imread

from finescope_core.report import (
    ReportError,
    ReportSection,
    example_records_table,
    markdown_table,
    plot_eval,
    plot_parameters,
    plot_retrieval_scores,
    plot_sae_metrics,
    plot_saliency,
    write_report,
)

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
METRICS = {
    "models": {
        "base": {
            "perplexity": 8.1,
            "parameters": 134_000_000,
            "mc_accuracy": 0.4,
            "numeric_exact_match": 0.1,
        },
        "pruned": {"perplexity": 30.5, "parameters": 94_000_000, "mc_accuracy": 0.3},
        "tuned": {
            "perplexity": 11.2,
            "parameters": 94_000_000,
            "mc_accuracy": 0.35,
            "numeric_exact_match": 0.05,
        },
        "pruned-random": {"perplexity": float("nan"), "parameters": 94_000_000},
    }
}
rng = np.random.default_rng(0)

# name -> (call with good data, call with empty/NaN data)
PLOTS: dict[str, tuple[Callable[[Path], Path], Callable[[Path], Path]]] = {
    "saliency": (
        lambda out: plot_saliency(
            {0: rng.random(64), 3: rng.random(64) ** 3, 5: np.r_[rng.random(10), np.nan]}, out, k_act=8
        ),
        lambda out: plot_saliency({0: np.full(4, np.nan), 1: np.array([])}, out),
    ),
    "sae": (
        lambda out: plot_sae_metrics(
            {
                0: {"fvu": 0.2, "l0": 31.0, "dead_fraction": 0.05},
                4: {"fvu": float("nan"), "l0": 12.0, "dead_fraction": 0.3},
            },
            out,
        ),
        lambda out: plot_sae_metrics({}, out),
    ),
    "retrieval": (
        lambda out: plot_retrieval_scores(rng.normal(0.5, 0.1, 500), 0.7, out),
        lambda out: plot_retrieval_scores(np.array([np.nan, np.inf]), 0.7, out),
    ),
    "parameters": (
        lambda out: plot_parameters({k: v["parameters"] for k, v in METRICS["models"].items()}, out),
        lambda out: plot_parameters({}, out),
    ),
    "eval": (
        lambda out: plot_eval(METRICS, out),
        lambda out: plot_eval({"models": {}}, out),
    ),
}


def _assert_png(path: Path) -> np.ndarray:
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE and len(data) > 1000
    pixels = imread(path)
    assert pixels.ndim == 3 and pixels.shape[0] > 100 and pixels.shape[1] > 100
    return pixels


@pytest.mark.parametrize("name", list(PLOTS))
def test_plot_writes_a_png_and_leaks_no_figure(name: str, tmp_path: Path) -> None:
    plt.close("all")
    out = PLOTS[name][0](tmp_path / "sub" / f"{name}.png")
    assert out == tmp_path / "sub" / f"{name}.png"
    pixels = _assert_png(out)
    assert float(pixels[..., :3].std()) > 0.01  # something was drawn, not a blank canvas
    assert plt.get_fignums() == []


@pytest.mark.parametrize("name", list(PLOTS))
def test_plot_of_empty_or_nan_data_is_a_no_data_placeholder(name: str, tmp_path: Path) -> None:
    good = _assert_png(PLOTS[name][0](tmp_path / "good.png"))
    empty = _assert_png(PLOTS[name][1](tmp_path / "empty.png"))
    # The placeholder is a smaller, mostly white figure (just the title and the reason).
    assert empty.shape[0] * empty.shape[1] < good.shape[0] * good.shape[1]
    assert float((empty[..., :3] > 0.95).mean()) > 0.9
    assert plt.get_fignums() == []


def test_plot_sae_metrics_names_a_missing_metric(tmp_path: Path) -> None:
    with pytest.raises(ReportError, match="layer 2 have no 'l0'"):
        plot_sae_metrics({2: {"fvu": 0.1, "dead_fraction": 0.0}}, tmp_path / "x.png")


def test_plot_saliency_accepts_non_positive_scores(tmp_path: Path) -> None:
    _assert_png(plot_saliency({0: np.array([0.0, -1.0, 2.0])}, tmp_path / "s.png"))


# ---------------------------------------------------------------------------------------- markdown


def _cells(line: str) -> list[str]:
    """Split a table row on unescaped pipes."""
    return [c.strip() for c in re.split(r"(?<!\\)\|", line.strip())[1:-1]]


def test_markdown_table_escapes_pipes_backslashes_and_newlines() -> None:
    rows = [
        {"name": "a|b", "text": "line1\nline2\r\nline3", "score": 0.123456},
        {"name": "back\\|slash", "extra": [1, 2]},
    ]
    table = markdown_table(rows)
    lines = table.splitlines()
    assert len(lines) == 4  # header, rule, two rows: no newline escaped into a new row
    assert _cells(lines[0]) == ["name", "text", "score", "extra"]
    assert _cells(lines[2]) == ["a\\|b", "line1<br>line2<br>line3", "0.1235", ""]
    assert _cells(lines[3]) == ["back\\\\\\|slash", "", "", "1, 2"]
    assert lines[1] == "| --- | --- | --- | --- |"


def test_markdown_table_column_order_and_empty() -> None:
    assert markdown_table([{"a": 1, "b": None}], columns=["b", "a"]).splitlines()[2] == "|  | 1 |"
    assert markdown_table([]) == "_no data_"


def test_example_records_table_shortens_text_and_keeps_retrieval_columns() -> None:
    records = [
        {"id": "r1", "text": "x" * 500, "rank": 1, "score": 0.91, "votes": 3.0, "layers": [2, 5]},
        {"id": "r2", "text": "short | piped", "rank": 2, "score": 0.88, "votes": 2.0, "layers": [5]},
        {"id": "r3", "text": "not shown", "rank": 3, "score": 0.5, "votes": 1.0, "layers": []},
    ]
    lines = example_records_table(records, 2, max_chars=50).splitlines()
    assert _cells(lines[0]) == ["rank", "score", "votes", "layers", "text"]
    assert len(lines) == 4
    first = _cells(lines[2])
    assert first[:4] == ["1", "0.91", "3", "2, 5"] and first[4] == "x" * 49 + "…"
    assert _cells(lines[3])[4] == "short \\| piped"
    with pytest.raises(ReportError, match="no field 'text'.*instruction"):
        example_records_table([{"instruction": "do it"}], 1)
    assert (
        example_records_table([{"instruction": "do it"}], 1, text_field="instruction").splitlines()[2]
        == "| do it |"
    )


def test_write_report_links_images_relatively(tmp_path: Path) -> None:
    out_dir = tmp_path / "report"
    inside = plot_eval(METRICS, out_dir / "plots" / "eval.png")
    outside = plot_parameters({"base": 10, "pruned": 7}, tmp_path / "elsewhere" / "params.png")
    sections = [
        ReportSection("Metrics", markdown_table([{"model": "base", "perplexity": 8.1}]), [inside]),
        ReportSection("Size", "", [outside]),
        ReportSection("Empty"),
    ]
    path = write_report(out_dir, title="finescope run", sections=sections)
    text = path.read_text(encoding="utf-8")
    assert path == out_dir / "report.md" and text.startswith("# finescope run\n")
    assert [h for h in text.splitlines() if h.startswith("## ")] == ["## Metrics", "## Size", "## Empty"]
    links = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", text)
    assert links == ["plots/eval.png", "../elsewhere/params.png"]
    for link in links:
        assert not Path(link).is_absolute()
        assert (out_dir / link).is_file()
    assert "| base | 8.1 |" in text


def test_write_report_refuses_a_missing_image(tmp_path: Path) -> None:
    with pytest.raises(ReportError, match="missing.png does not exist"):
        write_report(tmp_path, title="t", sections=[ReportSection("x", images=[tmp_path / "missing.png"])])


def test_interval_table_and_overlap_statements() -> None:
    from finescope_core.report import comparisons, metric_rows

    def ci(value, low, high, n=50):
        return {"value": value, "low": low, "high": high, "n": n}

    models = {
        "base": {"parameters": 10, "ci": {"perplexity": ci(8.0, 7.5, 8.5)}},
        "pruned": {"parameters": 7, "ci": {"perplexity": ci(30.0, 28.0, 33.0)}},
        "tuned": {"parameters": 7, "ci": {"perplexity": ci(8.2, 7.9, 8.6)}},
        "tuned-random": {"parameters": 7, "ci": {"perplexity": ci(12.0, 11.0, 13.0)}},
    }
    rows = metric_rows(models)
    assert rows[0] == {
        "model": "base",
        "parameters": 10,
        "domain perplexity (raw text)": "8 [7.5, 8.5] (n=50)",
    }
    lines = comparisons(models)
    assert any(line.startswith("- tuned vs base") and "intervals overlap" in line for line in lines)
    assert any(
        line.startswith("- tuned vs pruned") and "do not overlap: tuned is better" in line for line in lines
    )
    assert any(
        line.startswith("- tuned-random vs tuned") and "tuned-random is worse" in line for line in lines
    )


def test_harness_table_is_task_by_model_with_cis_and_empty_without_results():
    from finescope_core.report import harness_rows, harness_table

    acc = {"value": 0.5, "ci": [0.25, 0.75], "n": 8, "stderr": 0.18}
    models = {
        "base": {"perplexity": 3.0, "lm_eval": {"t": {"acc": acc}}},
        "pruned": {"perplexity": 4.0},
        "tuned": {
            "perplexity": 3.5,
            "lm_eval": {"t": {"acc": {**acc, "value": 0.625, "ci": [0.375, 0.875]}}},
        },
    }
    assert harness_rows(models) == [
        {
            "task": "t",
            "metric": "acc",
            "n": 8,
            "base": "0.500 [0.250, 0.750]",
            "tuned": "0.625 [0.375, 0.875]",
        }
    ]
    table = harness_table(models)
    assert table.splitlines()[0] == "| task | metric | n | base | tuned |"
    assert "| t | acc | 8 | 0.500 [0.250, 0.750] | 0.625 [0.375, 0.875] |" in table
    assert harness_table({"base": {"perplexity": 3.0}}) == ""
