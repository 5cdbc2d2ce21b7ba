"""Tasks of the `data` and `models` stages: validated seeds and corpus (and the SAEs' general corpus) by
content hash, the model to use."""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

from prefect.cache_policies import NO_CACHE

from finescope_core.config import CurateConfig, FinescopeConfig, StorageConfig
from finescope_core.data import (
    PreparedCorpus,
    Record,
    RecordSet,
    check_sizes,
    deduplicate,
    load_records,
    seed_copies,
)
from finescope_core.formats import DataError
from finescope_core.io import read_jsonl, read_jsonl_rows, write_jsonl
from tasks.caching import RUN_RESULTS, StageManifest, artifact_dir, run_cached
from tasks.context import RunContext, fsspec_options
from tasks.keymodels import StageKey, StageKeyModel
from tasks.models import ModelRef, model_ref
from tasks.planning import labelled
from tasks.registry import Stage, declare, stage_task
from tasks.retries import IO_RETRIES

RECORDS_FILE = "records.jsonl"
"""The one file of a `corpus`, `seeds` or `sae-corpus` artifact: one validated record a line."""


def read_inputs(cfg: FinescopeConfig) -> tuple[RecordSet, PreparedCorpus]:
    """Load and validate seeds and corpus; no model work, nothing written.

    Read once per run: the flow's preflight reads them, and every later call of the run (the curate
    subflow's preflight, `inputs_task`, the evaluation split) gets the same objects back while the
    files are unchanged (`_stamp`: local files by size and mtime; remote ones are read again).
    """
    return read_files(cfg.seeds, cfg.corpus, cfg.curate.final_size, cfg.storage)


def read_files(
    seeds: list[str], corpus: list[str], final_size: int, storage: StorageConfig
) -> tuple[RecordSet, PreparedCorpus]:
    """`read_inputs` of the files themselves."""
    stamp = _stamp([*seeds, *corpus])
    return _read_inputs(tuple(seeds), tuple(corpus), final_size, storage.model_dump_json(), stamp)


def _stamp(uris: list[str]) -> tuple[Any, ...]:
    out: list[Any] = []
    for uri in uris:
        path = Path(uri).expanduser()
        if "://" in uri or not path.exists():
            return (object(),)  # never equal: read again
        files = sorted(path.rglob("*")) if path.is_dir() else [path]
        out += [(str(f), f.stat().st_size, f.stat().st_mtime_ns) for f in files if f.is_file()]
    return tuple(out)


def _options(storage: str) -> dict[str, Any]:
    return fsspec_options(StorageConfig.model_validate_json(storage))


@functools.lru_cache(maxsize=4)
def _read_inputs(
    seed_uris: tuple[str, ...], corpus_uris: tuple[str, ...], final_size: int, storage: str, stamp: Any
) -> tuple[RecordSet, PreparedCorpus]:
    options = _options(storage)
    seeds = load_records(list(seed_uris), role="seeds", storage_options=options)
    prepared = deduplicate(load_records(list(corpus_uris), role="corpus", storage_options=options))
    usable = len(prepared.corpus) - len(seed_copies(prepared.corpus, seeds))
    check_sizes(usable, needed=final_size, what="curate.final_size")
    return seeds, prepared


SAE_CORPUS_FIELD = "curate.sae_corpus"


def read_sae_corpus(cfg: FinescopeConfig) -> PreparedCorpus | None:
    """The SAEs' general corpus of `cfg` (`read_sae_files`)."""
    return read_sae_files(cfg.curate, cfg.storage)


def read_sae_files(section: CurateConfig, storage: StorageConfig) -> PreparedCorpus | None:
    """Load and validate the general corpus the SAEs train on (`curate.sae_corpus`), de-duplicated like the
    corpus; no model work, nothing written.

    Returns:
        None when the SAEs train on the corpus being curated: no `sae_corpus`, or a method without SAEs.

    Raises:
        DataError: what the corpus is refused for (a missing, empty or malformed file, a bad record: naming
            file and line), prefixed with the field; fewer than 2 distinct records (an SAE needs 2 rows).
    """
    uris = section.sae_corpus
    if section.method != "sae" or uris is None:
        return None
    try:
        options = _options(storage.model_dump_json())
        prepared = deduplicate(load_records(uris, role="sae_corpus", storage_options=options))
    except DataError as e:
        raise DataError(f"{SAE_CORPUS_FIELD}: {e}") from None
    if len(prepared.corpus) < 2:
        raise DataError(
            f"{SAE_CORPUS_FIELD}: {', '.join(uris)} holds {len(prepared.corpus)} distinct record(s); the "
            f"SAEs train on "
            "at least 2 (a general corpus of thousands is what they are for): add records or unset the field"
        )
    return prepared


def _write_records(path: Path, records: list[Record]) -> None:
    # No origin paths: the artifact's hash (and every key downstream of it) must not change when the
    # same data moves, e.g. from a local directory to s3://.
    write_jsonl(({"id": r.id, "text": r.text, "fields": r.fields} for r in records), path)


def read_records(path: Path) -> RecordSet:
    rows = read_jsonl(path)
    return RecordSet(
        [
            Record(id=r["id"], text=r["text"], fields=r["fields"], origin=f"{path.name}:{i}")
            for i, r in enumerate(rows, 1)
        ]
    )


