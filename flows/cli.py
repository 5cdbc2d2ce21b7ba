"""`finescope` command line: one sub-command per flow; each config field the flow reads is an option.

Options are generated from the pydantic config models, so `--help` shows each field's docstring and
choices, and the YAML file, the CLI and the Prefect flow parameters can never drift apart. The flows
write their own outputs (to `--out`), so a CLI run and a deployment run produce the same files.
"""

from __future__ import annotations

import argparse
import os
import sys
import types
import typing
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel

from finescope_core import __version__
from finescope_core.config import ConfigError, FinescopeConfig, load_config, path_fields, slug
from flows.serve import FLOWS
from flows.store_cli import add_store_parser, run_store

# Prefect without a server by default: a temporary local API per run, no telemetry. Its first start on a
# machine creates and migrates its database, which takes longer than Prefect's 20 s default on a slow
# machine; the run waits for it instead of failing.
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "600")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

GENERAL = ("name", "model", "seeds", "corpus", "store", "storage", "device", "seed")
SECTIONS: dict[str, tuple[str, ...]] = {
    "curate": (*GENERAL, "curate", "orchestration"),
    "prune": (*GENERAL, "curate", "prune", "orchestration"),
    "run": (*GENERAL, "curate", "prune", "teacher", "finetune", "evaluate", "orchestration"),
    "serve": (*GENERAL, "output", "curate", "prune", "teacher", "finetune", "evaluate", "orchestration"),
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
    """The allowed values of a Literal field (or an optional Literal), as they are typed on the command line."""
    if typing.get_origin(annotation) is Literal:
        return tuple(str(a) for a in typing.get_args(annotation))
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        for arg in typing.get_args(annotation):
            if (found := _choices(arg)) is not None:
                return found
    return None


def _metavar(annotation: Any) -> str:
    origin = typing.get_origin(annotation)
    if origin is list:
        return "LIST"
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        return _metavar(args[0]) if len(args) == 1 else "VALUE"
    return {int: "N", float: "X", bool: "true|false", str: "TEXT"}.get(annotation, "VALUE")


def _add_config_options(parser: argparse.ArgumentParser, sections: tuple[str, ...], hidden: tuple[str, ...] = ()) -> None:
    """One option per config field of `sections`, grouped by section, each with its docstring and choices."""
    paths = path_fields()
    groups: dict[str, Any] = {}
    for dotted, info in _leaf_fields(FinescopeConfig):
        section = dotted.split(".")[0] if "." in dotted else ""
        if dotted.split(".")[0] not in sections or dotted in hidden:
            continue
        if section not in groups:
            title = f"{section}: " + _section_doc(section) if section else "general (override the YAML file; lists as YAML, e.g. '[4, 8]')"
            groups[section] = parser.add_argument_group(title)
        default = "required" if info.is_required() else f"default: {info.get_default(call_default_factory=True)!r}"
        help_text = " ".join((info.description or "").split()) + f" ({default})"
        choices = _choices(info.annotation)
        metavar = "{" + ",".join(choices) + "}" if choices else "PATH" if paths.get(dotted) == "always" else _metavar(info.annotation)
        groups[section].add_argument(
            f"--{dotted}", dest=f"cfg:{dotted}", choices=choices, metavar=metavar, help=help_text.replace("%", "%%")
        )


def _section_doc(section: str) -> str:
    """The first line of a config section's docstring (`curate` -> "Domain data curation: ...")."""
    ann = FinescopeConfig.model_fields[section].annotation
    return ((getattr(ann, "__doc__", None) or "").strip().splitlines() or [""])[0].rstrip(".")


def _overrides(args: argparse.Namespace) -> dict[str, Any]:
    out = {}
    for key, value in vars(args).items():
        if key.startswith("cfg:") and value is not None:
            dotted = key[4:]
            out[dotted] = value if dotted in RAW_STRINGS else yaml.safe_load(value)
    return out


def _flow_command(sub: Any, name: str, help_text: str, out_help: str) -> argparse.ArgumentParser:
    usage = f"finescope {name} [--config FILE] [--out DIR] [--FIELD VALUE ...]"
    parser = sub.add_parser(name, help=help_text, description=help_text, usage=usage, allow_abbrev=False)
    parser.add_argument("--config", type=Path, metavar="FILE", help="YAML config file (fields below)")
    parser.add_argument("--out", type=Path, metavar="DIR", help=f"output directory: {out_help} (default: <store>/outputs/<name>)")
    _add_config_options(parser, SECTIONS[name])
    return parser


def build_parser() -> argparse.ArgumentParser:
    # No abbreviations: `--storage.secret` must not silently mean `--storage.secret_block`.
    parser = argparse.ArgumentParser(prog="finescope", description=__doc__.splitlines()[0], allow_abbrev=False)
    parser.add_argument("--version", action="version", version=f"finescope {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="{curate,prune,run,demo,serve,store}")
    _flow_command(sub, "curate", "seeds + corpus -> curated domain dataset", "curated.jsonl/.parquet, dataset card, run.json")
    _flow_command(sub, "prune", "curate (cached) then prune; writes a plain HF model directory",
                  "pruned-model/ (with its model card), curated/, run.json")  # fmt: skip
    _flow_command(sub, "run", "the whole specialize flow: curate, prune, teacher, LoRA, evaluate, report",
                  "report.md, metrics.json, pruned-model/, tuned-model/, tuned-adapter/, curated/, distilled/, run.json")  # fmt: skip
    demo = sub.add_parser("demo", help="build the bundled mixed-domain demo corpus and compare every curation method",
                          usage="finescope demo --out DIR [--domain D] [--methods M,...] [--curate-only] [--FIELD VALUE ...]",
                          allow_abbrev=False)  # fmt: skip
    demo.add_argument("--out", type=Path, required=True, help="directory for the demo report (and specialize/)")
    demo.add_argument("--domain", default="math", help="demo domain whose seeds are used (math, code, science)")
    demo.add_argument("--methods", default="sae,sentence,activation,random", help="comma-separated curate.method values")
    demo.add_argument("--config", type=Path, help="optional YAML with other fields (model, store, curate...)")
    demo.add_argument("--curate-only", action="store_true", help="compare curation methods only; skip prune/teacher/LoRA")
    _add_config_options(demo, SECTIONS["run"], DEMO_HIDDEN)
    serve = sub.add_parser(
        "serve", help="serve one flow as a Prefect deployment on a schedule from this process (needs PREFECT_API_URL)",
        usage="finescope serve [--config FILE] [--flow F] [--cron CRON | --interval SECONDS] [--FIELD VALUE ...]",
        allow_abbrev=False,
    )
    serve.add_argument("--config", type=Path, help="YAML config file (fields below); it becomes the deployment's parameters")
    serve.add_argument("--flow", choices=tuple(FLOWS), default="specialize", help="flow to serve (default: specialize)")
    when = serve.add_argument_group("schedule (at most one; none: runs start only from the UI or `prefect deployment run`)")
    when.add_argument("--cron", help="cron string in UTC, quoted, e.g. '0 3 * * 0' (Sundays 03:00)")
    when.add_argument("--interval", type=int, metavar="SECONDS", help="seconds between runs, e.g. 86400")
    _add_config_options(serve, SECTIONS["serve"])
    add_store_parser(sub)
    return parser


def flow_config(args: argparse.Namespace) -> FinescopeConfig:
    """The config of a flow command: file + options, `--out` as the output, the file's stem as the name."""
    cfg = load_config(args.config, _overrides(args))
    if getattr(args, "out", None) is not None:
        cfg.output = str(args.out.resolve())
    if cfg.name is None and args.config is not None:
        cfg.name = slug(args.config.stem)
    return cfg


def _run_flow(command: str, cfg: FinescopeConfig) -> None:
    if command == "curate":
        from flows.curate import curate_flow

        result = curate_flow(cfg)
        print(f"curated {result.curated.info.get('records', 0)} records; outputs in {_where(result.exported)}")
    elif command == "prune":
        from flows.prune import prune_flow

        pruned = prune_flow(cfg)
        info = pruned.pruned.info
        print(f"pruned {info['params_before']['total']:,} -> {info['params_after']['total']:,} parameters "
              f"(ratio {info['achieved_ratio']:.4f}); outputs in {_where(pruned.exported)}")  # fmt: skip
    else:
        from flows.specialize import specialize_flow

        result = specialize_flow(cfg)
        for name, m in result.metrics["models"].items():
            print(f"{name:>16}: perplexity {m['perplexity']:.2f}, parameters {m['parameters']:,}")
        print(f"report, models and data in {_where(result.exported)}")


def _where(exported: Any) -> str:
    return exported.location if exported is not None else "(not exported)"


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from transformers.utils import logging as hf_logging

    # Per-batch progress comes from our own log lines (terminal + Prefect); transformers' bars would
    # interleave with them.
    hf_logging.disable_progress_bar()
    try:
        if args.command in ("curate", "prune", "run"):
            _run_flow(args.command, flow_config(args))
        elif args.command == "demo":
            from flows.demo import run_demo

            report = run_demo(
                args.out, args.domain, args.methods.split(","), args.config, _overrides(args), specialize=not args.curate_only
            )
            print(f"demo report written to {report}")
        elif args.command == "serve":
            from flows.serve import default_name, serve

            cfg = load_config(args.config, _overrides(args))
            # The deployment's name is the run's name, so its artifacts and outputs carry it too.
            cfg.name = cfg.name or default_name(args.config)
            serve(cfg, args.flow, args.cron, args.interval, cfg.name)
        elif args.command == "store":
            return run_store(args)
    except (ConfigError, ValueError, OSError) as e:
        print(f"finescope: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
