"""Loading a config: the YAML file, dotted overrides, relative paths resolved against the file, and
errors that name the file and the field."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from finescope_core.config.finescope import FinescopeConfig
from finescope_core.config_guard import check_no_credentials, redact_uri, safe_load


class ConfigError(ValueError):
    """A configuration problem, with the file and field that caused it."""


def _format_validation_error(err: ValidationError, source: str) -> str:
    lines = [f"invalid configuration in {source}:"]
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"]) or "(top level)"
        msg = e["msg"]
        if e["type"] == "extra_forbidden":
            msg = "unknown field (check the spelling; `finescope curate --help` lists the fields)"
        lines.append(f"  - {loc}: {msg}")
    return "\n".join(lines)


def load_config(path: str | Path | None = None, overrides: dict[str, Any] | None = None) -> FinescopeConfig:
    """Read a YAML config and apply dotted overrides (`{"curate.top_m": 50}`).

    Relative paths in the file (every field marked PATH / NAME_OR_PATH: data, store, output, models,
    evaluation files) are resolved against the file's directory; those in overrides are left relative
    to the working directory.

    Raises:
        ConfigError: unreadable file, bad YAML, unknown field or out-of-range value, naming the field.
    """
    raw: dict[str, Any] = {}
    source = "command-line options"
    base_dir: Path | None = None
    if path is not None:
        p = Path(path)
        source = str(p)
        if not p.is_file():
            raise ConfigError(f"config file {p} does not exist; pass an existing YAML file to --config")
        try:
            loaded = safe_load(p.read_text(encoding="utf-8"))
        except (yaml.YAMLError, UnicodeDecodeError) as e:
            raise ConfigError(f"config file {p} is not valid YAML: {e}") from e
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"config file {p} must hold a mapping of fields, got {type(loaded).__name__}")
        raw = loaded
        base_dir = p.resolve().parent
    if base_dir is not None:
        # Paths written in the file are relative to the file; paths given on the command line (applied
        # below) stay relative to the working directory.
        resolve_config_paths(raw, base_dir)
    for dotted, value in (overrides or {}).items():
        _set_dotted(raw, dotted, value)
    try:
        check_no_credentials(raw)
    except ValueError as e:
        raise ConfigError(f"invalid configuration in {redact_uri(source)}: {e}") from None
    try:
        return FinescopeConfig.model_validate(raw)
    except ValidationError as e:
        raise ConfigError(_format_validation_error(e, source)) from None


def _set_dotted(raw: dict[str, Any], dotted: str, value: Any) -> None:
    node = raw
    *parents, leaf = dotted.split(".")
    for part in parents:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"cannot set {dotted}: {part} is not a section")
        node = child
    node[leaf] = value


def path_fields(model: type[BaseModel] | None = None, prefix: str = "") -> dict[str, str]:
    """Dotted name -> marker (`always` / `if-exists`) of every path field, recursing into sections."""
    model = model or FinescopeConfig
    out: dict[str, str] = {}
    for name, info in model.model_fields.items():
        ann = info.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            out.update(path_fields(ann, f"{prefix}{name}."))
        elif isinstance(info.json_schema_extra, dict) and "path" in info.json_schema_extra:
            out[f"{prefix}{name}"] = str(info.json_schema_extra["path"])
    return out


def resolve_config_paths(raw: dict[str, Any], base: Path) -> None:
    """Resolve, in place, every relative path field of a raw config mapping against `base`."""
    for dotted, how in path_fields().items():
        node: Any = raw
        *parents, leaf = dotted.split(".")
        for part in parents:
            node = node.get(part) if isinstance(node, dict) else None
        if isinstance(node, dict) and leaf in node:
            node[leaf] = _resolve_paths(node[leaf], base, only_existing=how == "if-exists")


def _resolve_paths(value: Any, base: Path, *, only_existing: bool = False) -> Any:
    if isinstance(value, list):
        return [_resolve_paths(v, base, only_existing=only_existing) for v in value]
    if isinstance(value, str) and value and "://" not in value and not Path(value).expanduser().is_absolute():
        resolved = (base / Path(value).expanduser()).resolve()
        if not only_existing or resolved.exists():
            return str(resolved)
    return value
