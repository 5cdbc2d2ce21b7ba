"""`finescope store ls | plan | rm | gc | verify`: look into the artifact store, check it and clean it up.

The store only grows (every changed setting adds artifacts under new keys, killed runs leave work
dirs), and its directory names are hashes. These commands say what is in it, what the next run of a
config would reuse or compute, whether the stored files are still as committed, and delete what is no
longer wanted, safely: dry runs unless `--yes`, markers first, never a work dir a running stage holds.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from finescope_core.config import ConfigError, FinescopeConfig, StorageConfig
from finescope_core.config_guard import check_no_credentials, redact_uri
from finescope_core.store import ArtifactStore
from finescope_core.store_admin import (
    StoreListing,
    artifacts_of,
    collect,
    find_garbage,
    human,
    scan,
)
from finescope_core.store_verify import verify_store
from flows.options import SECTIONS, add_config_options, overrides

FLOW_CHOICES = ("specialize", "prune", "curate")
COMMAND_OF = {"specialize": "finescope run", "prune": "finescope prune", "curate": "finescope curate"}


def add_store_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add `store` and its sub-commands to the `finescope` parser's sub-commands."""

    store = subparsers.add_parser(
        "store",
        help="list, plan, delete and garbage-collect the artifacts of a store",
        description=__doc__.splitlines()[0],
    )
    sub = store.add_subparsers(dest="store_command", required=True, metavar="{ls,plan,rm,gc,verify}")
    ls = sub.add_parser(
        "ls", help="committed artifacts per stage (key, size, time, summary) and leftovers of killed runs"
    )
    _add_location(ls)
    ls.add_argument(
        "--json", action="store_true", help="machine-readable output (sizes in bytes, times in epoch seconds)"
    )

    plan = sub.add_parser(
        "plan", help="what the next run of a config reuses and computes, stage by stage (computes nothing)"
    )
    plan.add_argument("--config", type=Path, help="YAML config file (fields below)")
    plan.add_argument(
        "--flow",
        choices=FLOW_CHOICES,
        default="specialize",
        help="the flow to plan: specialize (`finescope run`, default), prune or curate",
    )
    plan.add_argument("--json", action="store_true", help="machine-readable output")
    add_config_options(plan, SECTIONS["run"])

    rm = sub.add_parser("rm", help="delete one stage's artifacts (a dry run unless --yes)")
    rm.add_argument(
        "stage", help="stage directory name as `finescope store ls` shows it, e.g. sae, curated, pruned"
    )
    rm.add_argument(
        "--key", metavar="PREFIX", help="only the artifact whose key starts with PREFIX (must match one)"
    )
    rm.add_argument(
        "--yes", action="store_true", help="delete; without it, list what would go and exit with status 1"
    )
    _add_location(rm)

    gc = sub.add_parser(
        "gc", help="delete leftovers of killed runs, and unused or old artifacts (a dry run unless --yes)"
    )
    gc.add_argument(
        "--config",
        type=Path,
        nargs="+",
        action="extend",
        metavar="FILE",
        help="keep every artifact a run of these configs (any flow) would reuse; delete the other artifacts",
    )
    gc.add_argument(
        "--keep-days",
        type=float,
        metavar="N",
        help="keep artifacts created in the last N days; delete older ones "
        "(with --config: older *and* unused)",
    )
    gc.add_argument(
        "--min-age",
        type=float,
        default=60.0,
        metavar="MINUTES",
        help="leftovers (work dirs, unfinished commits) untouched for less than this stay (default: 60)",
    )
    gc.add_argument("--store", help="store URI (default: the configs' store, else ./finescope-store)")
    gc.add_argument("--yes", action="store_true", help="delete; without it, only print what would be deleted")
    gc.add_argument("--json", action="store_true", help="machine-readable output")

    verify = sub.add_parser(
        "verify",
        help="check every artifact's files against its recorded sha256 (exit status 1 when any is damaged)",
    )
    _add_location(verify)
    verify.add_argument(
        "--quick",
        action="store_true",
        help="compare size and mtime, hashing only files whose mtime moved (what a run does on reuse)",
    )
    verify.add_argument("--json", action="store_true", help="machine-readable output")


def _add_location(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--store", help="store URI: a directory or e.g. s3://bucket/prefix (default: the config's store)"
    )
    parser.add_argument(
        "--config", type=Path, help="take the store and its storage settings from this YAML config"
    )


def run_store(args: argparse.Namespace) -> int:
    """Run `finescope store <command>`; returns the exit code (2: bad input, with the reason on stderr)."""
    commands = {"ls": _ls, "plan": _plan, "rm": _rm, "gc": _gc, "verify": _verify}
    try:
        return commands[args.store_command](args)
    except (ConfigError, ValueError, OSError) as e:
        print(f"finescope store {args.store_command}: error: {redact_uri(str(e))}", file=sys.stderr)
        return 2