class CorpusKey(StageKeyModel):
    """`corpus`: the validated, de-duplicated records, keyed by their content (`RecordSet.sha256`) alone."""

    STAGE = "corpus"
    VERSION = "1"
    CODE = ("finescope_core.data", "finescope_core.io")


class SeedsKey(CorpusKey):
    """`seeds`: the validated seed records, keyed by their content alone."""

    STAGE = "seeds"


class SaeCorpusKey(CorpusKey):
    """`sae-corpus`: the validated, de-duplicated general corpus the SAEs train on (`curate.sae_corpus`),
    keyed
    by its content alone.

    The same records as a `corpus` artifact give the same artifact hash, so every key downstream of
    either (saliency, activations, SAEs) is shared.
    """

    STAGE = "sae-corpus"


RECORD_KEYS: dict[str, type[CorpusKey]] = {m.STAGE: m for m in (CorpusKey, SeedsKey, SaeCorpusKey)}
"""The key model of each record stage, by stage name."""


def records_key(stage: str, records_sha: str) -> StageKey:
    """The key of the `corpus`, `seeds` or `sae-corpus` stage."""
    return RECORD_KEYS[stage](inputs={"records": records_sha}).spec()


def _store_records(ctx: RunContext, stage: str, records: RecordSet, info: dict[str, Any]) -> StageManifest:
    def build(work: Path) -> dict[str, Any]:
        _write_records(work / RECORDS_FILE, records.records)
        return {"records": len(records), **info}

    return run_cached(ctx.store, records_key(stage, records.sha256), build)


CORPUS = declare(Stage("corpus", CorpusKey, files=(RECORDS_FILE,)))
SEEDS = declare(Stage("seeds", SeedsKey, files=(RECORDS_FILE,)))
SAE_CORPUS = declare(Stage("sae-corpus", SaeCorpusKey, files=(RECORDS_FILE,)))


@stage_task(name="inputs", cache_policy=NO_CACHE, persist_result=False, **IO_RETRIES)
def inputs_task(
    ctx: RunContext, seeds: list[str], corpus: list[str], final_size: int
) -> tuple[RecordSet, PreparedCorpus]:
    """`read_inputs` as a task, so transient read errors of remote inputs are retried."""
    return read_files(seeds, corpus, final_size, ctx.storage)


@stage_task(name="data", cache_policy=RUN_RESULTS, **IO_RETRIES)
def data_task(
    ctx: RunContext, inputs: tuple[RecordSet, PreparedCorpus]
) -> tuple[StageManifest, StageManifest]:
    """Validated (corpus, seeds) from `inputs_task`, each stored by content hash; the corpus de-duplicated.

    They are separate artifacts so that everything computed from the corpus alone (saliency, corpus
    activations, SAEs) is reused when only the seeds change.
    """
    seeds, prepared = inputs
    with labelled("corpus"):
        corpus = _store_records(
            ctx, "corpus", prepared.corpus, {"dropped_duplicates": prepared.dropped_duplicates}
        )
    with labelled("seeds"):
        return corpus, _store_records(ctx, "seeds", seeds, {})


@stage_task(name="sae-inputs", cache_policy=NO_CACHE, persist_result=False, **IO_RETRIES)
def sae_inputs_task(ctx: RunContext, section: CurateConfig) -> PreparedCorpus | None:
    """`read_sae_corpus` as a task, so transient read errors of remote inputs are retried."""
    return read_sae_files(section, ctx.storage)


@stage_task(SAE_CORPUS, cache_policy=RUN_RESULTS, **IO_RETRIES)
def sae_data_task(ctx: RunContext, prepared: PreparedCorpus) -> StageManifest:
    """The SAEs' general corpus from `sae_inputs_task`, stored by content hash (the `sae-corpus` stage).

    Its own artifact, apart from the corpus being curated: the SAEs (and the saliency and activations
    they train on) then depend on it alone, so one SAE set serves every corpus and seed set.
    """
    return _store_records(
        ctx, "sae-corpus", prepared.corpus, {"dropped_duplicates": prepared.dropped_duplicates}
    )


def load_data(ctx: RunContext, records: StageManifest) -> RecordSet:
    """The records of a committed corpus/seeds artifact."""
    return read_records(artifact_dir(ctx.store, records) / RECORDS_FILE)


def load_rows(ctx: RunContext, records: StageManifest, start: int, stop: int) -> RecordSet:
    """Records [start, stop) of a committed corpus/seeds artifact, without parsing the others (one shard's
    share)."""
    path = artifact_dir(ctx.store, records) / RECORDS_FILE
    rows = read_jsonl_rows(path, start, stop)
    return RecordSet(
        [
            Record(id=r["id"], text=r["text"], fields=r["fields"], origin=f"{path.name}:{i}")
            for i, r in enumerate(rows, start + 1)
        ]
    )


def record_count(ctx: RunContext, records: StageManifest) -> int:
    """Records in a committed corpus/seeds artifact (from its summary; counted when it has none)."""
    count = records.info.get("records")
    return int(count) if count is not None else len(load_data(ctx, records))


@stage_task(label="{label}", name="model", cache_policy=NO_CACHE, persist_result=False, **IO_RETRIES)
def model_task(ctx: RunContext, spec: str, label: str = "models") -> ModelRef:
    """Resolve the model (converting the bundled default once into the store). Never a stored Prefect
    result: a retry hashes the model's files again (cheap: large files' digests are cached by stat)."""
    return model_ref(spec, ctx.store)
