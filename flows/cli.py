"""`finescope` command line: one sub-command per flow; each config field the flow reads is an option.

Options are generated from the pydantic config models, so `--help` shows each field's docstring and
choices, and the YAML file, the CLI and the Prefect flow parameters can never drift apart. The flows
write their own outputs (to `--out`), so a CLI run and a deployment run produce the same files.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

from finescope_core import __version__
from finescope_core.config import (
    ConfigError,
    FinescopeConfig,
    load_config,
    slug,
)
from finescope_core.config_guard import redact_uri
from flows.options import DEMO_HIDDEN, SECTIONS, add_config_options, overrides
from flows.serve import FLOWS
from flows.store_cli import add_store_parser, run_store

# Prefect without a server by default: a temporary local API per run, no telemetry. Its first start on a
# machine creates and migrates its database, which takes longer than Prefect's 20 s default on a slow
# machine; the run waits for it instead of failing.
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "600")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def _flow_command(sub: Any, name: str, help_text: str, out_help: str) -> argparse.ArgumentParser:
    usage = f"finescope {name} [--config FILE] [--out DIR] [--FIELD VALUE ...]"
    parser: argparse.ArgumentParser = sub.add_parser(
        name, help=help_text, description=help_text, usage=usage, allow_abbrev=False
    )
    parser.add_argument("--config", type=Path, metavar="FILE", help="YAML config file (fields below)")
    parser.add_argument(
        "--out",
        type=Path,
        metavar="DIR",
        help=f"output directory: {out_help} (default: <store>/outputs/<name>)",
    )
    add_config_options(parser, SECTIONS[name])
    return parser


def build_parser() -> argparse.ArgumentParser:
    # No abbreviations: `--storage.secret` must not silently mean `--storage.secret_block`.
    parser = argparse.ArgumentParser(
        prog="finescope", description=__doc__.splitlines()[0], allow_abbrev=False
    )
    parser.add_argument("--version", action="version", version=f"finescope {__version__}")
    commands = "{curate,prune,run,demo,serve,trigger,store}"
    sub = parser.add_subparsers(dest="command", required=True, metavar=commands)
    _flow_command(
        sub,
        "curate",
        "seeds + corpus -> curated domain dataset",
        "curated.jsonl/.parquet, dataset card, run.json",
    )
    _flow_command(
        sub,
        "prune",
        "curate (cached) then prune; writes a plain HF model directory",
        "pruned-model/ (with its model card), curated/, run.json",
    )
    _flow_command(
        sub,
        "run",
        "the whole specialize flow: curate, prune, teacher, LoRA, evaluate, report",
        "report.md, metrics.json, pruned-model/, tuned-model/, tuned-adapter/, curated/, distilled/, "
        "run.json",
    )
    demo = sub.add_parser(
        "demo",
        help="build the bundled mixed-domain demo corpus and compare every curation method",
        usage="finescope demo --out DIR [--domain D] [--methods M,...] [--curate-only] [--FIELD VALUE ...]",
        allow_abbrev=False,
    )
    demo.add_argument(
        "--out", type=Path, required=True, help="directory for the demo report (and specialize/)"
    )
    demo.add_argument(
        "--domain", default="math", help="demo domain whose seeds are used (math, code, science)"
    )
    demo.add_argument(
        "--methods", default="sae,sentence,activation,random", help="comma-separated curate.method values"
    )
    demo.add_argument("--config", type=Path, help="optional YAML with other fields (model, store, curate...)")
    demo.add_argument(
        "--curate-only", action="store_true", help="compare curation methods only; skip prune/teacher/LoRA"
    )
    add_config_options(demo, SECTIONS["run"], DEMO_HIDDEN)
    serve = sub.add_parser(
        "serve",
        help="serve one flow as a Prefect deployment on a schedule from this process (needs PREFECT_API_URL)",
        usage="finescope serve [--config FILE] [--flow F] [--cron CRON | --interval SECONDS] "
        "[--FIELD VALUE ...]",
        allow_abbrev=False,
    )
    serve.add_argument(
        "--config", type=Path, help="YAML config file (fields below); it becomes the deployment's parameters"
    )
    serve.add_argument(
        "--flow", choices=tuple(FLOWS), default="specialize", help="flow to serve (default: specialize)"
    )
    when = serve.add_argument_group(
        "schedule (at most one; none: runs start only from the UI or `prefect deployment run`)"
    )
    when.add_argument("--cron", help="cron string in UTC, quoted, e.g. '0 3 * * 0' (Sundays 03:00)")
    when.add_argument("--interval", type=int, metavar="SECONDS", help="seconds between runs, e.g. 86400")
    add_config_options(serve, SECTIONS["serve"])
    _trigger_command(sub)
    add_store_parser(sub)
    return parser


def _trigger_command(sub: Any) -> None:
    trigger = sub.add_parser(
        "trigger",
        help="start one run of a deployment with config fields changed (needs PREFECT_API_URL)",
        usage="finescope trigger NAME [--FIELD VALUE ...]",
        allow_abbrev=False,
        description="Start one run of a deployment, its config parameter with the given fields replaced "
        "(checked before the run is created); returns once the run is scheduled.",
    )
    trigger.add_argument(
        "deployment", metavar="NAME", help="the deployment: FLOW/NAME (e.g. specialize/math) or NAME"
    )
    add_config_options(trigger, SECTIONS["serve"])


def flow_config(args: argparse.Namespace) -> FinescopeConfig:
    """The config of a flow command: file + options, `--out` as the output, the file's stem as the name."""
    cfg = load_config(args.config, overrides(args))
    if getattr(args, "out", None) is not None:
        cfg.output = str(args.out.resolve())
    if cfg.name is None and args.config is not None:
        cfg.name = slug(args.config.stem)
    return cfg


