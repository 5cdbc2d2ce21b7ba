"""`finescope store plan`: which stages the next run of a config reuses and which it computes.

Every stage's key comes from the `*_key` function its task calls, and reuse is decided by the same
lookups the flows make (`lookup_stage`, `lookup_activations`, `lookup_sae`), so the plan cannot drift
from what a run does. A key hashes the content of the upstream artifacts, so once a stage has to be
computed the keys below it are unknown: those stages are planned as "after X". Planning reads and
hashes input data and small artifacts (records, the curated set); it loads no model and needs no
Prefect server: only plain functions are called, never tasks or flows.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from finescope_core.config import FinescopeConfig
from finescope_core.curate import hooked_layers
from finescope_core.data import Record, RecordSet
from finescope_core.evaluate.split import Holdout
from finescope_core.model import DEFAULT_MODEL, locate_default_gguf, model_config
from tasks.activations import (
    activations_key,
    listed_shards,
    lookup_activations,
    shard_key,
    shard_plan,
)
from tasks.caching import StageManifest, lookup_stage
from tasks.codes import codes_key
from tasks.context import open_store
from tasks.data import load_data, read_inputs, read_sae_corpus, records_key
from tasks.evalset import EvalData, candidate_items, decontaminate, eval_files, holdout, training_texts
from tasks.evaluate import evaluation_items, evaluation_key
from tasks.finetune import tuned_key
from tasks.identity import model_digest
from tasks.keymodels import StageKey
from tasks.models import ModelRef, default_model_key
from tasks.prune import (
    baseline_records,
    curated_records,
    pruned_key,
    pruning_texts,
    texts_sha,
    training_pool,
)
from tasks.report import CURATE_SECONDS, metrics_document, report_key, stage_seconds
from tasks.retrieve import curated_key, needs_sentence, sentence_key
from tasks.sae import lookup_sae, sae_groups, sae_key, sae_layers_key
from tasks.saliency import saliency_key
from tasks.teacher import distilled_key

Status = Literal["reuse", "compute", "after"]
FLOWS = ("specialize", "prune", "curate")


@dataclass(frozen=True)
class PlannedPart:
    """One piece of a fanned-out stage (an activation shard, the SAEs of some layers)."""

    stage: str
    key: str
    reused: bool


@dataclass
class PlannedStage:
    """One stage of the plan. `key` is None when an upstream stage (`after`) must be computed first."""

    name: str
    stage: str
    status: Status
    key: str | None = None
    uri: str | None = None
    after: str | None = None
    parts: list[PlannedPart] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        parts = (
            {"reused": sum(p.reused for p in self.parts), "total": len(self.parts)} if self.parts else None
        )
        return {
            "name": self.name,
            "stage": self.stage,
            "status": self.status,
            "key": self.key,
            "uri": self.uri,
            "after": self.after,
            "parts": parts,
        }


@dataclass
class Plan:
    flow: str
    store: str
    stages: list[PlannedStage]

    def counts(self) -> dict[str, int]:
        return {s: sum(row.status == s for row in self.stages) for s in ("reuse", "compute", "after")}

    def keys(self) -> set[tuple[str, str]]:
        """Every (stage, key) the run would read or write, fanned-out parts included: what `gc` keeps."""
        out = {(row.stage, row.key) for row in self.stages if row.key is not None}
        return out | {(p.stage, p.key) for row in self.stages for p in row.parts}

    def to_json(self) -> dict[str, Any]:
        return {
            "flow": self.flow,
            "store": self.store,
            "counts": self.counts(),
            "stages": [s.to_json() for s in self.stages],
        }


@dataclass(frozen=True)
class Dep:
    """What a planned stage hands downstream: its artifact when reused, else the stage to compute first."""

    sha256: str | None = None
    manifest: StageManifest | None = None
    blocker: str | None = None

    @property
    def known(self) -> bool:
        return self.sha256 is not None


def plan(cfg: FinescopeConfig, flow: str = "specialize") -> Plan:
    """The plan of the next `flow` run of `cfg` against its store.

    Raises:
        ValueError: an unknown flow, or input data the run would refuse too (same checks, same messages).
    """
    if flow not in FLOWS:
        raise ValueError(f"flow {flow!r} cannot be planned; choose one of {', '.join(FLOWS)}")
    planner = _Planner(cfg)
    if flow == "curate":
        planner.curate()
    elif flow == "prune":
        planner.prune_flow()
    else:
        planner.specialize()
    return Plan(flow, cfg.store, planner.rows)


class _Planner:
    def __init__(self, cfg: FinescopeConfig):
        self.cfg = cfg
        self.store = open_store(cfg)
        self.rows: list[PlannedStage] = []
        self._models: dict[str, Dep] = {}
        self.held = Holdout()
        self.eval_info: Callable[[], dict[str, Any]] = dict
        self.code_dep: Dep | None = None
        self.code_manifests: list[StageManifest] | None = None

    def _blocked(self, name: str, stage: str, deps: Sequence[Dep | None]) -> Dep | None:
        """A Dep blocked by the first missing upstream stage (and its row), or None when all are known."""
        blocker = next((d.blocker for d in deps if d is not None and not d.known), None)
        if blocker is None:
            return None
        self.rows.append(PlannedStage(name, stage, "after", after=blocker))
        return Dep(blocker=blocker)

    def _row(
        self, name: str, spec: StageKey, found: StageManifest | None, parts: list[PlannedPart] | None = None
    ) -> Dep:
        status: Status = "reuse" if found is not None else "compute"
        uri = self.store.artifact_uri(spec.stage, spec.key)
        self.rows.append(PlannedStage(name, spec.stage, status, spec.key, uri, parts=parts or []))
        return Dep(found.sha256, found) if found is not None else Dep(blocker=name)

    def step(self, name: str, stage: str, deps: Sequence[Dep | None], spec: Callable[[], StageKey]) -> Dep:
        """Plan one stage whose key `spec()` builds once every dep is known."""
        blocked = self._blocked(name, stage, deps)
        if blocked is not None:
            return blocked
        key = spec()
        return self._row(name, key, lookup_stage(self.store, key))

    def model(self, spec: str, name: str = "models") -> Dep:
        """The bundled default is a stage (converted once into the store); any other model is hashed."""
        if spec not in self._models:
            if spec == DEFAULT_MODEL:
                self._models[spec] = self.step(
                    name, "models", [], lambda: default_model_key(locate_default_gguf())
                )
            else:
                self._models[spec] = Dep(model_digest(spec))
        return self._models[spec]

    # --- curate ---------------------------------------------------------------------------------

    def curate(self) -> dict[str, Dep | None]:
        """The curate flow's stages, by CurateResult field name (None where the method skips one)."""
        cfg = self.cfg
        seeds, prepared = read_inputs(cfg)
        self.held = holdout(cfg, seeds, prepared.corpus)  # an empty split is refused by the run, not the plan
        out: dict[str, Dep | None] = dict.fromkeys(CURATE_SECONDS)
        corpus = out["corpus"] = self.step(
            "corpus", "corpus", [], lambda: records_key("corpus", prepared.corpus.sha256)
        )
        seed_dep = out["seeds"] = self.step("seeds", "seeds", [], lambda: records_key("seeds", seeds.sha256))
        general = read_sae_corpus(cfg)  # `sae` with `curate.sae_corpus`: saliency and SAEs come from it
        sae_corpus = sae_acts = None
        if general is not None:
            sae_corpus = out["sae_corpus"] = self.step(
                "sae-corpus", "sae-corpus", [], lambda: records_key("sae-corpus", general.corpus.sha256)
            )
        acts: list[Dep] = []
        sae: Dep | None = None
        if cfg.curate.method in ("sae", "activation"):
            layers = hooked_layers(model_config(cfg.model).num_hidden_layers, cfg.curate)
            model = self.model(cfg.model)
            source = sae_corpus or corpus
            sal = out["saliency"] = self.step(
                "saliency",
                "saliency",
                [model, source],
                lambda: saliency_key(cfg, model.sha256, source.sha256, layers),
            )
            acts = [
                self.activations("activations (corpus)", model, corpus, len(prepared.corpus), layers, sal),
                self.activations("activations (seeds)", model, seed_dep, len(seeds), layers, sal),
            ]
            out["activations"], out["seed_activations"] = acts
            if sae_corpus is not None and general is not None:
                sae_acts = out["sae_activations"] = self.activations(
                    "activations (sae-corpus)", model, sae_corpus, len(general.corpus), layers, sal
                )
            if cfg.curate.method == "sae":
                sae = out["sae"] = self.sae(sae_acts or acts[0], sal, layers)
                self.code_dep = self.codes(acts[0], sae)
        sent: Dep | None = None
        if needs_sentence(cfg):
            sent = out["sentence_embeddings"] = self.step(
                "sentence-embeddings", "sentence-embeddings", [corpus], lambda: sentence_key(corpus.sha256)
            )

        def spec() -> StageKey:
            shas = [a.sha256 for a in acts] if acts else None
            return curated_key(
                cfg,
                corpus.sha256,
                seed_dep.sha256,
                shas,
                sae.sha256 if sae else None,
                sent.sha256 if sent else None,
                self.held.sha256(),
            )

        out["curated"] = self.step("curated", "curated", [corpus, seed_dep, *acts, sae, sent], spec)
        return out

    def activations(self, name: str, model: Dep, records: Dep, rows: int, layers: list[int], sal: Dep) -> Dep:
        """Gathered activations: reused only with every shard they list (`lookup_activations`)."""
        blocked = self._blocked(name, "activations", [model, records, sal])
        if blocked is not None:
            return blocked
        cfg = self.cfg
        ref = ModelRef(path=cfg.model, sha256=model.sha256)
        found = lookup_activations(cfg, ref, records.manifest, layers, sal.manifest)
        if found is not None:
            parts = [PlannedPart(s["stage"], s["key"], True) for s in listed_shards(self.store, found)]
        else:
            specs = [
                shard_key(cfg, model.sha256, records.sha256, layers, sal.sha256, a, b)
                for a, b in shard_plan(rows, cfg.curate.shard_size)
            ]
            parts = self._parts(specs)
        spec = activations_key(cfg, model.sha256, records.sha256, layers, sal.sha256)
        return self._row(name, spec, found, parts)

    def sae(self, acts: Dep, sal: Dep, layers: list[int]) -> Dep:
        blocked = self._blocked("sae", "sae", [acts, sal])
        if blocked is not None:
            return blocked
        cfg = self.cfg
        groups = sae_groups(len(layers), cfg.orchestration.sae_layers_per_task)
        parts = self._parts(
            [sae_layers_key(cfg, acts.sha256, sal.sha256, [layers[i] for i in g]) for g in groups]
        )
        return self._row(
            "sae", sae_key(cfg, acts.sha256, sal.sha256), lookup_sae(cfg, acts.manifest, sal.manifest), parts
        )

    def codes(self, acts: Dep, sae: Dep) -> Dep:
        """The corpus's sparse codes, one artifact per activation shard (no gathered artifact: the curated
        key hashes the activations and the SAEs they come from; the report's key, their seconds)."""
        blocked = self._blocked("sae-codes", "sae-codes", [acts, sae])
        if blocked is not None:
            return blocked
        assert acts.manifest is not None and sae.sha256 is not None
        specs = [
            codes_key(self.cfg, s["sha256"], sae.sha256) for s in listed_shards(self.store, acts.manifest)
        ]
        found = [lookup_stage(self.store, spec) for spec in specs]
        parts = [
            PlannedPart(spec.stage, spec.key, hit is not None) for spec, hit in zip(specs, found, strict=True)
        ]
        done = all(hit is not None for hit in found)
        self.rows.append(PlannedStage("sae-codes", "sae-codes", "reuse" if done else "compute", parts=parts))
        if not done:
            return Dep(blocker="sae-codes")
        self.code_manifests = [hit for hit in found if hit is not None]
        return Dep(sha256="+".join(m.sha256 for m in self.code_manifests))

    def _parts(self, specs: list[StageKey]) -> list[PlannedPart]:
        return [PlannedPart(s.stage, s.key, lookup_stage(self.store, s) is not None) for s in specs]

    # --- prune and specialize -------------------------------------------------------------------

    def prune_flow(self) -> None:
        """The prune flow runs curate only when the pruning data comes from it."""
        cfg = self.cfg
        deps: list[Dep | None] = []
        seeds: Dep | None = None
        if cfg.prune.data in ("curated", "random"):
            curate = self.curate()
            deps = [curate["corpus"], curate["curated"]]
            seeds = curate["seeds"]

        def texts() -> list[str]:
            corpus, curated = (d.manifest if d else None for d in deps) if deps else (None, None)
            if not deps:
                return pruning_texts(cfg, None, None)
            return pruning_texts(
                cfg, corpus, curated, seeds=seeds.manifest if seeds else None, excluded=self.held.excluded
            )

        base = self.model(cfg.model)
        self.step("pruned", "pruned", [base, *deps], lambda: pruned_key(cfg, base.sha256, texts_sha(texts())))

    def specialize(self) -> None:
        cfg = self.cfg
        curate = self.curate()
        corpus, curated = curate["corpus"], curate["curated"]
        split = _Split(cfg, corpus, curate["seeds"], curated, self.held)
        base = self.model(cfg.model)
        teacher = base if cfg.teacher.model == "base" else self.model(cfg.teacher.model, "models (teacher)")
        prune_deps = [corpus, curated] if cfg.prune.data in ("curated", "random") else []
        variants = {
            "": self.variant("", base, teacher, prune_deps, split.pruning_texts, split.train, curated)
        }
        for name in cfg.evaluate.baselines:
            variants[name] = self.variant(
                name,
                base,
                teacher,
                [curated],
                lambda n=name: [r.text for r in split.baseline(n)],
                lambda n=name: split.baseline(n),
                curated,
            )
        evaluations = self.evaluations(base, variants, split, curate)
        self.report(curate, variants, evaluations)

    def variant(
        self,
        name: str,
        base: Dep,
        teacher: Dep,
        prune_deps: list,
        texts: Callable[[], list[str]],
        records: Callable[[], list[Record]],
        curated: Dep | None,
    ) -> list[Dep]:
        """(pruned, distilled, tuned) of one variant, as `flows.specialize._variant` chains them."""
        cfg, label = self.cfg, f" ({name})" if name else ""
        pruned = self.step(
            f"pruned{label}",
            "pruned",
            [base, *prune_deps],
            lambda: pruned_key(cfg, base.sha256, texts_sha(texts())),
        )
        distilled = self.step(
            f"distilled{label}",
            "distilled",
            [teacher, curated],
            lambda: distilled_key(cfg, teacher.sha256, records()),
        )
        kd = cfg.finetune.kd_weight > 0  # the loss reads the teacher
        tuned = self.step(
            f"tuned{label}",
            "tuned",
            [pruned, distilled, *([teacher] if kd else [])],
            lambda: tuned_key(cfg, pruned.sha256, distilled.sha256, teacher.sha256),
        )
        return [pruned, distilled, tuned]

    def evaluations(
        self, base: Dep, variants: dict[str, list[Dep]], split: _Split, curate: dict[str, Dep | None]
    ) -> dict[str, Dep]:
        """The evaluation data is decontaminated against every variant's training data: known once they are."""
        cfg = self.cfg
        data_deps = [curate["corpus"], curate["seeds"], curate["curated"], *(v[1] for v in variants.values())]
        full = functools.cache(lambda: split.eval_data({n: v[1] for n, v in variants.items()}))
        self.eval_info = lambda: full().info
        data = functools.cache(lambda: full().payload())
        models = {"base": base}
        for name, (pruned, _, tuned) in variants.items():
            suffix = f"-{name}" if name else ""
            models[f"pruned{suffix}"], models[f"tuned{suffix}"] = pruned, tuned
        return {
            name: self.step(
                f"evaluation ({name})",
                "evaluation",
                [model, *data_deps],
                lambda m=model: evaluation_key(cfg, m.sha256, data()),
            )
            for name, model in models.items()
        }

    def report(
        self, curate: dict[str, Dep | None], variants: dict[str, list[Dep]], evaluations: dict[str, Dep]
    ) -> None:
        """The report's key hashes the metrics document: every evaluation and every stage's recorded time."""
        cfg = self.cfg
        stages = [d for d in curate.values() if d is not None] + [d for v in variants.values() for d in v]

        def spec() -> StageKey:
            seconds = stage_seconds(
                {f: d.manifest if d else None for f, d in curate.items()},
                {n: [d.manifest for d in v] for n, v in variants.items()},
                {n: d.manifest for n, d in evaluations.items()},
                self.code_manifests,
            )
            manifests = {n: d.manifest for n, d in evaluations.items()}
            metrics = metrics_document(
                manifests,
                seconds,
                evaluation=self.eval_info(),
                distilled={n: v[1].manifest for n, v in variants.items()},
                items=evaluation_items(self.store, manifests),
                record_sets={
                    name: d.manifest if d else None
                    for name, d in (("corpus", curate["corpus"]), ("curate.sae_corpus", curate["sae_corpus"]))
                },
            )
            return report_key(cfg, metrics, curate["curated"].sha256, variants[""][0].sha256)

        self.step("report", "report", [*stages, self.code_dep, *evaluations.values()], spec)