# --- opening the store ------------------------------------------------------------------------------


def _configs(paths: list[Path] | None) -> list[FinescopeConfig]:
    from finescope_core.config import load_config

    return [load_config(p) for p in paths or []]


def _open(store_uri: str | None, configs: list[FinescopeConfig]) -> ArtifactStore:
    """The store named by --store, else the configs' (which must agree), else the default."""
    if store_uri is not None:
        check_no_credentials({"--store": store_uri})
    else:
        stores = sorted({c.store for c in configs})
        if len(stores) > 1:
            raise ConfigError(
                f"the configs use different stores ({', '.join(stores)}); pass --store to pick one"
            )
        store_uri = stores[0] if stores else FinescopeConfig.model_fields["store"].default
    storage = configs[0].storage if configs else StorageConfig()
    return ArtifactStore(store_uri, storage.fsspec_options())


def _location(args: argparse.Namespace) -> ArtifactStore:
    return _open(args.store, _configs([args.config] if args.config else None))


# --- ls ---------------------------------------------------------------------------------------------


def _ls(args: argparse.Namespace) -> int:
    listing = scan(_location(args))
    if args.json:
        print(json.dumps(listing.to_json(), indent=2))
    else:
        print("\n".join(_ls_lines(listing)))
    return 0


def _ls_lines(listing: StoreListing) -> list[str]:
    total = sum(a.size for a in listing.artifacts)
    lines = [f"store {listing.uri}: {len(listing.artifacts)} artifacts, {human(total)}"]
    if not listing.artifacts and not listing.leftovers:
        lines.append("  (empty; is this the right --store?)")
    for stage, arts in listing.by_stage().items():
        lines.append(f"{stage}: {len(arts)} artifacts, {human(sum(a.size for a in arts))}")
        lines += [f"  {a.key}  {human(a.size):>10}  {_when(a.created)}  {a.description}" for a in arts]
    if listing.leftovers:
        size = sum(x.size for x in listing.leftovers)
        lines.append(
            f"uncommitted leftovers: {len(listing.leftovers)}, {human(size)} "
            "(`finescope store gc` collects them)"
        )
        for x in listing.leftovers:
            state = "in use" if x.in_use else f"modified {_when(x.modified)}"
            lines.append(f"  {x.kind:<17} {x.stage}/{x.key}  {human(x.size):>10}  {state}  {x.path}")
    if listing.results:
        lines.append(
            f"prefect-results: {len(listing.results)} files, {human(sum(f.size for f in listing.results))}"
        )
    if listing.outputs:
        lines.append(
            f"outputs (exported runs, never collected): {len(listing.outputs)} files, "
            f"{human(sum(f.size for f in listing.outputs))}"
        )
    if listing.other:
        lines.append(f"other files: {len(listing.other)}, {human(sum(f.size for f in listing.other))}")
    return lines


