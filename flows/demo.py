"""The `demo` flow: the bundled mixed-domain corpus, one domain's seeds, every curation method side by side."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from prefect import flow
from prefect.artifacts import create_markdown_artifact

from finescope_core.config import ConfigError, FinescopeConfig, load_config
from finescope_core.demo import (
    DEMO_DOMAINS,
    base_rate,
    build_demo_corpus,
    domain_precision,
)
from finescope_core.io import read_jsonl, write_atomic
from flows.curate import curate_flow
from flows.specialize import specialize_flow
from tasks.common import artifact_dir, artifact_key, logger, open_store

PRECISION_AT = (25, 50, 100)


@flow(name="demo", log_prints=True)
def demo_flow(
    base: FinescopeConfig, domain: str, methods: list[str], out: str, corpus: dict[str, Any], specialize: bool = True
) -> dict[str, Any]:
    """Curate the demo corpus with each method and measure precision (share from the seed domain's source),
    then (optionally) the whole specialize flow with `sae` curation, its outputs in `out/specialize`.

    Args:
        corpus: `{"base_rate": share of the seed domain, "sources": records per source}` of the corpus.
    """
    results: dict[str, Any] = {}
    for method in methods:
        cfg = base.model_copy(deep=True)
        cfg.curate.method = method  # type: ignore[assignment]
        start = time.perf_counter()
        result = curate_flow(cfg, export=False)
        rows = read_jsonl(artifact_dir(open_store(cfg), result.curated) / "curated.jsonl")
        results[method] = {
            "precision": {f"@{k}": domain_precision(rows[:k], domain) for k in PRECISION_AT if len(rows) >= k},
            "records": len(rows),
            "seconds": round(time.perf_counter() - start, 1),
            "stages": [{"stage": m.stage, "cached": m.cached, "seconds": round(m.seconds, 1)} for m in result.stages()],
            "artifact": result.curated.uri,
        }
        logger().info("%s: precision %s", method, results[method]["precision"])
    metrics = None
    if specialize:
        sae_config = base.model_copy(deep=True, update={"output": str(Path(out) / "specialize")})
        sae_config.curate.method = "sae"
        metrics = specialize_flow(sae_config).metrics
    summary = {
        "domain": domain, "base_rate": corpus["base_rate"], "corpus_sources": corpus["sources"],
        "methods": results, "model": base.model, "specialize": metrics,
    }  # fmt: skip
    create_markdown_artifact(_report(summary), key=artifact_key("demo", base, "report"), description="Curation precision per method")
    return summary


def run_demo(
    out: Path, domain: str, methods: list[str], config: Path | None, overrides: dict[str, Any], *, specialize: bool = True
) -> Path:
    """Build the demo data under `out/data`, compare curation methods, then (optionally) run the whole
    specialize flow with `sae` curation into `out/specialize`; write `out/report.md` and `out/demo.json`."""
    if domain not in DEMO_DOMAINS:
        raise ConfigError(f"--domain {domain!r} is not a demo domain; choose one of {sorted(DEMO_DOMAINS)}")
    unknown = set(methods) - {"sae", "sentence", "activation", "random"}
    if unknown:
        raise ConfigError(f"--methods has unknown methods {sorted(unknown)}; choose from sae, sentence, activation, random")
    out = out.resolve()
    data = build_demo_corpus(out / "data")
    overrides = {"seeds": [str(data.seeds[domain])], "corpus": [str(data.corpus)], **overrides}
    base = load_config(config, overrides)
    if base.name is None:
        base.name = f"demo-{domain}"
    corpus = {"base_rate": base_rate(data.corpus, domain), "sources": data.sources}
    summary = demo_flow(base, domain, methods, str(out), corpus, specialize)
    out.mkdir(parents=True, exist_ok=True)
    write_atomic(out / "demo.json", json.dumps(summary, indent=2))
    write_atomic(out / "report.md", _report(summary))
    return out / "report.md"


def _report(s: dict[str, Any]) -> str:
    total = sum(s["corpus_sources"].values())
    lines = [
        f"# finescope demo: `{s['domain']}` seeds, model `{s['model']}`",
        "",
        f"Corpus: {total} records from {len(s['corpus_sources'])} sources; "
        f"{s['base_rate']:.3f} of it belongs to the seed domain (the precision of a random pick).",
        "",
        "Precision = share of the curated set that comes from the seed domain's source.",
        "",
        "| method | " + " | ".join(f"precision@{k}" for k in PRECISION_AT) + " | seconds |",
        "|---|" + "---:|" * (len(PRECISION_AT) + 1),
    ]
    for method, r in s["methods"].items():
        cells = [f"{r['precision'].get(f'@{k}', float('nan')):.3f}" for k in PRECISION_AT]
        lines.append(f"| {method} | " + " | ".join(cells) + f" | {r['seconds']:.0f} |")
    lines += ["", "Corpus sources: " + ", ".join(f"{k} {v}" for k, v in s["corpus_sources"].items())]
    if s.get("specialize"):
        lines += [
            "",
            "## The specialised model (sae curation -> prune -> teacher -> LoRA)",
            "",
            "| model | perplexity (held-out domain text) | parameters |",
            "|---|---:|---:|",
        ]
        for name, m in s["specialize"]["models"].items():
            lines.append(f"| {name} | {m['perplexity']:.2f} | {m['parameters']:,} |")
        seconds = s["specialize"].get("stage_seconds", {})
        lines += ["", "Stage seconds: " + ", ".join(f"{k} {v:g}" for k, v in seconds.items()), "",
                  "Full report with plots: [specialize/report.md](specialize/report.md)"]
    return "\n".join(lines) + "\n"
