"""What every task shares: the stage manifest, the cached-stage runner, model loading, progress."""

from __future__ import annotations

import contextlib
import functools
import logging
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Self

import torch
from prefect import get_run_logger
from prefect.artifacts import create_progress_artifact, update_progress_artifact
from prefect.cache_policies import CachePolicy
from prefect.exceptions import MissingContextError
from prefect.settings import get_current_settings
from pydantic import BaseModel, ConfigDict

from finescope_core import __version__
from finescope_core.code_identity import code_digest
from finescope_core.config import ConfigError, FinescopeConfig, slug
from finescope_core.identity import file_digest
from finescope_core.memory import StageOutOfMemory, build_releasing, is_out_of_memory, release_memory
from finescope_core.model import (
    DEFAULT_MODEL,
    DEFAULT_MODEL_NAME,
    convert_gguf,
    load_model,
    locate_default_gguf,
)
from finescope_core.store import (
    Artifact,
    ArtifactStore,
    DamagedArtifact,
    StoreError,
    cache_key,
    is_transient,
)
from tasks.identity import Precision, inputs_digest, model_digest, work_precision

CODE_VERSION = __version__


def _retry_transient(task: Any, task_run: Any, state: Any) -> bool:
    """Retry I/O trouble, never bad input or bad settings (ValueError), a broken store (StoreError) nor
    an out-of-memory error (the same settings on the same device fail again)."""
    try:
        state.result()
    except (ValueError, StoreError, StageOutOfMemory):
        return False
    except Exception as e:
        return not is_out_of_memory(e)
    return False


def _retry_storage_outage(task: Any, task_run: Any, state: Any) -> bool:
    """Retry a compute stage only when the store stayed unreachable through the store's own retries."""
    try:
        state.result()
    except Exception as e:
        return is_transient(e) and not is_out_of_memory(e)
    return False


IO_RETRIES: dict[str, Any] = dict(
    retries=3, retry_delay_seconds=[2, 10, 30], retry_condition_fn=_retry_transient
)
# Compute stages: a model or data error must fail at once, but a longer storage outage is worth waiting out.
STORE_RETRIES: dict[str, Any] = dict(
    retries=2, retry_delay_seconds=[30, 60], retry_condition_fn=_retry_storage_outage
)
GPU_TAGS = ["finescope-gpu"]


@dataclass
class RunResults(CachePolicy):
    """Prefect cache policy of every stage task: its result is persisted only when the run asks for it.

    The stage cache proper is `run_cached` (content-addressed, in the artifact store). This policy
    gives Prefect a storage key per task run, so that with `orchestration.persist_results` its result
    is written to the run's result storage (JSON on this machine, see `flows.runtime`) and a retried flow run reads it
    back instead of re-running the task. Without it, no key: nothing is written.

    The key holds the task's inputs by content (`inputs_digest`: a manifest by its artifact's hash), so
    a retry after an input changed upstream computes the task again instead of returning the first
    attempt's manifest. Tasks that read files or models named by the config (`inputs`, `model`) use no
    cache: a retry re-reads them.
    """

    def compute_key(
        self, task_ctx: Any, inputs: dict[str, Any], flow_parameters: dict[str, Any], **kwargs: Any
    ) -> str | None:
        if task_ctx is None or get_current_settings().tasks.default_persist_result is not True:
            return None
        run = task_ctx.task_run
        return f"{run.flow_run_id or run.id}-{run.task_key}-{run.dynamic_key}-{inputs_digest(inputs)}"


RUN_RESULTS = RunResults()


@dataclass(frozen=True)
class StageKey:
    """What a stage's cache key is made of. Each task builds its own with a `*_key` function, and
    `finescope store plan` calls the same functions, so the plan cannot drift from what runs."""

    stage: str
    version: str
    config: Any
    inputs: dict[str, str]

    @property
    def key(self) -> str:
        return cache_key(self.stage, self.version, self.config, self.inputs)


