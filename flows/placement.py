"""Where a run's outputs go when its output location already holds another run: never over it in silence.

A location holds one run's outputs and its run.json. A run with the same flow and settings (see
`finescope_core.settings`) replaces them, as a scheduled deployment does every time. A run with other
settings (a custom run with another `prune.ratio`, say) goes beside them, to `<location>-<settings hash>`
under the name `<name>-<settings hash>` (so its Prefect artifacts are its own too), and says so in the log
with every setting that differs. The same variant run again lands in the same place.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import fsspec

from finescope_core.config import ConfigError, FinescopeConfig
from finescope_core.settings import differences, settings, settings_hash
from tasks.context import logger, run_name, storage_options
from tasks.export import output_location


def stored_run(cfg: FinescopeConfig, location: str) -> dict[str, Any] | None:
    """The run.json at `location`, or None when there is none (nothing exported there yet)."""
    if "://" in location and not location.startswith("file://"):
        fs, root = fsspec.core.url_to_fs(location, **storage_options(cfg))
        path = f"{root.rstrip('/')}/run.json"
        try:
            text = fs.cat_file(path).decode() if fs.exists(path) else None
        except OSError as e:  # no access (credentials, endpoint): said here, before any work
            raise ConfigError(
                f"cannot read {location}/run.json ({type(e).__name__}: {e}); check `storage` and "
                "the credentials, or give another `output`"
            ) from None
    else:
        local = Path(location.removeprefix("file://")).expanduser() / "run.json"
        path, text = str(local), (local.read_text(encoding="utf-8") if local.is_file() else None)
    if text is None:
        return None
    try:
        found: dict[str, Any] = json.loads(text)
    except ValueError as e:
        raise ConfigError(
            f"{path} is not a finescope run.json ({e}); move it away, or give another `output`"
        ) from None
    return found


def place(cfg: FinescopeConfig, flow: str) -> FinescopeConfig:
    """The config the run goes on with: `cfg` itself, or a copy named and located beside the outputs of a
    run with other settings (see the module docstring)."""
    location = output_location(cfg)
    found = stored_run(cfg, location)
    if found is None:
        return cfg
    changed = [f"flow: {found.get('flow')!r} -> {flow!r}"] if found.get("flow") != flow else []
    changed += differences(settings(found.get("config") or {}), settings(cfg))
    if not changed:
        return cfg
    suffix = settings_hash(cfg)
    # A name is at most 63 characters: the run name gives way to the hash.
    name = f"{run_name(cfg)[: 62 - len(suffix)].rstrip('-')}-{suffix}"
    output = f"{cfg.output.rstrip('/')}-{suffix}" if cfg.output else None
    moved = cfg.model_copy(update={"name": name, "output": output})
    logger().warning(
        "%s holds the outputs of a run with other settings (%s); this run writes beside them, to %s, as %r. "
        "Give this run its own `name` (or `output`) to choose where it goes",
        location,
        "; ".join(changed),
        output_location(moved),
        name,
    )
    return moved
