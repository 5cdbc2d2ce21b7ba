"""A run's settings: what decides its outputs, as a dict, a short hash, the differences between two runs
and a one-line summary (for artifact descriptions).

Where and how a run goes (`name`, `output`, `store`, `storage`, `orchestration`) is not a setting: the
same settings run with another task runner or store give the same outputs.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from typing import Any

from pydantic import ValidationError

from finescope_core.config import FinescopeConfig

NOT_SETTINGS = frozenset({"name", "output", "store", "storage", "orchestration"})


def settings(config: FinescopeConfig | Mapping[str, Any]) -> dict[str, Any]:
    """The config's settings as plain JSON values, defaults filled in.

    A config read back from an older run.json is validated first, so a field added since then compares
    as its default; one that no longer validates compares as it was written.
    """
    if isinstance(config, FinescopeConfig):
        return config.model_dump(mode="json", exclude=set(NOT_SETTINGS))
    raw = dict(config)
    try:
        return FinescopeConfig.model_validate(raw).model_dump(mode="json", exclude=set(NOT_SETTINGS))
    except ValidationError:
        return {k: v for k, v in raw.items() if k not in NOT_SETTINGS}


def settings_hash(config: FinescopeConfig | Mapping[str, Any]) -> str:
    """8 hex digits of the settings' SHA-256: a short, stable name for one set of settings."""
    return hashlib.sha256(json.dumps(settings(config), sort_keys=True).encode()).hexdigest()[:8]


def differences(old: Mapping[str, Any], new: Mapping[str, Any], prefix: str = "") -> list[str]:
    """`field: old -> new` for every dotted field whose value differs, sorted by name."""
    out = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, Mapping) and isinstance(b, Mapping):
            out += differences(a, b, f"{prefix}{key}.")
        elif a != b:
            out.append(f"{prefix}{key}: {a!r} -> {b!r}")
    return out


def summary(config: FinescopeConfig) -> str:
    """The settings a reader tells runs apart by, in one line: method, ratio, baselines, model, hash."""
    baselines = ", ".join(config.evaluate.baselines) or "none"
    return (
        f"{config.curate.method} curation, prune.ratio {config.prune.ratio:g}, baselines {baselines}, "
        f"model {config.model}, settings {settings_hash(config)}"
    )
