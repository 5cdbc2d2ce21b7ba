"""Models in a task: references by content, the process's one shared copy, private copies."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel

from finescope_core.code_identity import code_digest
from finescope_core.identity import file_digest
from finescope_core.memory import release_memory
from finescope_core.model import (
    DEFAULT_MODEL,
    DEFAULT_MODEL_NAME,
    convert_gguf,
    load_model,
    locate_default_gguf,
)
from finescope_core.store import (
    ArtifactStore,
)
from tasks.caching import PendingManifest, artifact_dir, run_cached
from tasks.identity import model_digest
from tasks.keymodels import StageKey
from tasks.registry import Stage, declare


class ModelRef(BaseModel):
    """A model a stage can load: a local HF directory (or hub id) and a content hash."""

    path: str
    sha256: str


class PendingModel(ModelRef):
    """In a dry run: a model the run would convert first (the bundled default, not yet in the store)."""

    pending: str


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
        if isinstance(manifest, PendingManifest):  # a dry run: converted by the run, not by the plan
            return PendingModel(path=DEFAULT_MODEL, sha256="", pending=manifest.pending)
        return ModelRef(path=str(artifact_dir(store, manifest) / DEFAULT_MODEL_NAME), sha256=manifest.sha256)
    return ModelRef(path=_model_path(spec), sha256=model_digest(spec))


MODELS = declare(Stage("models", None, core=convert_gguf, files=(DEFAULT_MODEL_NAME,)))
"""The bundled default model, converted once from its GGUF into a plain Hugging Face directory."""


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
