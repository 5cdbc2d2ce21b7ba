"""Benchmark: does the specialised model recover on each domain, and does curated data beat random data?

    python bench/bench_specialize.py --out bench-specialize.md                 # 3 domains, ratios 0.1-0.4
    python bench/bench_specialize.py --quick --domains math --choose-on math   # smoke run, tiny sizes
    python bench/bench_specialize.py --grid recover.tokens=100000,400000 --grid finetune.lr=1e-4,2e-4

Three domains are built at run time from installed packages (`bench/specialize_data.py`): `math` and
`code` (the demo's GSM8K and HumanEval domains, instruction records) and `text` (software-licence prose
as plain `text` records in a corpus of other prose). For each domain and ratio the real `finescope run`
runs with `evaluate.baselines: [random]` and the domain's held-out eval file, so base, pruned and tuned
are scored for curated and random data on the same items; the table reads metrics.json: the domain's
primary perplexity (chat perplexity for instruction domains, raw-text perplexity for text; metrics.json's
`primary` when it names one), general perplexity, and the paired ratios tuned / base and tuned (curated) /
tuned (random) with their bootstrap intervals.

Settings are chosen on one domain only (`--choose-on`): every point of the `--grid` runs there at
`--choose-ratio`, the lowest tuned primary perplexity wins, and every domain is then reported at the
winner's settings (the choosing domain is marked: its numbers are not held out from the choice). All
runs share one artifact store under `--work`, so curation and teacher stages are reused across ratios
and grid points. `--set FIELD=VALUE` passes any config field to every run (`--set recover.tokens=1e6`).
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import os
import platform
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml

try:  # run as `python bench/bench_specialize.py`, or imported as `bench.bench_specialize`
    from specialize_data import DOMAINS, DomainData, build_domains
except ImportError:
    from bench.specialize_data import DOMAINS, DomainData, build_domains

from finescope_core.config import ConfigError, load_config
from finescope_core.config.loading import resolve_config_paths
from finescope_core.config_guard import safe_load

ROOT = Path(__file__).resolve().parents[1]
PRIMARY = {"chat": "chat_perplexity", "text": "perplexity"}
"""The primary metric by domain kind, when metrics.json names none."""
DEFAULT_GRID = ("finetune.kd_weight=0.5,0.9", "finetune.lr=2e-4,5e-4")
QUICK_GRID = ("finetune.kd_weight=0.5,0.9",)
QUICK: dict[str, Any] = {
    "curate.final_size": 32,
    "curate.top_m": 32,
    "curate.num_layers": 4,
    "curate.reference_size": 32,
    "curate.sae.steps": 200,
    "prune.max_length": 64,
    "teacher.max_new_tokens": 48,
    "finetune.epochs": 1,
    "finetune.max_length": 128,
    "evaluate.max_examples": 40,
    "evaluate.general_items": 40,
    "evaluate.max_length": 128,
}
"""`--quick`: tiny sizes for a smoke run (numbers too noisy to read)."""
QUICK_CAPS = {"gsm8k": 120, "chat": 12, "gpqa": 40, "humaneval": 60}
"""`--quick`: the demo corpus's records per source (smaller corpus, faster activations)."""


@dataclass(frozen=True)
class RunResult:
    domain: str
    settings: tuple[tuple[str, Any], ...]
    ratio: float
    metrics: dict[str, Any]
    seconds: float


def parse_assignment(text: str, flag: str) -> tuple[str, list[Any]]:
    """`FIELD=V1,V2` -> (FIELD, [V1, V2]) with each value read as YAML (numbers stay numbers)."""
    key, sep, values = text.partition("=")
    if not sep or not key or not values:
        raise SystemExit(f"{flag} {text!r}: write FIELD=VALUE[,VALUE...], e.g. finetune.lr=1e-4,2e-4")
    return key.strip(), [scalar(v) for v in values.split(",")]


def scalar(text: str) -> Any:
    """A number when `text` is one (`1e-4` included, which YAML 1.1 reads as a string), else YAML."""
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return yaml.safe_load(text)


def grid_points(specs: list[str]) -> list[dict[str, Any]]:
    """Every combination of the `--grid` values, in order."""
    axes = [parse_assignment(s, "--grid") for s in specs]
    return [
        dict(zip([k for k, _ in axes], combo, strict=True))
        for combo in itertools.product(*[v for _, v in axes])
    ]


def check_settings(config: Path, overrides: dict[str, Any]) -> None:
    """Refuse an unknown or invalid field before any run (e.g. `recover.tokens` on a checkout without it)."""
    try:
        load_config(config, {"seeds": ["unused.jsonl"], "corpus": ["unused.jsonl"], **overrides})
    except ConfigError as e:
        raise SystemExit(f"--grid / --set / --quick settings are not valid for {config}: {e}") from None


