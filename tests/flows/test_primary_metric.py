"""metrics.json names its primary metric by the domain items (raw-text perplexity for a plain-text
domain, chat perplexity for requests with references), and the report opens with it."""

from __future__ import annotations

from typing import Any

import pytest

from finescope_core.evaluate import metrics_schema_errors, primary_metric
from finescope_core.report import evaluation_body, primary_section
from tasks.caching import StageManifest
from tasks.report import metrics_document


def _ci(value: float, n: int) -> dict[str, Any]:
    return {"value": value, "low": 0.9 * value, "high": 1.1 * value, "n": n}


def _model(ppl: float, items: int, chat: int = 0) -> dict[str, Any]:
    """One model's metrics as the evaluate stage writes them: chat perplexity only over `chat` items."""
    m: dict[str, Any] = {"perplexity": ppl, "parameters": 10, "n": {"perplexity": items}}
    m["ci"] = {"perplexity": _ci(ppl, items)}
    if chat:
        m |= {"chat_perplexity": ppl / 2}
        m["n"]["chat"] = chat
        m["ci"]["chat_perplexity"] = _ci(ppl / 2, chat)
    return m


def _evaluations(items: int, chat: int) -> dict[str, StageManifest]:
    return {
        name: StageManifest(
            stage="evaluation",
            key="k",
            uri="u",
            sha256="s",
            cached=False,
            seconds=1.0,
            info=_model(p, items, chat),
        )
        for name, p in (("base", 4.0), ("pruned", 20.0), ("tuned", 6.0))
    }


def test_a_plain_text_domain_is_headlined_by_raw_text_perplexity() -> None:
    doc = metrics_document(_evaluations(40, 0), {})
    assert doc["primary"]["metric"] == "perplexity"
    assert doc["primary"]["why"].startswith("none of the 40 domain items is a request with a reference")
    assert doc["primary"]["why"].endswith("chat perplexity does not apply")
    assert all("chat_perplexity" not in m for m in doc["models"].values())  # no number to misread
    assert metrics_schema_errors(doc) == []


def test_a_request_domain_is_headlined_by_chat_perplexity() -> None:
    doc = metrics_document(_evaluations(40, 40), {})
    assert doc["primary"] == {
        "metric": "chat_perplexity",
        "why": "40 of the 40 domain items are requests with a reference answer: the perplexity of the "
        "reference's tokens after the chat prompt, the tokens tuning learns from",
    }
    assert metrics_schema_errors(doc) == []


@pytest.mark.parametrize(("chat", "metric"), [(19, "perplexity"), (20, "chat_perplexity")])
def test_a_mixed_domain_is_headlined_by_what_most_of_its_items_are(chat: int, metric: str) -> None:
    assert primary_metric({"base": _model(4.0, 40, chat)})["metric"] == metric


def test_the_schema_refuses_a_primary_metric_a_model_lacks() -> None:
    doc = metrics_document(_evaluations(40, 0), {})
    doc["primary"]["metric"] = "chat_perplexity"
    assert metrics_schema_errors(doc) == [
        "primary.metric: chat_perplexity must be measured for every model, not for base, pruned, tuned"
    ]
    doc["primary"] = {"metric": "mc_accuracy", "why": "x"}
    assert metrics_schema_errors(doc) == [
        "primary.metric: must be 'chat_perplexity' or 'perplexity', got 'mc_accuracy'"
    ]


def test_the_report_opens_with_the_primary_metric_and_puts_it_first_in_the_table() -> None:
    doc = metrics_document(_evaluations(40, 10), {})
    doc["comparisons"] = [
        {"a": "tuned", "b": "base", "metric": m, "kind": "ratio", "value": 1.5, "low": 1.2, "high": 1.8}
        | {"n": 40, "clear": True}
        for m in ("chat_perplexity", "perplexity")
    ]
    [section] = primary_section(doc)
    assert section.heading == "Primary metric"
    assert section.body.startswith("**domain perplexity (raw text)** (`perplexity`): only 10 of the 40")
    assert "- tuned: 6 [5.4, 6.6] (n=40)" in section.body
    assert "tuned vs base — domain perplexity (raw text) ratio 1.50 [1.20, 1.80]" in section.body
    assert "chat perplexity ratio" not in section.body  # the other metric's comparison stays below
    header = evaluation_body(doc).split("\n\n")[1].splitlines()[0]
    assert header.startswith(
        "| model | parameters | domain perplexity (raw text) — primary | domain perplexity (chat"
    )
    assert primary_section({"models": {}}) == []