class StageKeyModel(BaseModel):
    """A stage's cache key, typed: the config fields the stage reads, derived settings, its inputs' hashes.

    Subclasses name their stage and `VERSION` (bump it when the stage's output changes for the same
    key), and map each config-derived field to the dotted config field it copies (`CONFIG`). Fields
    computed from config fields (the resolved `layers`, a shard's rows) name their sources in
    `DERIVED`. The key is a hash of the full `model_dump()`, so a field cannot be left out of it by
    accident; `tests/flows/test_keys.py` walks every config field against `reads()`.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    STAGE: ClassVar[str]
    VERSION: ClassVar[str]
    CONFIG: ClassVar[dict[str, str]] = {}
    """Key field -> the dotted config field it copies."""
    DERIVED: ClassVar[tuple[str, ...]] = ()
    """Dotted config fields that reach the key through a derived field."""

    inputs: dict[str, str]
    """Content hashes of the stage's inputs (artifacts, models, data)."""

    @classmethod
    def reads(cls) -> set[str]:
        """Every config field that changes this stage's key."""
        return set(cls.CONFIG.values()) | set(cls.DERIVED)

    @classmethod
    def of(cls, cfg: FinescopeConfig, inputs: dict[str, str], **derived: Any) -> Self:
        """The key of this stage for `cfg`, its inputs and its derived settings."""
        fields = {name: config_value(cfg, dotted) for name, dotted in cls.CONFIG.items()}
        return cls(**fields, **derived, inputs=inputs)

    CODE: ClassVar[tuple[str, ...]] = ()
    """Modules that implement the stage; with the key model's own module and every package module they
    import, their source is hashed into the key (`code_digest`), so changed code never reuses an artifact."""

    @classmethod
    def code(cls) -> str:
        """Hash of the source of the modules that implement this stage."""
        return code_digest((cls.__module__, *cls.CODE))

    def spec(self) -> StageKey:
        inputs = {**self.inputs, "code": self.code()}
        return StageKey(self.STAGE, self.VERSION, self.model_dump(mode="json", exclude={"inputs"}), inputs)


class ModelStageKey(StageKeyModel):
    """The key of a stage that runs a model: it also holds the device kind and dtype the work ran in
    (`tasks.identity.Precision`), so a bf16 or GPU artifact is never served to a float32 CPU run.

    The precision is resolved where the work runs (`work_precision`, inside the task); a stage that
    gathers parts run elsewhere passes theirs. Subclasses list `device` and `model_dtype` in `DERIVED`.
    """

    DERIVED: ClassVar[tuple[str, ...]] = ("device", "model_dtype")

    device: str
    dtype: str

    @classmethod
    def of(
        cls, cfg: FinescopeConfig, inputs: dict[str, str], precision: Precision | None = None, **derived: Any
    ) -> Self:
        ran = precision or work_precision(cfg)
        return super().of(cfg, inputs, **{"device": ran.device, "dtype": ran.dtype, **derived})


def compute_dtype(cfg: FinescopeConfig) -> str:
    """The dtype name model work in this process runs in (`work_precision`'s dtype)."""
    return work_precision(cfg).dtype


def config_value(cfg: BaseModel, dotted: str) -> Any:
    """The value of a dotted config field (a section comes back as a plain dict)."""
    value: Any = cfg
    for part in dotted.split("."):
        value = getattr(value, part)
    return value.model_dump(mode="json") if isinstance(value, BaseModel) else value


class StageManifest(BaseModel):
    """What a task returns: where its artifact is and how to recognise it. Never tensors or models."""

    stage: str
    key: str
    uri: str
    sha256: str
    cached: bool
    seconds: float
    info: dict[str, Any] = {}


def code_version() -> str:
    """Package version plus the git commit when run from a checkout."""
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=Path(__file__).parent,
            capture_output=True,
            text=True,
            timeout=5,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        sha = ""
    return f"{CODE_VERSION}+{sha}" if sha else CODE_VERSION


def run_name(cfg: FinescopeConfig) -> str:
    """The run's name: `config.name`, else the deployment's name (a deployment run), else `finescope`.

    It namespaces the Prefect artifact keys, so two deployments for two domains keep their own.
    """
    if cfg.name:
        return cfg.name
    from prefect.runtime import deployment

    return slug(deployment.name or "") or "finescope"


