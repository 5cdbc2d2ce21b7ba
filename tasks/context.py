"""The run context every task receives beside its config section: the store (opened once per process),
where model work runs, the seed, the run's name; and logging."""

from __future__ import annotations

import functools
import logging
from types import SimpleNamespace
from typing import Any

from prefect import get_run_logger
from prefect.exceptions import MissingContextError
from pydantic import BaseModel, ConfigDict

from finescope_core.config import ConfigError, FinescopeConfig, StorageConfig, slug
from finescope_core.stage import StageContext
from finescope_core.store import ArtifactStore
from tasks.identity import Precision, work_precision


class RunContext(BaseModel):
    """The run-wide settings a task needs, and nothing of the stages' own sections.

    Small and JSON-able, so it travels to Dask and Ray workers as a task parameter; the store it
    names is opened once per process and store (`store`). Key models read `seed`, `device` and
    `model_dtype` from it (`settings`), a stage's own fields from its section.
    """

    model_config = ConfigDict(frozen=True)

    store_uri: str
    storage: StorageConfig
    model: str
    device: str
    model_dtype: str
    seed: int
    memory_budget: float | None = None
    name: str | None = None

    @classmethod
    def of(cls, cfg: FinescopeConfig) -> RunContext:
        return cls(
            store_uri=cfg.store,
            storage=cfg.storage,
            model=cfg.model,
            device=cfg.device,
            model_dtype=cfg.model_dtype,
            seed=cfg.seed,
            memory_budget=cfg.memory_budget,
            name=cfg.name,
        )

    @property
    def store(self) -> ArtifactStore:
        return _opened(self.store_uri, self.storage.model_dump_json())

    def storage_options(self) -> dict[str, Any]:
        """fsspec options for the store and remote inputs, with credentials from `storage.secret_block`."""
        return fsspec_options(self.storage)

    def precision(self) -> Precision:
        """Where model work runs in this process (`work_precision`): call it where the work runs."""
        return work_precision(self)

    def settings(self, **sections: Any) -> SimpleNamespace:
        """What a key model reads its dotted config fields from: these sections and the run's own fields."""
        return SimpleNamespace(
            seed=self.seed, device=self.device, model_dtype=self.model_dtype, model=self.model, **sections
        )

    def stage_context(self, precision: Precision | None = None) -> StageContext:
        """The core entries' context, with the precision resolved here unless given."""
        ran = precision or self.precision()
        return StageContext(device=ran.device, dtype=ran.dtype, seed=self.seed, run=self.name or "finescope")


def fsspec_options(storage: StorageConfig) -> dict[str, Any]:
    """fsspec options of `storage`, with credentials from its Prefect Secret block when it names one."""
    block = storage.secret_block
    return storage.fsspec_options(block_credentials(block) if block else None)


@functools.lru_cache(maxsize=8)
def _opened(uri: str, storage_json: str) -> ArtifactStore:
    return ArtifactStore(uri, fsspec_options(StorageConfig.model_validate_json(storage_json)))


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


def logger() -> logging.Logger | logging.LoggerAdapter[logging.Logger]:
    try:
        return get_run_logger()
    except MissingContextError:
        return logging.getLogger("finescope")


def open_store(cfg: FinescopeConfig) -> ArtifactStore:
    """The store of `cfg` (opened once per process): for callers that hold a configuration, not a context."""
    return RunContext.of(cfg).store


def storage_options(cfg: FinescopeConfig) -> dict[str, Any]:
    """fsspec options for the store and remote inputs, with credentials from `storage.secret_block`."""
    return RunContext.of(cfg).storage_options()


@functools.lru_cache(maxsize=8)
def block_credentials(name: str) -> dict[str, str]:
    """`{"key", "secret"}` from the Prefect Secret block `name`, read once per process."""
    from prefect.blocks.system import Secret

    try:
        block = Secret.load(name)
        assert isinstance(block, Secret)  # the synchronous call: the block, not a coroutine
        value = block.get()
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
