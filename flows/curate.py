"""The `curate` flow: seeds + corpus -> a ranked, domain-specific subset of the corpus."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any, NamedTuple

from prefect import flow
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.utilities.annotations import quote
from pydantic import BaseModel, Field

from finescope_core.config import FinescopeConfig
from finescope_core.curate import CURATED_FILE, check_curation_fits, hooked_layers
from finescope_core.data import PreparedCorpus, RecordSet, check_sizes, shown_text
from finescope_core.evaluate.split import Holdout
from finescope_core.io import read_jsonl
from finescope_core.memplan import check_memory
from finescope_core.model import model_config
from finescope_core.run_warnings import duplicate_warnings
from finescope_core.settings import summary
from flows.fanout import embed, encode_corpus, train_saes
from flows.placement import place
from flows.runtime import (
    apply_gpu_limit,
    check_runner,
    prefect_results,
)
from flows.ui import detached, namer, tagged
from tasks.caching import StageManifest, artifact_dir
from tasks.context import RunContext, artifact_key, logger
from tasks.data import (
    data_task,
    inputs_task,
    model_task,
    read_inputs,
    read_sae_corpus,
    sae_data_task,
    sae_inputs_task,
)
from tasks.evalset import holdout
from tasks.export import Exported, RunRecord, curated_outputs, export_task, run_facts
from tasks.planning import current_planner
from tasks.prune import training_pool
from tasks.report import compute_seconds
from tasks.retrieve import retrieve_task
from tasks.saliency import saliency_task


class CurateResult(BaseModel):
    """Manifests of every stage the run used (None for stages its method skips)."""

    layers: list[int]
    corpus: StageManifest
    seeds: StageManifest
    sae_corpus: StageManifest | None = None
    """The general corpus the SAEs train on (`curate.sae_corpus`; None: they train on `corpus`)."""
    saliency: StageManifest | None = None
    activations: StageManifest | None = None
    seed_activations: StageManifest | None = None
    sae_activations: StageManifest | None = None
    """The activations of `sae_corpus`, which the SAEs train on (None without it)."""
    sae: StageManifest | None = None
    codes: list[StageManifest] | None = None
    """The corpus's sparse SAE codes, one artifact per shard (`sae` only)."""
    curated: StageManifest
    held_out: Holdout = Field(default_factory=Holdout)
    """Corpus ids kept out of curation (and all training data) for evaluation."""
    exported: Exported | None = None
    """Where the outputs went (None when a parent flow exports them)."""

    def manifests(self) -> dict[str, Any]:
        """Every stage's manifest by name, for run.json (the per-shard codes as one entry listing its
        parts)."""
        skip = ("layers", "exported", "held_out", "codes")
        out = {k: v for k, v in self.model_dump().items() if k not in skip and v is not None}
        if self.codes:
            first = self.codes[0]
            out["codes"] = {
                "stage": first.stage,
                "uri": first.uri.rsplit("/", 1)[0],
                "cached": all(c.cached for c in self.codes),
                "seconds": sum(c.seconds for c in self.codes),
                "info": {"shards": len(self.codes), "rows": sum(c.info.get("rows", 0) for c in self.codes)},
                "parts": [{"key": c.key, "sha256": c.sha256} for c in self.codes],
            }
        return out

    def stages(self) -> list[StageManifest]:
        """The stages this run used, in pipeline order."""
        order = (
            self.corpus,
            self.seeds,
            self.sae_corpus,
            self.saliency,
            self.activations,
            self.seed_activations,
            self.sae_activations,
            self.sae,
            self.curated,
        )
        return [m for m in order if m is not None]


def model_shape(cfg: FinescopeConfig) -> tuple[int, int]:
    """(num_hidden_layers, hidden_size) of the configured model, read without loading weights."""
    hf = model_config(cfg.model)
    return hf.num_hidden_layers, hf.hidden_size


class Inputs(NamedTuple):
    """The validated input data of a run, read by `preflight` before any work."""

    records: tuple[RecordSet, PreparedCorpus]
    """(seeds, corpus)."""
    sae_corpus: PreparedCorpus | None
    """The general corpus the SAEs train on (`curate.sae_corpus`, `sae` method only), else None."""