def write_run_config(base: Path, overrides: dict[str, Any], path: Path) -> Path:
    """The base config with its relative paths made absolute and the dotted `overrides` set, written to
    `path` (a YAML, not command-line options: an option such as `--teacher.max_new_tokens` only offers
    its named choices, while the config file takes any value the field does)."""
    raw = safe_load(base.read_text()) or {}
    resolve_config_paths(raw, base.parent)
    for dotted, value in overrides.items():
        *parents, leaf = dotted.split(".")
        node = raw
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def run_one(data: DomainData, settings: dict[str, Any], ratio: float, args: argparse.Namespace) -> RunResult:
    """One `finescope run` of a domain at a ratio and settings; its metrics.json."""
    # The settings' hash names the run (its config YAML beside it spells them out).
    tag = hashlib.sha256(json.dumps(sorted(settings.items())).encode()).hexdigest()[:10]
    out = args.work / "runs" / data.name / f"{tag}-r{ratio:g}"
    overrides = {
        "seeds": [str(data.seeds)],
        "corpus": [str(data.corpus)],
        "store": str(args.work / "store"),
        "name": f"bench-{data.name}",
        "evaluate.eval_file": str(data.eval_file),
        "evaluate.baselines": ["random"],
        "prune.ratio": ratio,
        **settings,
    }
    out.mkdir(parents=True, exist_ok=True)
    config = write_run_config(args.config, overrides, out.parent / f"{out.name}.yaml")
    cmd = [sys.executable, "-m", "flows.cli", "run", "--config", str(config), "--out", str(out)]
    log = out.parent / f"{out.name}.log"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    print(f"[{data.name}] ratio {ratio:g} {settings or ''} -> {out} (log {log})", flush=True)
    start = time.perf_counter()
    with log.open("w") as f:
        rc = subprocess.run(
            cmd, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT, check=False
        ).returncode
    seconds = time.perf_counter() - start
    if rc != 0:
        tail = log.read_text(errors="replace").splitlines()[-20:]
        raise SystemExit(
            f"finescope run failed (exit {rc}) for {data.name} at ratio {ratio:g}:\n" + "\n".join(tail)
        )
    metrics = json.loads((out / "metrics.json").read_text())
    print(f"[{data.name}] done in {seconds:.0f} s", flush=True)
    return RunResult(data.name, tuple(sorted(settings.items())), ratio, metrics, seconds)


def primary_metric(metrics: dict[str, Any], kind: str) -> str:
    """metrics.json's `primary` (top level or under `evaluation`) when it names one, else by record kind."""
    named = metrics.get("primary") or (metrics.get("evaluation") or {}).get("primary")
    return named if isinstance(named, str) else PRIMARY[kind]


def comparison(metrics: dict[str, Any], a: str, b: str, metric: str) -> dict[str, Any] | None:
    for c in metrics.get("comparisons", []):
        if c["a"] == a and c["b"] == b and c["metric"] == metric:
            return dict(c)
    return None


def value(metrics: dict[str, Any], model: str, metric: str) -> float | None:
    ci = ((metrics["models"].get(model) or {}).get("ci") or {}).get(metric)
    return None if ci is None else float(ci["value"])


def fmt(x: float | None) -> str:
    return "–" if x is None else f"{x:.2f}"


def fmt_ratio(c: dict[str, Any] | None) -> str:
    if c is None:
        return "–"
    mark = "" if c["clear"] else " (overlaps 1)"
    return f"{c['value']:.2f} [{c['low']:.2f}, {c['high']:.2f}]{mark}"


def domain_table(data: DomainData, results: list[RunResult], chosen_here: bool) -> str:
    """One domain's markdown table: a row per ratio."""
    metric = primary_metric(results[0].metrics, data.kind)
    title = f"### {data.name} ({data.kind} records; primary metric `{metric}`)"
    if chosen_here:
        title += " — settings chosen on this domain"
    lines = [
        title,
        "",
        "| ratio | base | pruned | tuned | pruned-random | tuned-random "
        "| general base / tuned / tuned-random | tuned / base | tuned vs tuned-random | n | seconds |",
        "|---:|---:|---:|---:|---:|---:|---|---|---|---:|---:|",
    ]
    for r in sorted(results, key=lambda r: r.ratio):
        m = r.metrics
        tb = comparison(m, "tuned", "base", metric)
        tr = comparison(m, "tuned", "tuned-random", metric)
        general = " / ".join(
            fmt(value(m, x, "general_perplexity")) for x in ("base", "tuned", "tuned-random")
        )
        cells = [
            fmt(value(m, x, metric)) for x in ("base", "pruned", "tuned", "pruned-random", "tuned-random")
        ]
        n = (tb or tr or {}).get("n", "–")
        lines.append(
            f"| {r.ratio:g} | "
            + " | ".join(cells)
            + f" | {general} | {fmt_ratio(tb)} | {fmt_ratio(tr)} | {n} "
            f"| {r.seconds:.0f} |"
        )
    return "\n".join(lines)


