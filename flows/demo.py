"""The `demo` flow: the bundled mixed-domain corpus, one domain's seeds, every curation method side by
side."""

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
from finescope_core.demo_lm_eval import NEXT_STEP_TASK
from finescope_core.io import read_jsonl, write_atomic
from finescope_core.report import harness_table
from flows.curate import curate_flow
from flows.specialize import specialize_flow
from tasks.caching import artifact_dir
from tasks.context import RunContext, artifact_key, logger

PRECISION_AT = (25, 50, 100)
DEMO_LM_EVAL_TASKS = [NEXT_STEP_TASK]
"""lm-eval tasks the math demo runs on base / pruned / tuned. The answer task (`ANSWER_TASK`, generation)
is written beside it but not run by default: on SmolLM2-135M it costs ~30 CPU-seconds an item
(measured on 2 items, both wrong), minutes of the demo per model; `--evaluate.lm_eval_tasks` adds it."""
DEMO_LM_EVAL_LIMIT = 8
"""Examples per lm-eval task in the demo: the next-step task costs ~46 CPU-seconds for 8 on SmolLM2-135M
(measured), an estimated 25 s per model on 2 idle cores; `--evaluate.lm_eval_limit N` overrides it."""


def demo_harness(domain: str, include: Path | None) -> dict[str, Any]:
    """Config overrides that run the demo's lm-eval tasks (`finescope_core.demo_lm_eval`): math only."""
    if domain != "math" or include is None:
        return {}
    return {
        "evaluate.lm_eval_tasks": list(DEMO_LM_EVAL_TASKS),
        "evaluate.lm_eval_include": str(include),
        "evaluate.lm_eval_limit": DEMO_LM_EVAL_LIMIT,
    }


@flow(name="demo", log_prints=True)
def demo_flow(
    base: FinescopeConfig,
    domain: str,
    methods: list[str],
    out: str,
    corpus: dict[str, Any],
    specialize: bool = True,
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
        rows = read_jsonl(artifact_dir(RunContext.of(cfg).store, result.curated) / "curated.jsonl")
        results[method] = {
            "precision": {
                f"@{k}": domain_precision(rows[:k], domain) for k in PRECISION_AT if len(rows) >= k
            },
            "records": len(rows),
            "seconds": round(time.perf_counter() - start, 1),
            "stages": [
                {"stage": m.stage, "cached": m.cached, "seconds": round(m.seconds, 1)}
                for m in result.stages()
            ],
            "artifact": result.curated.uri,
        }
        logger().info("%s: precision %s", method, results[method]["precision"])
    metrics = None
    if specialize:
        sae_config = base.model_copy(deep=True, update={"output": str(Path(out) / "specialize")})
        sae_config.curate.method = "sae"
        metrics = specialize_flow(sae_config).metrics
    summary = {
        "domain": domain,
        "base_rate": corpus["base_rate"],
        "corpus_sources": corpus["sources"],
        "methods": results,
        "model": base.model,
        "specialize": metrics,
    }
    create_markdown_artifact(
        _report(summary),
        key=artifact_key("demo", base, "report"),
        description="Curation precision per method",
    )
    return summary


def run_demo(
    out: Path,
    domain: str,
    methods: list[str],
    config: Path | None,
    overrides: dict[str, Any],
    *,
    specialize: bool = True,
) -> Path:
    """Build the demo data under `out/data`, compare curation methods, then (optionally) run the whole
    specialize flow with `sae` curation into `out/specialize`; write `out/report.md` and `out/demo.json`."""
    if domain not in DEMO_DOMAINS:
        raise ConfigError(f"--domain {domain!r} is not a demo domain; choose one of {sorted(DEMO_DOMAINS)}")
    unknown = set(methods) - {"sae", "sentence", "activation", "random"}
    if unknown:
        raise ConfigError(
            f"--methods has unknown methods {sorted(unknown)}; choose from sae, sentence, activation, random"
        )
    out = out.resolve()
    data = build_demo_corpus(out / "data")
    # The domain's yardstick: its source's records the corpus does not hold (overridable).
    overrides = {
        "seeds": [str(data.seeds[domain])],
        "corpus": [str(data.corpus)],
        "evaluate.eval_file": str(data.evals[domain]),
        **overrides,
    }
    base = load_config(config, overrides)
    # The demo's lm-eval tasks, unless the config or the command line chose tasks of its own (then only
    # the include dir is filled in when they left it unset, so `configs/quality.yaml` can name both).
    harness = demo_harness(domain, data.lm_eval)
    if harness and not base.evaluate.lm_eval_tasks:
        base.evaluate = base.evaluate.model_copy(
            update={
                "lm_eval_tasks": harness["evaluate.lm_eval_tasks"],
                "lm_eval_include": harness["evaluate.lm_eval_include"],
                "lm_eval_limit": harness["evaluate.lm_eval_limit"],
            }
        )
    elif harness and base.evaluate.lm_eval_include is None:
        base.evaluate = base.evaluate.model_copy(
            update={"lm_eval_include": harness["evaluate.lm_eval_include"]}
        )
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
            "| model | perplexity (held-out domain items, raw text) | parameters |",
            "|---|---:|---:|",
        ]
        for name, m in s["specialize"]["models"].items():
            lines.append(f"| {name} | {m['perplexity']:.2f} | {m['parameters']:,} |")
        harness = harness_table(s["specialize"]["models"])
        if harness:
            lines += ["", "### lm-evaluation-harness (GSM8K problems outside the corpus)", "", harness]
        seconds = s["specialize"].get("stage_seconds", {})
        lines += [
            "",
            "Stage seconds: " + ", ".join(f"{k} {v:g}" for k, v in seconds.items()),
            "",
            "Full report with plots: [specialize/report.md](specialize/report.md)",
        ]
    return "\n".join(lines) + "\n"
