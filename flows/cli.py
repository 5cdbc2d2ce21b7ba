"""`finescope` command line: one sub-command per flow; every config field is an option.

Options are generated from the pydantic config models, so `--help` shows each field's docstring and
the YAML file, the CLI and the Prefect flow parameters can never drift apart.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel

from finescope_core.config import ConfigError, FinescopeConfig, load_config
from flows.serve import FLOWS
from flows.store_cli import add_store_parser, run_store

# Prefect without a server by default: a temporary local API per run, no telemetry.
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


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


def _add_config_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("config fields (override the YAML file; values parsed as YAML, e.g. '[4, 8]')")
    for dotted, info in _leaf_fields(FinescopeConfig):
        default = "required" if info.is_required() else f"default: {info.get_default(call_default_factory=True)!r}"
        if "secret" in dotted or dotted.endswith(".key"):
            default = "default: from the environment"
        help_text = " ".join((info.description or "").split()) + f" ({default})"
        group.add_argument(f"--{dotted}", dest=f"cfg:{dotted}", metavar="VALUE", help=help_text.replace("%", "%%"))


def _overrides(args: argparse.Namespace) -> dict[str, Any]:
    out = {}
    for key, value in vars(args).items():
        if key.startswith("cfg:") and value is not None:
            out[key[4:]] = yaml.safe_load(value) if key[4:] not in ("model", "store") else value
    return out


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="finescope", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    curate = sub.add_parser("curate", help="seeds + corpus -> curated domain dataset (curated.jsonl/.parquet)")
    curate.add_argument("--config", type=Path, help="YAML config file (fields below)")
    curate.add_argument("--out", type=Path, required=True, help="directory for curated.jsonl, curated.parquet, run.json")
    _add_config_options(curate)
    run = sub.add_parser("run", help="the whole specialize flow: curate, prune, teacher, LoRA, evaluate, report")
    run.add_argument("--config", type=Path, help="YAML config file (fields below)")
    run.add_argument("--out", type=Path, required=True, help="directory for metrics.json, report.md (+ plots), tuned-model/, run.json")
    _add_config_options(run)
    prune = sub.add_parser("prune", help="curate (cached) then prune; writes a plain HF model directory")
    prune.add_argument("--config", type=Path, help="YAML config file (fields below)")
    prune.add_argument("--out", type=Path, required=True, help="directory for pruned-model/ and run.json")
    _add_config_options(prune)
    demo = sub.add_parser("demo", help="build the bundled mixed-domain demo corpus and compare every curation method")
    demo.add_argument("--out", type=Path, required=True, help="directory for the demo report")
    demo.add_argument("--domain", default="math", help="demo domain whose seeds are used (math, code, science)")
    demo.add_argument("--methods", default="sae,sentence,activation,random", help="comma-separated curate.method values")
    demo.add_argument("--config", type=Path, help="optional YAML with other fields (model, store, curate...)")
    demo.add_argument("--curate-only", action="store_true", help="compare curation methods only; skip prune/teacher/LoRA")
    _add_config_options(demo)
    serve = sub.add_parser(
        "serve", help="serve one flow as a Prefect deployment on a schedule from this process (needs PREFECT_API_URL)"
    )
    serve.add_argument("--config", type=Path, help="YAML config file (fields below); it becomes the deployment's parameters")
    serve.add_argument("--flow", choices=tuple(FLOWS), default="specialize", help="flow to serve (default: specialize)")
    when = serve.add_argument_group("schedule (at most one; none: runs start only from the UI or `prefect deployment run`)")
    when.add_argument("--cron", help="cron string in UTC, quoted, e.g. '0 3 * * 0' (Sundays 03:00)")
    when.add_argument("--interval", type=int, metavar="SECONDS", help="seconds between runs, e.g. 86400")
    serve.add_argument("--name", help="deployment name (default: the config file's stem, else 'finescope')")
    _add_config_options(serve)
    add_store_parser(sub)
    return parser


def code_version() -> str:
    """Package version plus the git commit when run from a checkout."""
    from tasks.common import CODE_VERSION

    try:
        sha = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=Path(__file__).parent, capture_output=True, text=True, timeout=5
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        sha = ""
    return f"{CODE_VERSION}+{sha}" if sha else CODE_VERSION


def write_run_manifest(out: Path, cfg: FinescopeConfig, stages: dict[str, Any], seconds: float) -> None:
    """run.json: parameters (secrets masked), input hashes, artifact URIs, code version."""
    manifest = {
        "code_version": code_version(),
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "seconds": round(seconds, 1),
        "config": json.loads(cfg.model_dump_json()),
        "stages": stages,
    }
    tmp = out / ".run.json.tmp"
    tmp.write_text(json.dumps(manifest, indent=2, default=str))
    os.replace(tmp, out / "run.json")


def run_curate(cfg: FinescopeConfig, out: Path) -> dict[str, Any]:
    """Run the curate flow and copy its outputs into `out`."""
    from flows.curate import curate_flow
    from tasks.common import artifact_dir, open_store

    start = time.perf_counter()
    result = curate_flow(cfg)
    out.mkdir(parents=True, exist_ok=True)
    src = artifact_dir(open_store(cfg), result.curated)
    for name in ("curated.jsonl", "curated.parquet", "curation.json"):
        shutil.copyfile(src / name, out / f".{name}.tmp")
        os.replace(out / f".{name}.tmp", out / name)
    stages = {k: v for k, v in result.model_dump().items() if k != "layers" and v is not None}
    write_run_manifest(out, cfg, stages, time.perf_counter() - start)
    return stages


def run_prune(cfg: FinescopeConfig, out: Path) -> dict[str, Any]:
    """Run the prune flow and copy the pruned model directory into `out/pruned-model`."""
    from flows.prune import prune_flow
    from tasks.common import artifact_dir, open_store

    start = time.perf_counter()
    result = prune_flow(cfg)
    out.mkdir(parents=True, exist_ok=True)
    _copy_dir(artifact_dir(open_store(cfg), result.pruned) / "model", out / "pruned-model")
    stages = {"pruned": result.pruned.model_dump()}
    if result.curate is not None:
        stages.update({k: v for k, v in result.curate.model_dump().items() if k != "layers" and v is not None})
    write_run_manifest(out, cfg, stages, time.perf_counter() - start)
    return stages


def run_specialize(cfg: FinescopeConfig, out: Path) -> dict[str, Any]:
    """Run the specialize flow; copy report, metrics and the tuned model into `out`."""
    from flows.specialize import specialize_flow
    from tasks.common import artifact_dir, open_store

    start = time.perf_counter()
    result = specialize_flow(cfg)
    store = open_store(cfg)
    out.mkdir(parents=True, exist_ok=True)
    report_dir = artifact_dir(store, result.report)
    for src in sorted(report_dir.iterdir()):
        if src.is_file() and not src.name.startswith("_"):
            shutil.copyfile(src, out / f".{src.name}.tmp")
            os.replace(out / f".{src.name}.tmp", out / src.name)
    tuned = result.variants[""].tuned
    _copy_dir(artifact_dir(store, tuned) / "merged", out / "tuned-model")
    _copy_dir(artifact_dir(store, tuned) / "adapter", out / "tuned-adapter")
    stages = {k: v for k, v in result.curate.model_dump().items() if k != "layers" and v is not None}
    for name, variant in result.variants.items():
        for stage, manifest in variant.model_dump().items():
            stages[f"{stage}-{name}" if name else stage] = manifest
    stages.update({f"evaluate-{k}": v.model_dump() for k, v in result.evaluations.items()})
    stages["report"] = result.report.model_dump()
    write_run_manifest(out, cfg, stages, time.perf_counter() - start)
    return result.metrics


def _copy_dir(src: Path, dest: Path) -> None:
    """Replace `dest` with a copy of `src`, never leaving a half-copied directory under the final name."""
    tmp = dest.with_name(f".{dest.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(src, tmp)
    if dest.exists():
        shutil.rmtree(dest)
    os.replace(tmp, dest)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from transformers.utils import logging as hf_logging

    # Per-batch progress comes from our own log lines (terminal + Prefect); transformers' bars would
    # interleave with them.
    hf_logging.disable_progress_bar()
    try:
        if args.command == "curate":
            cfg = load_config(args.config, _overrides(args))
            run_curate(cfg, args.out)
            print(f"curated set written to {args.out / 'curated.jsonl'}")
        elif args.command == "run":
            cfg = load_config(args.config, _overrides(args))
            metrics = run_specialize(cfg, args.out)
            for name, m in metrics["models"].items():
                print(f"{name:>16}: perplexity {m['perplexity']:.2f}, parameters {m['parameters']:,}")
            print(f"report written to {args.out / 'report.md'}")
        elif args.command == "prune":
            cfg = load_config(args.config, _overrides(args))
            stages = run_prune(cfg, args.out)
            info = stages["pruned"]["info"]
            print(
                f"pruned model written to {args.out / 'pruned-model'}: {info['params_before']['total']:,} -> "
                f"{info['params_after']['total']:,} parameters (ratio {info['achieved_ratio']:.4f})"
            )
        elif args.command == "demo":
            from flows.demo import run_demo

            report = run_demo(
                args.out, args.domain, args.methods.split(","), args.config, _overrides(args), specialize=not args.curate_only
            )
            print(f"demo report written to {report}")
        elif args.command == "serve":
            from flows.serve import default_name, serve

            cfg = load_config(args.config, _overrides(args))
            serve(cfg, args.flow, args.cron, args.interval, args.name or default_name(args.config))
        elif args.command == "store":
            return run_store(args)
    except (ConfigError, ValueError, OSError) as e:
        print(f"finescope: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