def machine() -> str:
    return (
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs visible, torch "
        f"{torch.__version__} with {torch.get_num_threads()} threads, "
        + (f"CUDA {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else "no GPU")
    )


def choose(
    data: DomainData, points: list[dict[str, Any]], args: argparse.Namespace
) -> tuple[dict[str, Any], list[str], list[RunResult]]:
    """Run every grid point on the choosing domain; (the winner, the grid's table lines, the runs)."""
    runs = [run_one(data, p, args.choose_ratio, args) for p in points]
    metric = primary_metric(runs[0].metrics, data.kind)
    scored = [(value(r.metrics, "tuned", metric), p, r) for p, r in zip(points, runs, strict=True)]
    best = min(scored, key=lambda s: float("inf") if s[0] is None else s[0])
    lines = [
        f"### grid on {data.name} at ratio {args.choose_ratio:g} (tuned `{metric}`, lower is better)",
        "",
        "| settings | tuned | tuned / base |",
        "|---|---:|---|",
    ]
    for v, p, r in scored:
        mark = " **chosen**" if p is best[1] else ""
        shown = ", ".join(f"{k}={v}" for k, v in p.items()) or "defaults"
        lines.append(
            f"| {shown}{mark} | {fmt(v)} | {fmt_ratio(comparison(r.metrics, 'tuned', 'base', metric))} |"
        )
    return best[1], lines, runs


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--domains", default=",".join(DOMAINS), help=f"comma-separated, of {', '.join(DOMAINS)}")
    ap.add_argument("--choose-on", default="math", choices=DOMAINS, help="the domain the grid runs on")
    ap.add_argument(
        "--grid", action="append", metavar="FIELD=V1,V2", help="a setting's candidate values; repeat"
    )
    ap.add_argument("--choose-ratio", type=float, default=0.3, help="pruning ratio of the grid runs")
    ap.add_argument(
        "--ratios", default=None, help="reported pruning ratios (default 0.1,0.2,0.3,0.4; quick 0.3)"
    )
    ap.add_argument(
        "--set", action="append", default=[], metavar="FIELD=VALUE", help="any config field, every run"
    )
    ap.add_argument("--config", type=Path, default=ROOT / "configs" / "demo.yaml", help="base config")
    ap.add_argument("--work", type=Path, default=Path("out/bench-specialize"), help="data, store and runs")
    ap.add_argument("--general", type=int, default=None, help="general paragraphs of the text corpus (1200)")
    ap.add_argument(
        "--quick",
        action="store_true",
        help="smoke run: tiny sizes, a smaller demo corpus, ratio 0.3, a 2-point grid",
    )
    ap.add_argument("--out", type=Path, help="also write the markdown tables here")
    args = ap.parse_args(argv)
    args.work = args.work.resolve()
    args.config = args.config.resolve()
    args.domains = [d.strip() for d in args.domains.split(",") if d.strip()]
    unknown = sorted(set(args.domains) - set(DOMAINS))
    if unknown:
        ap.error(f"--domains: unknown {unknown}; choose from {', '.join(DOMAINS)}")
    ratios = args.ratios or ("0.3" if args.quick else "0.1,0.2,0.3,0.4")
    try:
        args.ratios = [float(r) for r in ratios.split(",")]
    except ValueError:
        ap.error(f"--ratios {ratios!r}: give numbers, e.g. 0.1,0.3")
    if not all(0 < r < 1 for r in [*args.ratios, args.choose_ratio]):
        ap.error("--ratios and --choose-ratio must lie strictly between 0 and 1")
    args.grid = args.grid or list(QUICK_GRID if args.quick else DEFAULT_GRID)
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    fixed = dict(QUICK) if args.quick else {}
    for spec in args.set:
        key, values = parse_assignment(spec, "--set")
        fixed[key] = values[0] if len(values) == 1 else values
    points = [{**fixed, **p} for p in grid_points(args.grid)]
    for p in points:
        check_settings(args.config, p)
    start = time.perf_counter()
    names = list(dict.fromkeys([args.choose_on, *args.domains]))
    general = args.general or (300 if args.quick else 1200)
    data = build_domains(
        args.work / "data", names, general=general, per_source_cap=QUICK_CAPS if args.quick else None
    )
    chosen, grid_lines, grid_runs = choose(data[args.choose_on], points, args)
    done = {(r.domain, r.settings, r.ratio): r for r in grid_runs}
    tables = [f"Machine: {machine()}.", "", *grid_lines]
    for name in args.domains:
        results = []
        for ratio in args.ratios:
            key = (name, tuple(sorted(chosen.items())), ratio)
            results.append(done.get(key) or run_one(data[name], chosen, ratio, args))
        tables += ["", domain_table(data[name], results, name == args.choose_on)]
    shown = ", ".join(f"{k}={v}" for k, v in chosen.items() if k not in QUICK or not args.quick)
    tables += [
        "",
        f"Settings chosen on `{args.choose_on}`: {shown or 'the config defaults'}"
        + (" (with `--quick` sizes)" if args.quick else "")
        + f". Wall time {time.perf_counter() - start:.0f} s.",
    ]
    text = "\n".join(tables) + "\n"
    print(text)
    if args.out:
        args.out.write_text(text)


if __name__ == "__main__":
    main()
