"""The evaluation sets of a run: the split kept out of curation, the domain and general items, and the
contamination check against every variant's training data (no Prefect task: plain functions the flows
and `finescope store plan` call alike)."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from finescope_core.config import FinescopeConfig
from finescope_core.data import Record, RecordSet, load_records, seed_copies
from finescope_core.distilled import DISTILLED_FILE, read_distilled, row_text
from finescope_core.evaluate import load_mc_items, load_numeric_items
from finescope_core.evaluate.contamination import (
    NEAR_DUPLICATE,
    NGRAM,
    check_contamination,
    internal_duplicates,
)
from finescope_core.evaluate.harness_docs import harness_texts
from finescope_core.evaluate.leakage import mc_text, numeric_text, pool_duplicates_by_kind
from finescope_core.evaluate.split import (
    DOMAIN_RULE,
    GENERAL_RULE,
    EvalItem,
    Holdout,
    evaluation_split,
    general_sample,
    nearest_to_centroid,
)
from finescope_core.formats import DataError
from tasks.caching import StageManifest, artifact_dir
from tasks.context import RunContext, storage_options


@dataclass
class EvalFiles:
    """The user's evaluation files, loaded and validated (None where not given)."""

    domain: list[Record] | None = None
    general: list[Record] | None = None
    mc: list[dict[str, Any]] | None = None
    numeric: list[dict[str, Any]] | None = None
    lm_eval: dict[str, list[str]] = field(default_factory=dict)
    """lm-eval task -> its documents' texts, for the tasks whose data is local JSON (`harness_texts`)."""


def eval_files(cfg: FinescopeConfig) -> EvalFiles:
    """Load every evaluation file the config names; bad files fail here, naming file and line."""
    options = storage_options(cfg)
    ev = cfg.evaluate

    def records(uri: str | None, role: str) -> list[Record] | None:
        return load_records([uri], role=role, storage_options=options).records if uri else None

    return EvalFiles(
        domain=records(ev.eval_file, "evaluate.eval_file"),
        general=records(ev.general_file, "evaluate.general_file"),
        mc=load_mc_items(ev.mc_file, storage_options=options) if ev.mc_file else None,
        numeric=load_numeric_items(ev.numeric_file, storage_options=options) if ev.numeric_file else None,
        lm_eval=harness_texts(ev.lm_eval_include, ev.lm_eval_tasks) if ev.lm_eval_tasks else {},
    )


def item_texts(files: EvalFiles) -> dict[str, list[str]]:
    """The texts of the evaluation files' items by kind, as the contamination check reads them."""
    return {
        "domain": [r.text for r in files.domain or []],
        "general": [r.text for r in files.general or []],
        "mc": [mc_text(i) for i in files.mc or []],
        "numeric": [numeric_text(i) for i in files.numeric or []],
        "lm_eval": [t for texts in files.lm_eval.values() for t in texts],
    }


def holdout(
    cfg: FinescopeConfig,
    seeds: RecordSet,
    corpus: RecordSet,
    files: EvalFiles | None = None,
    *,
    evaluating: bool = False,
) -> Holdout:
    """The corpus ids kept out of curation: the evaluation split, and records overlapping an eval file's
    items.

    Args:
        evaluating: the run evaluates models, so it needs domain items (an eval file or a non-empty split).

    Raises:
        DataError: `evaluating` without eval file and with an empty split.
        DataError: every item of `evaluate.eval_file` overlaps the corpus (13-gram or near duplicate), so
            no domain item would be held out; names the file and its first line.
    """
    files = files or eval_files(cfg)
    ev = cfg.evaluate
    copies = {corpus.records[i].id for i in seed_copies(corpus, seeds)}
    split = evaluation_split(corpus.records, ev.split_fraction, ev.split_max, cfg.seed, exclude=copies)
    split_ids = {r.id for r in split}
    if evaluating and not split and files.domain is None:
        raise DataError(
            f"the evaluation split of the corpus is empty (evaluate.split_fraction={ev.split_fraction} of "
            f"{len(corpus)} records); raise evaluate.split_fraction or give evaluate.eval_file"
        )
    pool = [r for r in corpus.records if r.id not in split_ids]
    hits, by_kind = pool_duplicates_by_kind([r.text for r in pool], item_texts(files))
    duplicates = [pool[i].id for i in hits]
    if files.domain:
        against = check_contamination([r.text for r in files.domain], corpus.texts)
        if not against.kept:
            raise DataError(
                f"{files.domain[0].origin}: every item of evaluate.eval_file ({ev.eval_file}, "
                f"{len(files.domain)} items) overlaps the corpus ({NGRAM}-gram or near duplicate), so none "
                "is held out; give items the corpus does not contain"
            )
    return Holdout(split=sorted(split_ids), file_duplicates=sorted(duplicates), duplicates_by_kind=by_kind)