def preflight(cfg: FinescopeConfig, evaluating: bool = False) -> tuple[list[int], Inputs, Holdout]:
    """Everything that can be checked before work starts: model, layer settings, input data (the SAEs'
    general corpus included), evaluation files and split, store access.

    The store is touched last, so bad input leaves nothing behind in it (not even a probe).

    Returns:
        The layers to hook (empty for methods without a model), the validated input data and the
        records held out of curation for evaluation.
    """
    if cfg.curate.method in ("sae", "activation"):
        check_curation_fits(cfg.curate, model_shape(cfg)[1])
        check_memory(cfg, stages=("saliency", "activations"))  # above memory_budget: refused before any load
    check_runner(cfg)
    ctx = RunContext.of(cfg)
    layers, inputs, held = read_data(
        cfg,
        evaluating,
        read=lambda c: inputs_task(ctx, c.seeds, c.corpus, c.curate.final_size),
        read_sae=lambda c: sae_inputs_task(ctx, c.curate),
    )
    ctx.store.check_writable()
    apply_gpu_limit(cfg)
    return layers, inputs, held


def read_data(
    cfg: FinescopeConfig,
    evaluating: bool = False,
    read: Callable[[FinescopeConfig], tuple[RecordSet, PreparedCorpus]] = read_inputs,
    read_sae: Callable[[FinescopeConfig], PreparedCorpus | None] = read_sae_corpus,
) -> tuple[list[int], Inputs, Holdout]:
    """The layers to hook, the validated input data and the evaluation hold-out: what a run (through
    retried tasks) and a dry run (plain reads) both start from; nothing written."""
    layers = (
        hooked_layers(model_shape(cfg)[0], cfg.curate) if cfg.curate.method in ("sae", "activation") else []
    )
    inputs = read(cfg)
    seeds, prepared = inputs
    sae_corpus = read_sae(cfg)
    held = holdout(cfg, seeds, prepared.corpus, evaluating=evaluating)
    usable = len(training_pool(prepared.corpus.records, seeds.records, held.excluded))
    check_sizes(usable, needed=cfg.curate.final_size, what="curate.final_size")
    return layers, Inputs(inputs, sae_corpus), held


@flow(name="curate", flow_run_name=namer("curate"), log_prints=True)
def curate_flow(config: FinescopeConfig, export: bool = True, evaluating: bool = False) -> CurateResult:
    """Data -> saliency -> activations -> SAEs -> sparse codes -> retrieval and vote (each stage cached in
    the store).

    With `export` (off when a parent flow exports), the curated set goes to the run's output location
    as a dataset directory (data, dataset card, run.json). The evaluation split is kept out of the
    curated set either way; `evaluating` (the specialize flow) also requires it to hold items.
    """
    start = time.perf_counter()
    layers, inputs, held = preflight(config, evaluating)
    if export:
        config = place(config, "curate")  # another run's outputs are never replaced in silence
    ctx = RunContext.of(config)
    with prefect_results(config), tagged(config):
        result = curate_graph(config, ctx, layers, inputs, held)
        publish(config, result)
        if export:
            facts = run_facts(config, result.curated)
            outputs = curated_outputs(config, result.curated, facts)
            result.exported = export_task(
                ctx, RunRecord.of(config), "curate", outputs, result.manifests(), time.perf_counter() - start
            )
    return result


def curate_stages(config: FinescopeConfig, ctx: RunContext, evaluating: bool = False) -> CurateResult:
    """The curate flow as a parent flow's subflow; in a dry run, its graph planned in place (an empty
    evaluation split is the run's to refuse, not the plan's)."""
    if current_planner() is not None:
        return curate_graph(config, ctx, *read_data(config))
    return detached(curate_flow(config, export=False, evaluating=evaluating))