def _when(epoch: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M", time.localtime(epoch)) if epoch else "?"


# --- plan -------------------------------------------------------------------------------------------


def _plan(args: argparse.Namespace) -> int:
    from finescope_core.config import load_config
    from finescope_core.finetune_choice import resolve_finetune
    from finescope_core.memplan_recover import run_memory_plan
    from flows.plan import plan

    cfg, choice = resolve_finetune(load_config(args.config, overrides(args)))
    result = plan(cfg, args.flow)
    peaks = run_memory_plan(cfg).by_stage()
    tunes = args.flow == "specialize"
    if args.json:
        method = {"finetune_method": choice.to_json()} if tunes else {}
        print(json.dumps({**result.to_json(), "predicted_peak_bytes": peaks, **method}, indent=2))
        return 0
    counts = result.counts()
    print(
        f"plan of `{COMMAND_OF[args.flow]}` on store {result.store}: {counts['reuse']} reused, "
        f"{counts['compute']} to compute, {counts['after']} after them; "
        "GB: a model stage's predicted peak memory"
    )
    if tunes:
        print(f"finetune.method: {choice.requested} -> {choice.method} (lr {choice.lr:g}; {choice.reason})")
    width = max(len(s.name) for s in result.stages)
    for s in result.stages:
        parts = (
            f"  ({sum(p.reused for p in s.parts)} of {len(s.parts)} parts stored)"
            if s.parts and s.status != "reuse"
            else ""
        )
        detail = s.key or (f"after {s.after}" if s.after else f"{len(s.parts)} shards")
        peak = f"{peaks[s.stage] / 1e9:7.2f} GB" if s.stage in peaks else " " * 10
        print(f"  {s.status:<8} {s.name:<{width}}  {peak}  {detail}{parts}")
    if counts["after"]:
        print(
            "stages `after X` run once X is computed: their keys hash X's content, so they are unknown "
            "until then (if X comes out byte-identical, they are reused)"
        )
    return 0


# --- rm ---------------------------------------------------------------------------------------------


def _rm(args: argparse.Namespace) -> int:
    store = _location(args)
    listing = scan(store)
    matches = artifacts_of(listing, args.stage, args.key)
    if not matches:
        stages = ", ".join(sorted({a.stage for a in listing.artifacts})) or "none"
        which = f" with a key starting {args.key!r}" if args.key is not None else ""
        raise ValueError(
            f"no artifact of stage {args.stage!r}{which} in {store.uri} (stages there: {stages}); "
            "`finescope store ls` lists them"
        )
    if args.key is not None and len(matches) > 1:
        keys = ", ".join(a.key for a in matches)
        raise ValueError(
            f"key prefix {args.key!r} matches {len(matches)} artifacts of {args.stage} ({keys}); "
            "give more characters, or leave out --key to delete them all"
        )
    size = sum(a.size for a in matches)
    verb = "deleting" if args.yes else "would delete"
    for a in matches:
        print(f"{verb} {a.uri}  {human(a.size)}  {a.description}")
    if not args.yes:
        print(f"dry run: nothing deleted; pass --yes to delete {len(matches)} artifacts ({human(size)})")
        return 1
    for a in matches:
        store.delete(a.stage, a.key)
    print(f"deleted {len(matches)} artifacts of {args.stage}, freed {human(size)}")
    return 0


# --- gc ---------------------------------------------------------------------------------------------


def _gc(args: argparse.Namespace) -> int:
    configs = _configs(args.config)
    store = _open(args.store, configs)
    keep = _reachable(store, configs, args.config) if configs else None
    garbage = find_garbage(
        store, scan(store), keep=keep, keep_days=args.keep_days, min_age_minutes=args.min_age
    )
    freed = collect(store, garbage.delete, args.min_age) if args.yes else 0
    if args.json:
        doc: dict[str, Any] = {
            "store": store.uri,
            "deleted" if args.yes else "would_delete": [vars(x) for x in garbage.delete],
            "kept": [vars(x) for x in garbage.kept],
            "size": garbage.size,
            "freed": freed,
        }
        print(json.dumps(doc, indent=2))
        return 0
    verb = "deleted" if args.yes else "would delete"
    results = [x for x in garbage.delete if x.kind == "prefect result"]
    for x in garbage.delete:
        if x.kind != "prefect result":
            print(f"{verb} {x.kind:<17} {x.where}  {human(x.size)}  ({x.reason})")
    if results:  # one line for what can be thousands of small files
        where = results[0].where.rsplit("/", 1)[0]
        print(
            f"{verb} {len(results)} prefect results in {where}  {human(sum(x.size for x in results))}  "
            f"({results[0].reason})"
        )
    for x in garbage.kept:
        print(f"kept {x.kind:<17} {x.where}  {human(x.size)}  ({x.reason})")
    if args.yes:
        print(f"freed {human(freed)} ({freed} bytes) from {store.uri}")
    else:
        print(f"dry run: would free {human(garbage.size)} ({garbage.size} bytes); pass --yes to delete")
    return 0


def _reachable(
    store: ArtifactStore, configs: list[FinescopeConfig], paths: list[Path]
) -> set[tuple[str, str]]:
    """Every (stage, key) some flow of some config would use: the union of their plans (planning is cheap)."""
    from flows.plan import plan

    keep: set[tuple[str, str]] = set()
    for cfg, path in zip(configs, paths, strict=True):
        on_store = cfg.model_copy(update={"store": store.uri})
        for flow in FLOW_CHOICES:
            try:
                keep |= plan(on_store, flow).keys()
            except (ValueError, OSError) as e:
                raise ValueError(
                    f"cannot plan the {flow} flow of {path} ({e}); fix it or leave it out; "
                    "nothing was deleted"
                ) from None
    return keep


# --- verify -----------------------------------------------------------------------------------------


def _verify(args: argparse.Namespace) -> int:
    """0: every artifact is as committed; 1: some are damaged (listed; a run recomputes them)."""
    store = _location(args)
    report = verify_store(store, full=not args.quick)
    if args.json:
        print(json.dumps(report.to_json(), indent=2))
        return 1 if report.damaged else 0
    how = "size and mtime" if args.quick else ("sha256" if store.is_local else "presence and size")
    for c in report.damaged:
        print(f"damaged {c.stage}/{c.key}  {c.uri}")
        print("\n".join(f"  {p}" for p in c.problems))
    print(
        f"store {store.uri}: {len(report.checked)} artifacts checked ({how}), {len(report.damaged)} damaged"
    )
    if report.damaged:
        print(
            "a run recomputes a damaged artifact when it needs it; "
            "`finescope store rm STAGE --key KEY --yes` deletes one now"
        )
    return 1 if report.damaged else 0