@dataclass
class EvalData:
    """What every model is evaluated on, after the contamination check, and how it was made."""

    domain: list[EvalItem]
    general: list[EvalItem]
    mc: list[dict[str, Any]] | None
    numeric: list[dict[str, Any]] | None
    info: dict[str, Any] = field(default_factory=dict)
    lm_eval_docs: dict[str, list[int]] = field(default_factory=dict)
    """lm-eval task -> the ids of its documents that passed the contamination check (checkable tasks only)."""

    def payload(self) -> dict[str, Any]:
        """What the evaluation stage reads (and its key hashes)."""
        out = {
            "domain": [i.text for i in self.domain],
            "chat": [[i.prompt, i.reference] for i in self.domain if i.prompt and i.reference],
            "general": [i.text for i in self.general],
            "mc": self.mc,
            "numeric": self.numeric,
        }
        if self.lm_eval_docs:  # only then: the payload (and key) of a run without lm-eval data is unchanged
            out["lm_eval_docs"] = self.lm_eval_docs
        return out

    def sha256(self) -> str:
        return hashlib.sha256(json.dumps(self.payload(), sort_keys=True, default=str).encode()).hexdigest()


def candidate_items(
    cfg: FinescopeConfig, seeds: RecordSet, corpus: RecordSet, held: Holdout, files: EvalFiles
) -> tuple[list[EvalItem], list[EvalItem], dict[str, Any]]:
    """Domain and general items before the contamination check, with the rules that chose them."""
    ev = cfg.evaluate
    split_ids = set(held.split)
    split = [r for r in corpus.records if r.id in split_ids]
    info: dict[str, Any] = {
        "split": {
            "fraction": ev.split_fraction,
            "records": len(split),
            **internal_duplicates([r.text for r in split]),
        },
        "eval_file_duplicates_removed_from_pool": len(held.file_duplicates),
        "pool_duplicates_by_kind": dict(held.duplicates_by_kind),
    }
    domain_ids: set[str] = set()
    if files.domain is not None:
        domain = [EvalItem.of(r) for r in files.domain]
        info["domain"] = {"source": "evaluate.eval_file", "rule": f"every item of {ev.eval_file}"}
    else:
        from finescope_core.sentence import sentence_embeddings

        device = "cuda" if cfg.device != "cpu" and torch.cuda.is_available() else "cpu"
        split_emb = sentence_embeddings([r.text for r in split], device=device)
        rows = nearest_to_centroid(
            split_emb, sentence_embeddings(seeds.texts, device=device), ev.domain_items
        )
        domain = [EvalItem.of(split[i]) for i in rows]
        domain_ids = {split[i].id for i in rows}
        info["domain"] = {"source": "evaluation split", "rule": DOMAIN_RULE.format(n=ev.domain_items)}
    if files.general is not None:
        general = [EvalItem.of(r) for r in files.general]
        info["general"] = {"source": "evaluate.general_file", "rule": f"every item of {ev.general_file}"}
    else:
        rest = [r for r in split if r.id not in domain_ids]
        general = [EvalItem.of(r) for r in general_sample(rest, ev.general_items, cfg.seed)]
        info["general"] = {"source": "evaluation split", "rule": GENERAL_RULE.format(n=ev.general_items)}
    return domain, general, info


