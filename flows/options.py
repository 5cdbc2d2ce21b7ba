"""Command-line options generated from the config models: the fields each flow command reads, with
their docstrings, choices and defaults; values parsed back into dotted overrides."""

from __future__ import annotations

import argparse
import types
import typing
from typing import Any, Literal

import yaml
from pydantic import BaseModel

from finescope_core.config import ConfigError, FinescopeConfig, path_fields
from finescope_core.config_guard import safe_load

GENERAL = ("name", "model", "seeds", "corpus", "store", "storage", "device", "memory_budget", "seed")
SECTIONS: dict[str, tuple[str, ...]] = {
    "curate": (*GENERAL, "curate", "orchestration"),
    "prune": (*GENERAL, "curate", "prune", "orchestration"),
    "run": (*GENERAL, "curate", "prune", "recover", "teacher", "finetune", "evaluate", "orchestration"),
    "serve": (
        *GENERAL,
        "output",
        "curate",
        "prune",
        "recover",
        "teacher",
        "finetune",
        "evaluate",
        "orchestration",
    ),
}
"""The config fields (top-level names) each sub-command's flow reads, and so offers as options."""
DEMO_HIDDEN = ("seeds", "corpus", "curate.method")
"""The demo builds its own seeds and corpus and runs every method given by --methods."""
RAW_STRINGS = ("model", "store", "output", "name", "teacher.model", "prune.data")
"""Fields whose command-line value is taken as it is, not parsed as YAML (`--model 1e3` stays a name)."""


def _leaf_fields(model: type[BaseModel], prefix: str = "") -> list[tuple[str, Any]]:
    """(dotted name, FieldInfo) for every non-model field, recursing into nested config models."""
    out = []
    for name, info in model.model_fields.items():
        ann = info.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            out.extend(_leaf_fields(ann, f"{prefix}{name}."))
        else:
            out.append((f"{prefix}{name}", info))
    return out


def _choices(annotation: Any) -> tuple[str, ...] | None:
    """The allowed values of a Literal field (or an optional Literal), as they are typed on the command
    line. None when the field also takes other values (`int | Literal["auto"]`): argparse then passes
    the value on and the config's own validation judges it."""
    if typing.get_origin(annotation) is Literal:
        return tuple(str(a) for a in typing.get_args(annotation))
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        members = [a for a in typing.get_args(annotation) if a is not type(None)]
        found = [_choices(a) for a in members]
        if all(f is not None for f in found):
            return tuple(c for f in found if f is not None for c in f)
    return None


def _named_values(annotation: Any) -> tuple[str, ...]:
    """The Literal values of a union that also takes numbers (`auto` of `int | Literal["auto"]`)."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return tuple(c for a in typing.get_args(annotation) for c in (_choices(a) or ()))
    return ()


def _metavar(annotation: Any) -> str:
    origin = typing.get_origin(annotation)
    if origin is list:
        return "LIST"
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        named = _named_values(annotation)
        plain = [a for a in args if _choices(a) is None]
        if named and len(plain) == 1:  # e.g. `N|auto` for `int | Literal["auto"]`
            return "|".join((_metavar(plain[0]), *named))
        return _metavar(args[0]) if len(args) == 1 else "VALUE"
    if origin is typing.Annotated:
        return _metavar(typing.get_args(annotation)[0])
    return {int: "N", float: "X", bool: "true|false", str: "TEXT"}.get(annotation, "VALUE")


def add_config_options(
    parser: argparse.ArgumentParser, sections: tuple[str, ...], hidden: tuple[str, ...] = ()
) -> None:
    """One option per config field of `sections`, grouped by section, each with its docstring and choices."""
    paths = path_fields()
    groups: dict[str, Any] = {}
    for dotted, info in _leaf_fields(FinescopeConfig):
        section = dotted.split(".")[0] if "." in dotted else ""
        if dotted.split(".")[0] not in sections or dotted in hidden:
            continue
        if section not in groups:
            title = (
                f"{section}: " + _section_doc(section)
                if section
                else "general (override the YAML file; lists as YAML, e.g. '[4, 8]')"
            )
            groups[section] = parser.add_argument_group(title)
        default = (
            "required" if info.is_required() else f"default: {info.get_default(call_default_factory=True)!r}"
        )
        help_text = " ".join((info.description or "").split()) + f" ({default})"
        choices = _choices(info.annotation)
        metavar = (
            "{" + ",".join(choices) + "}"
            if choices
            else "PATH"
            if paths.get(dotted) == "always"
            else _metavar(info.annotation)
        )
        groups[section].add_argument(
            f"--{dotted}",
            dest=f"cfg:{dotted}",
            choices=choices,
            metavar=metavar,
            help=help_text.replace("%", "%%"),
        )


def _section_doc(section: str) -> str:
    """The first line of a config section's docstring (`curate` -> "Domain data curation: ...")."""
    ann = FinescopeConfig.model_fields[section].annotation
    return ((getattr(ann, "__doc__", None) or "").strip().splitlines() or [""])[0].rstrip(".")


def overrides(args: argparse.Namespace) -> dict[str, Any]:
    out = {}
    for key, value in vars(args).items():
        if key.startswith("cfg:") and value is not None:
            dotted = key[4:]
            try:
                out[dotted] = value if dotted in RAW_STRINGS else safe_load(value)
            except yaml.YAMLError as e:
                raise ConfigError(f"--{dotted}: the value is not valid YAML: {e}") from None
    return out
