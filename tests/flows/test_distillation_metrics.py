"""metrics.json carries the teacher's fallback counts by reason (the distilled stage's info)."""

from tasks.caching import StageManifest
from tasks.report import metrics_document


def _manifest(stage: str, info: dict) -> StageManifest:
    return StageManifest(stage=stage, key="k", uri="u", sha256="s", cached=False, seconds=1.0, info=info)


def test_metrics_document_lists_fallbacks_by_reason_per_variant() -> None:
    model = {
        "perplexity": 5.0,
        "parameters": 10,
        "n": {"perplexity": 4},
        "ci": {"perplexity": {"value": 5.0, "low": 4.0, "high": 6.0, "n": 4}},
    }
    evaluations = {name: _manifest("evaluation", model) for name in ("base", "pruned", "tuned")}
    info = {
        "kept_teacher": 3,
        "fell_back_to_reference": 2,
        "dropped": 0,
        "rejected": {"truncated": 1, "wrong_answer": 1},
        "fell_back": {"truncated": 1, "wrong_answer": 1},
        "dropped_by_reason": {},
        "max_new_tokens_used": 96,
        "new_tokens": 500,
    }
    doc = metrics_document(
        evaluations, {}, distilled={"": _manifest("distilled", info), "random": _manifest("distilled", {})}
    )
    assert doc["distillation"]["curated"]["fell_back"] == {"truncated": 1, "wrong_answer": 1}
    assert (
        doc["distillation"]["curated"]["max_new_tokens_used"] == 96
        and "new_tokens" not in doc["distillation"]["curated"]
    )
    assert doc["distillation"]["random"] == {}
    assert "distillation" not in metrics_document(evaluations, {})