def artifact_key(flow: str, cfg: FinescopeConfig, what: str) -> str:
    """Prefect artifact key `<flow>-<name>-<what>` (lowercase letters, digits and dashes only)."""
    return slug(f"{flow}-{run_name(cfg)}-{what}") or what


def logger() -> logging.Logger | logging.LoggerAdapter:
    try:
        return get_run_logger()
    except MissingContextError:
        return logging.getLogger("finescope")


def open_store(cfg: FinescopeConfig) -> ArtifactStore:
    return ArtifactStore(cfg.store, storage_options(cfg))


def storage_options(cfg: FinescopeConfig) -> dict[str, Any]:
    """fsspec options for the store and remote inputs, with credentials from `storage.secret_block`."""
    block = cfg.storage.secret_block
    return cfg.storage.fsspec_options(_block_credentials(block) if block else None)


@functools.lru_cache(maxsize=8)
def _block_credentials(name: str) -> dict[str, str]:
    """`{"key", "secret"}` from the Prefect Secret block `name`, read once per process."""
    from prefect.blocks.system import Secret

    try:
        value = Secret.load(name).get()
    except ValueError as e:
        raise ConfigError(
            f"storage.secret_block={name!r}: no such Prefect Secret block ({e}); create it with "
            f"`Secret(value={{'key': ..., 'secret': ...}}).save({name!r})` or unset storage.secret_block"
        ) from None
    if not (
        isinstance(value, dict) and isinstance(value.get("key"), str) and isinstance(value.get("secret"), str)
    ):
        raise ConfigError(
            f"storage.secret_block={name!r}: the block's value must be a JSON object with string fields "
            "'key' (access key id) and 'secret' (secret access key)"
        )
    return {"key": value["key"], "secret": value["secret"]}


def run_cached(
    store: ArtifactStore, spec: StageKey, build: Callable[[Path], dict[str, Any]], *, resume: bool = False
) -> StageManifest:
    """Return the stored artifact for this stage key or build, commit and return it.

    The key is content-addressed, so a re-run with the same inputs recomputes nothing. A stored
    artifact is checked against its marker before reuse; a deleted or damaged one is a miss, rebuilt
    with a warning. With `resume`, files a killed run left in the stage's work dir are kept for
    `build` to continue from. A run that finds another building the same key waits for it and then
    reuses its artifact.
    """
    stage, key = spec.stage, spec.key
    found = _reusable(store, spec, warn=True)
    if found is not None:
        logger().info("%s: cached (%s)", stage, found.uri)
        return _manifest(found, cached=True, seconds=0.0)
    start = time.perf_counter()
    # The work dir outlives a killed run, so a resumable stage (teacher generation) picks up where it stopped.
    with store.work_dir(stage, key, resume=resume) as work:
        found = _reusable(store, spec, warn=False)  # committed by a run this one waited for
        if found is not None:
            logger().info("%s: cached, committed by a concurrent run (%s)", stage, found.uri)
            return _manifest(found, cached=True, seconds=0.0)
        info = build_releasing(stage, build, work)
        seconds = time.perf_counter() - start
        record = {
            "version": spec.version,
            "code_version": CODE_VERSION,
            "config": spec.config,
            "inputs": spec.inputs,
            "info": info,
            "seconds": seconds,
        }
        artifact = store.commit(work, stage, key, record)
    logger().info("%s: done in %.1fs (%s)", stage, seconds, artifact.uri)
    return _manifest(artifact, cached=False, seconds=seconds)


def _reusable(store: ArtifactStore, spec: StageKey, *, warn: bool) -> Artifact | None:
    """The committed artifact of `spec` if its files are as recorded; a damaged one is a miss."""
    found = store.lookup(spec.stage, spec.key)
    if found is None:
        return None
    problems = store.verify(found)
    if not problems:
        return found
    if warn:
        logger().warning("%s: %s; recomputing it", spec.stage, store.damage_message(found, problems))
    return None


