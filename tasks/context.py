"""The run context: the run's name, its store (opened once per process and store), logging."""

from __future__ import annotations

import functools
import logging
from typing import Any

from prefect import get_run_logger
from prefect.exceptions import MissingContextError

from finescope_core.config import ConfigError, FinescopeConfig, slug
from finescope_core.store import (
    ArtifactStore,
)


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