class _Split:
    """The training data and evaluation sets as `flows.specialize` builds them, read only when a key needs it."""

    def __init__(
        self, cfg: FinescopeConfig, corpus: Dep | None, seeds: Dep | None, curated: Dep | None, held: Holdout
    ):
        self.cfg, self.corpus, self.seeds, self.curated, self.held = cfg, corpus, seeds, curated, held

    @functools.cached_property
    def _records(self) -> tuple[RecordSet, RecordSet]:
        return load_data(self.cfg, self.corpus.manifest), load_data(self.cfg, self.seeds.manifest)

    def train(self) -> list[Record]:
        return curated_records(self.cfg, self.corpus.manifest, self.curated.manifest)

    def pruning_texts(self) -> list[str]:
        return pruning_texts(
            self.cfg,
            self.corpus.manifest,
            self.curated.manifest,
            seeds=self.seeds.manifest,
            excluded=self.held.excluded,
        )

    def baseline(self, name: str) -> list[Record]:
        corpus, seeds = self._records
        pool = training_pool(corpus.records, seeds.records, self.held.excluded)
        return baseline_records(name, pool, len(self.train()), self.cfg.seed)

    def eval_data(self, distilled: dict[str, Dep]) -> EvalData:
        corpus, seeds = self._records
        files = eval_files(self.cfg)
        domain, general, info = candidate_items(self.cfg, seeds, corpus, self.held, files)
        learned: list[str] = []
        for name, dep in distilled.items():
            records = self.train() if not name else self.baseline(name)
            texts = self.pruning_texts() if not name else [r.text for r in records]
            learned += training_texts(self.cfg, records, texts, dep.manifest)
        return decontaminate(domain, general, learned, info, files)