def lookup_stage(store: ArtifactStore, spec: StageKey) -> StageManifest | None:
    """The committed artifact `run_cached` would return for this key, or None; builds nothing."""
    found = _reusable(store, spec, warn=False)
    return None if found is None else _manifest(found, cached=True, seconds=0.0)


def _manifest(artifact: Artifact, *, cached: bool, seconds: float) -> StageManifest:
    return StageManifest(
        stage=artifact.stage,
        key=artifact.key,
        uri=artifact.uri,
        sha256=artifact.sha256,
        cached=cached,
        seconds=artifact.manifest.get("seconds", seconds) if cached else seconds,
        info=artifact.manifest.get("info", {}),
    )


def artifact_dir(store: ArtifactStore, manifest: StageManifest) -> Path:
    """A local directory with the files of a committed stage (downloaded when the store is remote),
    checked against its marker: a damaged artifact raises `DamagedArtifact`, never reaches a caller."""
    found = store.lookup(manifest.stage, manifest.key)
    if found is None:
        raise FileNotFoundError(
            f"{manifest.uri} disappeared from the store during the run; re-run to rebuild it"
        )
    if found.sha256 != manifest.sha256:  # what was read is not what the keys below were computed from
        raise DamagedArtifact(
            f"{manifest.uri} was replaced by different content during the run; re-run to use it"
        )
    return store.local_path(found)


class ModelRef(BaseModel):
    """A model a stage can load: a local HF directory (or hub id) and a content hash."""

    path: str
    sha256: str


def model_ref(spec: str, store: ArtifactStore) -> ModelRef:
    """Resolve a model spec (`default`, an HF directory, a hub id) to a loadable path and a content hash.

    The bundled default is converted once and kept in the store; a local directory is hashed by the
    content of its config and weight files, so editing it invalidates what was computed from it.
    """
    if spec == DEFAULT_MODEL:
        gguf = locate_default_gguf()

        def build(work: Path) -> dict[str, Any]:
            convert_gguf(gguf, work / DEFAULT_MODEL_NAME)
            return {"source": gguf.name}

        manifest = run_cached(store, default_model_key(gguf), build)
        return ModelRef(path=str(artifact_dir(store, manifest) / DEFAULT_MODEL_NAME), sha256=manifest.sha256)
    return ModelRef(path=_model_path(spec), sha256=model_digest(spec))


def default_model_key(gguf: Path) -> StageKey:
    """The `models` stage: the bundled GGUF converted once into a plain HF directory (`convert_gguf`)."""
    inputs = {"gguf": _file_digest(str(gguf)), "code": code_digest(["finescope_core.model"])}
    return StageKey("models", "1", {"gguf": gguf.name}, inputs)


def _model_path(spec: str) -> str:
    path = Path(spec).expanduser()
    return str(path) if path.is_dir() else spec


def _file_digest(path: str) -> str:
    """A file's sha256, cached per process by (path, size, mtime): a long-lived worker sees a changed file."""
    return file_digest(Path(path))


_SHARED: dict[tuple[Any, ...], tuple[Any, Any]] = {}
"""The process's one shared model (`cached_model`), by (path, device, dtype, the files' stamp)."""
_SHARED_LOCK = threading.RLock()


def cached_model(path: str, device: str, dtype: str = "float32") -> tuple[Any, Any]:
    """Load a model once per process; stages of one flow run share it (read-only use only).

    At most one model is held: loading another first evicts the one held, so two never coexist.
    `dtype` is a `model_dtype` name (`auto` resolved for the device). The copy is keyed by the model's
    files' (name, size, mtime) too, so a long-lived worker loads a model again after its files changed."""
    key = (path, device, dtype, _files_stamp(path))
    with _SHARED_LOCK:
        held = _SHARED.get(key)
        if held is None:
            evict_shared_model()
            held = _SHARED[key] = load_model(path, device=device, dtype=dtype)
        return held


def evict_shared_model() -> None:
    """Drop the shared model (a task still using it keeps its own reference) and give its memory back."""
    with _SHARED_LOCK:
        _SHARED.clear()
    release_memory()