def training_texts(
    ctx: RunContext,
    records: Sequence[Record],
    prune_texts: Sequence[str],
    distilled: StageManifest,
) -> list[str]:
    """Everything one variant learns from: its curated (or baseline) records, pruning texts and distilled
    rows."""
    rows = read_distilled(artifact_dir(ctx.store, distilled) / DISTILLED_FILE)
    return [
        *(r.text for r in records),
        *prune_texts,
        *(row_text(row) for row in rows),
    ]


def decontaminate(
    domain: list[EvalItem],
    general: list[EvalItem],
    training: Sequence[str],
    info: dict[str, Any],
    files: EvalFiles,
) -> EvalData:
    """Drop every item overlapping the training data; the counts and reasons go into `info`.

    Raises:
        DataError: no domain item is left.
    """
    out = dict(info)
    kept = {}
    for name, items in (("domain", domain), ("general", general)):
        found = check_contamination([i.text for i in items], training)
        kept[name] = [items[i] for i in found.kept]
        out[name] = {
            **out.get(name, {}),
            **found.summary(),
            "dropped_items": [
                {"id": items[i].id, "origin": items[i].origin} for i in found.ngram + found.near_duplicate
            ][:20],
        }
    questions: dict[str, list[dict[str, Any]] | None] = {}
    for name, rows, text in (("mc", files.mc, mc_text), ("numeric", files.numeric, numeric_text)):
        clean = None if rows is None else _decontaminate_questions(name, rows, text, training, out)
        questions[name] = clean
    out["contamination_rule"] = (
        "an item of any kind (domain, general, multiple-choice: question and choices, numeric: question and "
        f"answer, lm-eval document: its every string) is dropped when it shares a {NGRAM}-gram of normalised "
        f"words with, or is a MinHash near duplicate (Jaccard >= {NEAR_DUPLICATE}) of, any curated, pruning, "
        "distilled or tuning text of any variant"
    )
    if not kept["domain"]:
        raise DataError(
            f"no domain evaluation item is left after the contamination check ({len(domain)} checked); give "
            "evaluate.eval_file, or a larger evaluate.split_fraction"
        )
    docs = _decontaminate_documents(files.lm_eval, training, out)
    return EvalData(kept["domain"], kept["general"], questions["mc"], questions["numeric"], out, docs)


def _decontaminate_documents(
    tasks: dict[str, list[str]], training: Sequence[str], out: dict[str, Any]
) -> dict[str, list[int]]:
    """Task -> clean doc ids of each lm-eval task with local documents; counts go into `out["lm_eval"]`.

    Raises:
        DataError: every document of a task overlaps the training data.
    """
    if not tasks:
        return {}
    kept: dict[str, list[int]] = {}
    per_task: dict[str, dict[str, Any]] = {}
    for task, texts in tasks.items():
        found = check_contamination(texts, training)
        if not found.kept:
            raise DataError(
                f"every document of lm-eval task {task!r} ({len(texts)}) overlaps the training data (13-gram "
                "or near duplicate); give the task documents the corpus does not contain"
            )
        kept[task] = found.kept
        per_task[task] = {**found.summary(), "dropped_doc_ids": (found.ngram + found.near_duplicate)[:20]}
    counts = ("checked", "kept", "dropped_ngram", "dropped_near_duplicate")
    total = {k: sum(t[k] for t in per_task.values()) for k in counts}
    rule = f"the documents of {', '.join(tasks)}"
    out["lm_eval"] = {"source": "evaluate.lm_eval_include", "rule": rule, **total, "tasks": per_task}
    return kept


def _decontaminate_questions(
    name: str,
    rows: list[dict[str, Any]],
    text: Callable[[dict[str, Any]], str],
    training: Sequence[str],
    out: dict[str, Any],
) -> list[dict[str, Any]]:
    """The clean items of an MC / numeric file (`evaluate.<name>_file`); its counts and first dropped
    items go into `out[name]`."""
    source = f"evaluate.{name}_file"
    found = check_contamination([text(r) for r in rows], training)
    dropped = [{"index": i} for i in found.ngram + found.near_duplicate][:20]
    out[name] = {
        "source": source,
        "rule": f"every item of {source}",
        **found.summary(),
        "dropped_items": dropped,
    }
    return [rows[i] for i in found.kept]