def check_model_first(command: str, cfg: FinescopeConfig) -> None:
    """Read the model's config (no weights) before the flow starts: a missing or broken model directory,
    or a pruning ratio it cannot reach, is refused in seconds, not after Prefect's temporary API has
    started (20-50 s). The flows check the same again for their other callers.

    Raises:
        ModelError: the model (or a separate teacher model) cannot be used, saying why.
        ConfigError: prune.ratio is 0 or out of reach.
    """
    from finescope_core.model import model_config
    from flows.prune import check_ratio

    if command != "curate" or cfg.curate.method in ("sae", "activation"):
        model_config(cfg.model)
    if command in ("prune", "run"):
        check_ratio(cfg)
    if command == "run" and cfg.teacher.model != "base":
        model_config(cfg.teacher.model)


def _run_flow(command: str, cfg: FinescopeConfig) -> None:
    check_model_first(command, cfg)
    if command == "curate":
        from flows.curate import curate_flow

        curated = curate_flow(cfg)
        print(
            f"curated {curated.curated.info.get('records', 0)} records; outputs in {_where(curated.exported)}"
        )
    elif command == "prune":
        from flows.prune import prune_flow

        pruned = prune_flow(cfg)
        info = pruned.pruned.info
        print(
            f"pruned {info['params_before']['total']:,} -> {info['params_after']['total']:,} parameters "
            f"(ratio {info['achieved_ratio']:.4f}); outputs in {_where(pruned.exported)}"
        )
    else:
        from flows.specialize import specialize_flow

        result = specialize_flow(cfg)
        for name, m in result.metrics["models"].items():
            ci = m["ci"]["perplexity"]
            print(
                f"{name:>16}: perplexity {m['perplexity']:.2f} [{ci['low']:.2f}, {ci['high']:.2f}] "
                f"(n={ci['n']}), "
                f"parameters {m['parameters']:,}"
            )
        print(f"report, models and data in {_where(result.exported)}")


def _where(exported: Any) -> str:
    return exported.location if exported is not None else "(not exported)"


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from transformers.utils import logging as hf_logging

    # Per-batch progress comes from our own log lines (terminal + Prefect); transformers' bars would
    # interleave with them.
    hf_logging.disable_progress_bar()  # type: ignore[no-untyped-call]
    try:
        if args.command in ("curate", "prune", "run"):
            from prefect import tags

            from flows.ui import run_tags

            cfg = flow_config(args)
            # Tagged as a served deployment's runs are: one filter finds a run's flows and tasks either way.
            with tags(*run_tags(cfg)):
                _run_flow(args.command, cfg)
        elif args.command == "demo":
            from flows.demo import run_demo

            report = run_demo(
                args.out,
                args.domain,
                args.methods.split(","),
                args.config,
                overrides(args),
                specialize=not args.curate_only,
            )
            print(f"demo report written to {report}")
        elif args.command == "serve":
            from flows.serve import default_name, serve

            cfg = load_config(args.config, overrides(args))
            # The deployment's name is the run's name, so its artifacts and outputs carry it too.
            cfg.name = cfg.name or default_name(args.config)
            serve(cfg, args.flow, args.cron, args.interval, cfg.name)
        elif args.command == "trigger":
            from flows.trigger import trigger

            changes = overrides(args)
            run, url = trigger(args.deployment, changes)
            changed = ", ".join(f"{k}={v!r}" for k, v in changes.items()) or "no change"
            print(f"started flow run '{run.name}' ({run.id}) of {args.deployment} with {changed}; UI: {url}")
        elif args.command == "store":
            return run_store(args)
    except (ConfigError, ValueError, OSError) as e:
        print(f"finescope: error: {redact_uri(str(e))}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