def private_model(
    path: str, device: str, dtype: str = "float32", device_map: str | None = None
) -> tuple[Any, Any]:
    """A stage's own copy of a model (pruning changes it, training trains it), loaded with the shared
    copy evicted first, so the process holds one copy of the base model, not two. `run_cached` gives
    its memory back when the stage's build returns."""
    evict_shared_model()
    return load_model(path, device=device, dtype=dtype, device_map=device_map)


def _files_stamp(path: str) -> tuple[tuple[str, int, int], ...]:
    """(name, size, mtime) of every file of a local model directory; () for a hub id."""
    root = Path(path)
    if not root.is_dir():
        return ()
    files = sorted(p for p in root.rglob("*") if p.is_file())
    return tuple((p.relative_to(root).as_posix(), (st := p.stat()).st_size, st.st_mtime_ns) for p in files)


_MODEL_LOCKS: dict[tuple[str, str], threading.Lock] = {}
_LOCKS_LOCK = threading.Lock()


def pin_worker_gpu() -> None:
    """On a worker of a local per-GPU cluster (workers named 0..n-1, every GPU visible), use GPU `name`.

    A worker started with its own `CUDA_VISIBLE_DEVICES` sees one device and needs nothing.
    """
    if torch.cuda.device_count() < 2:
        return
    try:
        from distributed import get_worker

        name = str(get_worker().name)
    except (ImportError, ValueError):  # not inside a Dask worker
        return
    if name.isdigit():
        torch.cuda.set_device(int(name) % torch.cuda.device_count())


@contextlib.contextmanager
def using_model(path: str, device: str, dtype: str = "float32") -> Iterator[tuple[Any, Any]]:
    """The process's shared copy of a model, held by one task at a time.

    Stages attach forward hooks to the shared modules, so two threads of one process must not run it
    at once; parallel embedding comes from worker processes (Dask, Ray), each with its own copy.
    """
    pin_worker_gpu()
    with _LOCKS_LOCK:
        lock = _MODEL_LOCKS.setdefault((path, device), threading.Lock())
    with lock:
        yield cached_model(path, device, dtype)


class Progress:
    """Per-batch progress, shown in the terminal (a log line every ~10%) and in Prefect (a progress artifact)."""

    MIN_UPDATE_SECONDS = 2.0

    def __init__(self, what: str):
        self.what = what
        self.logged_decile = -1
        self.shown_pct = -1
        self.shown_at = float("-inf")
        self.start = time.perf_counter()
        try:
            self.artifact_id = create_progress_artifact(0.0, description=f"{what}: 0 %")
        except Exception:  # no Prefect run context (a plain function call): terminal only
            self.artifact_id = None

    def __call__(self, done: int, total: int, /, **info: Any) -> None:
        """The `finescope_core.progress.Progress` protocol; `info` (loss, metric...) joins the log line."""
        if total <= 0:  # size unknown up front: no percentage to show
            return
        pct = min(100, int(100 * done / total))
        now = time.perf_counter()
        # Each update is an API call: at most one per MIN_UPDATE_SECONDS, so short batches stay cheap.
        if done >= total or (pct >= self.shown_pct + 2 and now - self.shown_at >= self.MIN_UPDATE_SECONDS):
            self.shown_at = now
            self._show(pct, done, total)
        if pct // 10 > self.logged_decile or done >= total:
            self.logged_decile = pct // 10
            detail = _short(f" {info}") if info else ""
            elapsed = time.perf_counter() - self.start
            logger().info("%s: %d/%d (%d%%, %.0fs)%s", self.what, done, total, pct, elapsed, detail)

    def _show(self, pct: int, done: int, total: int) -> None:
        self.shown_pct = pct
        if self.artifact_id is None:
            return
        try:
            # The value in the description too: the UI's artifact list shows the description, not the bar.
            shown = f"{self.what}: {pct} % ({done}/{total})"
            update_progress_artifact(self.artifact_id, float(pct), description=shown)
        except Exception:  # the UI is a convenience; never fail a stage over it
            self.artifact_id = None


def _short(text: str, limit: int = 160) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."
