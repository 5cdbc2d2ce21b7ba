"""What keys are made of beyond config values: the precision work runs in, models, task inputs.

Each is resolved where it matters: the precision in the process that runs the model (a Dask worker
with a GPU, not the driver), a model by the content of every file it has (or a hub id by its commit),
a task's inputs by their content hashes.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path
from typing import Any, Protocol

import torch
from pydantic import BaseModel

from finescope_core.config import ConfigError
from finescope_core.identity import HubRevisionError, directory_digest, hub_revision
from finescope_core.model import resolve_dtype


class Precision(BaseModel):
    """The device kind and dtype a model stage's work runs in: part of its key."""

    device: str
    """`cpu`, `cuda` or `mps`: the kind, not the index (any GPU of a kind gives the same artifact)."""
    dtype: str
    """The torch dtype name, `auto` resolved for the device."""


class RunsModels(Protocol):
    """What `work_precision` reads: a `FinescopeConfig` or a `tasks.context.RunContext`."""

    @property
    def device(self) -> str: ...

    @property
    def model_dtype(self) -> str: ...


def work_precision(cfg: RunsModels) -> Precision:
    """The precision of model work in this process: `device` and `model_dtype` resolved here.

    Call it where the work runs (inside the task), never on a driver that only schedules it: a CPU
    driver resolves `auto` to float32 where a GPU worker loads bfloat16. It never raises for a missing
    GPU: a `cuda` run on a machine without one fails when it loads the model.
    """
    on_cuda = cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available())
    device = torch.device("cuda" if on_cuda else "cpu")
    return Precision(
        device=device.type, dtype=str(resolve_dtype(cfg.model_dtype, device)).removeprefix("torch.")
    )


def shared_precision(infos: list[dict[str, Any]], what: str) -> Precision:
    """The one precision that parts of a stage (e.g. activation shards) ran in, from their manifests' info.

    Raises:
        ValueError: the parts ran in different precisions (workers of different kinds), or do not say.
    """
    found = {json.dumps(i.get("precision"), sort_keys=True) for i in infos}
    if len(found) != 1 or None in (i.get("precision") for i in infos):
        raise ValueError(
            f"{what}: its parts ran in different precisions or do not record one ({sorted(found)}); "
            "give every "
            "GPU worker the same kind of device, or set model_dtype and device explicitly"
        )
    return Precision.model_validate(infos[0]["precision"])


def model_digest(spec: str) -> str:
    """Content hash of a model that is not the bundled default.

    A local directory: every file in it (weights, config, tokenizer, chat template...). A hub id: its
    commit (`hub_revision`), so a new upload to the same id is a new model.

    Raises:
        ConfigError: a hub id that can be resolved neither online nor from the local HF cache.
    """
    path = Path(spec).expanduser()
    if path.is_dir():
        return directory_digest(path)
    try:
        revision = hub_revision(spec)
    except HubRevisionError as e:
        raise ConfigError(str(e)) from None
    return hashlib.sha256(f"hub:{spec}@{revision}".encode()).hexdigest()


def model_identity(spec: str) -> dict[str, str]:
    """What run.json records of a model: a local directory's content hash, or a hub id's commit."""
    if Path(spec).expanduser().is_dir():
        return {"model": spec, "sha256": model_digest(spec)}
    try:
        return {"model": spec, "revision": hub_revision(spec)}
    except HubRevisionError as e:
        raise ConfigError(str(e)) from None


def inputs_digest(inputs: dict[str, Any]) -> str:
    """Hash of a task's inputs, each by its content key where it has one (a manifest's or a record set's
    sha256), else by its value; for Prefect's result cache key."""
    text = json.dumps(
        {name: _identity(value) for name, value in sorted(inputs.items())}, sort_keys=True, default=str
    )
    return hashlib.sha256(text.encode()).hexdigest()


def _identity(value: Any) -> Any:
    sha = getattr(value, "sha256", None)
    if isinstance(sha, str):
        return {"type": type(value).__name__, "sha256": sha}
    if isinstance(value, BaseModel):
        return value.model_dump(mode="json")
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _identity(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, list | tuple):
        return [_identity(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _identity(v) for k, v in value.items()}
    return value