def curate_graph(
    config: FinescopeConfig, ctx: RunContext, layers: list[int], inputs: Inputs, held: Holdout
) -> CurateResult:
    """The curate pipeline's stages, as a run executes them and `store plan` plans them (`tasks.planning`)."""
    # quote: the records are data, not futures; Prefect need not walk every one of them.
    corpus, seeds = data_task(ctx, quote(inputs.records))
    section = config.curate
    method = section.method
    sal = acts = seed_acts = sae = codes = None
    # With `curate.sae_corpus` (`sae` only) the SAEs train on that corpus's activations. The saliency is
    # taken on it too, so the coordinates, the activations and the SAEs depend on it alone and one SAE
    # set serves every corpus and seed set; the corpus and seeds are embedded at those coordinates.
    sae_corpus = sae_data_task(ctx, quote(inputs.sae_corpus)) if inputs.sae_corpus is not None else None
    sae_acts = None
    if method in ("sae", "activation"):
        ref = model_task(ctx, ctx.model)
        # `activation` reads the same selected coordinates as `sae`, so it isolates what the SAE adds
        # and reuses every corpus-side stage of an `sae` run (without `sae_corpus`).
        sal = saliency_task(section, ctx, ref, sae_corpus or corpus, layers)
        acts, seed_acts, *rest = embed(
            config, ctx, ref, [corpus, seeds, *([sae_corpus] if sae_corpus else [])], layers, sal
        )
        sae_acts = rest[0] if rest else None
        if method == "sae":
            sae = train_saes(config, ctx, sae_acts or acts, sal, layers, sae_corpus or corpus)
            codes = encode_corpus(config, ctx, acts, sae)
    curated = retrieve_task(
        section, ctx, corpus, seeds, (acts, seed_acts) if acts else None, sae, quote(held), codes
    )
    logger().info(
        "held out of curation for evaluation: %d split records, %d eval-file duplicates",
        len(held.split),
        len(held.file_duplicates),
    )
    return CurateResult(
        layers=layers,
        corpus=corpus,
        seeds=seeds,
        sae_corpus=sae_corpus,
        saliency=sal,
        activations=acts,
        seed_activations=seed_acts,
        sae_activations=sae_acts,
        sae=sae,
        codes=codes,
        curated=curated,
        held_out=held,
    )


def corpus_warnings(result: CurateResult) -> list[str]:
    """Exact duplicates removed from the corpus and from `curate.sae_corpus`, as warnings."""
    found = duplicate_warnings(result.corpus.info, "corpus")
    if result.sae_corpus is not None:
        found += duplicate_warnings(result.sae_corpus.info, "curate.sae_corpus")
    return found


def publish(cfg: FinescopeConfig, result: CurateResult) -> None:
    """Stage table and the top of the curated set as Prefect artifacts (and in the log), warnings first."""
    for line in corpus_warnings(result):
        logger().warning("%s", line)
    stages = result.stages()
    create_table_artifact(
        [
            {"stage": m.stage, "cached": m.cached, "seconds": round(compute_seconds(m), 1), "uri": m.uri}
            for m in stages
        ],
        key=artifact_key("curate", cfg, "stages"),
        description=f"Stages of the curate run: {summary(cfg)}",
    )
    if result.sae is not None:
        rows = [
            {"layer": layer, **metrics}
            for layer, metrics in zip(result.layers, result.sae.info["metrics"], strict=True)
        ]
        create_table_artifact(
            rows,
            key=artifact_key("curate", cfg, "sae-metrics"),
            description=f"SAE metrics per layer: {summary(cfg)}",
        )
    top = _top_records(cfg, result.curated, 10)
    create_markdown_artifact(
        _markdown(cfg, result, top),
        key=artifact_key("curate", cfg, "curated-set"),
        description=f"Curated set: {summary(cfg)}",
    )
    logger().info("curated %d records -> %s", result.curated.info.get("records", 0), result.curated.uri)


def _top_records(cfg: FinescopeConfig, curated: StageManifest, n: int) -> list[dict[str, Any]]:
    return read_jsonl(artifact_dir(RunContext.of(cfg).store, curated) / CURATED_FILE)[:n]


def _sae_source(result: CurateResult) -> list[str]:
    """The line naming the records the SAEs were trained on (none for methods without SAEs, or SAEs
    stored before the stage info named them)."""
    trained = result.sae.info.get("trained_on") if result.sae is not None else None
    if not trained:
        return []
    what = (
        "the general corpus `curate.sae_corpus`"
        if trained["stage"] == "sae-corpus"
        else "the corpus being curated"
    )
    return ["", f"SAEs trained on {what}: {trained['records']} records, sha256 `{trained['sha256'][:16]}`"]


def _markdown(cfg: FinescopeConfig, result: CurateResult, top: list[dict[str, Any]]) -> str:
    lines = [
        f"# Curated set ({cfg.curate.method})",
        "",
        f"{result.curated.info.get('records', 0)} records from "
        f"{result.curated.info.get('corpus_records', '?')} "
        f"(layers {result.layers or '-'}); artifact `{result.curated.uri}`",
        *_sae_source(result),
        *(f"\n**Warning**: {w}" for w in corpus_warnings(result)),
        "",
        "| rank | id | score | votes | text |",
        "|---:|---|---:|---:|---|",
    ]
    for r in top:
        text = shown_text(r)[:100].replace("|", "\\|").replace("\n", " ")
        lines.append(f"| {r['rank']} | {r.get('id')} | {r['score']:.3f} | {r['votes']:g} | {text} |")
    return "\n".join(lines)
