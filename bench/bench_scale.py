"""How `finescope curate` scales with the corpus: seconds per 1k records, peak RSS and stored bytes
per record.

A synthetic corpus of short records (a planted topic of 1 % among background text) goes through the
whole `curate` flow with a tiny random model, once per size, each in a fresh process and a fresh store:
saliency, activations, SAE training, sparse codes, streaming retrieval, the curated set. The flow runs
exactly as a user runs it (`finescope curate`), in a child process whose own peak RSS is reported.
Then, on the largest size that `--dense-max` allows, the streaming sparse retrieval is timed against
the dense one (every code decoded into one [N, d_sae] matrix per layer, the way curation worked before
sparse codes) on the same stored codes, with the peak memory of each.

    python bench/bench_scale.py                               # 10k, 100k records
    python bench/bench_scale.py --sizes 10000,100000,1000000  # the issue's three sizes (~1 h on 2 cores)

Flat is the goal: seconds per 1k records (the marginal cost between sizes, and each stage's), and bytes
per record, should not grow with the size; fixed costs (Prefect's start, SAE training) dominate small runs.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
BACKGROUND = [
    "the",
    "a",
    "of",
    "and",
    "to",
    "in",
    "is",
    "was",
    "for",
    "on",
    "with",
    "as",
    "by",
    "at",
    "from",
    "that",
    "this",
    "it",
    "be",
    "are",
    "or",
    "an",
    "which",
    "city",
    "river",
    "house",
    "music",
    "film",
    "team",
    "year",
    "people",
    "school",
    "road",
    "market",
    "garden",
    "window",
    "story",
]
TOPIC = [
    "integral",
    "derivative",
    "matrix",
    "theorem",
    "prime",
    "equation",
    "vector",
    "algebra",
    "proof",
    "lemma",
]


def write_corpus(path: Path, n: int, seed: int = 0) -> None:
    """n short records (8-24 words); every 100th is on the planted topic (ids t-...)."""
    rng = random.Random(seed)
    with open(path, "w", encoding="utf-8") as f:
        for i in range(n):
            on_topic = i % 100 == 0
            words = TOPIC if on_topic else BACKGROUND
            text = " ".join(rng.choice(words) for _ in range(rng.randint(8, 24)))
            f.write(json.dumps({"id": f"{'t' if on_topic else 'b'}-{i}", "text": text}) + "\n")


def write_seeds(path: Path, n: int = 10, seed: int = 1) -> None:
    rng = random.Random(seed)
    with open(path, "w", encoding="utf-8") as f:
        for i in range(n):
            f.write(
                json.dumps({"id": f"seed-{i}", "text": " ".join(rng.choice(TOPIC) for _ in range(16))}) + "\n"
            )


def store_bytes(store: Path) -> dict[str, int]:
    """Bytes per stage directory of a local store (committed artifacts only)."""
    out: dict[str, int] = {}
    for stage in sorted(p for p in store.iterdir() if p.is_dir() and not p.name.startswith(".")):
        out[stage.name] = sum(f.stat().st_size for f in stage.rglob("*") if f.is_file())
    return out


def stage_seconds(store: Path) -> dict[str, float]:
    """Seconds each stage took, summed over its artifacts (every shard), from the store's markers."""
    out: dict[str, float] = {}
    for marker in sorted(store.glob("*/*/_COMPLETE.json")):
        stage = marker.parent.parent.name
        if stage in ("corpus", "seeds", "models", "activations", "sae"):  # inputs, and gathers of the shards
            continue
        out[stage] = out.get(stage, 0.0) + float(json.loads(marker.read_text()).get("seconds", 0.0))
    return out


def child(config: Path, out: Path) -> None:
    """Run `finescope curate` in this process and write its wall time and peak RSS to `out`."""
    sys.path.insert(0, str(ROOT))  # this checkout, not whichever one is installed
    from flows.cli import main

    start = time.perf_counter()
    rc = main(["curate", "--config", str(config)])
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB
    out.write_text(json.dumps({"rc": rc, "seconds": seconds, "peak_rss": peak}))


def run_size(work: Path, model: Path, n: int, args: argparse.Namespace) -> dict[str, Any]:
    case = work / f"n{n}"
    case.mkdir()
    write_corpus(case / "corpus.jsonl", n)
    write_seeds(case / "seeds.jsonl")
    cfg = {
        "model": str(model),
        "seeds": [str(case / "seeds.jsonl")],
        "corpus": [str(case / "corpus.jsonl")],
        "store": str(case / "store"),
        "device": "cpu",
        "output": str(case / "out"),
        "curate": {
            "k_act": min(128, args.hidden),
            "final_size": 100,
            "top_m": 100,
            "max_length": 32,
            "batch_size": 64,
            "reference_size": 64,
            "code_k": args.code_k if args.code_k == "all" else int(args.code_k),
            "code_dtype": args.code_dtype,
            "sae": {"d_sae": args.d_sae, "steps": args.sae_steps, "kind": args.sae_kind},
        },
    }
    (case / "config.yaml").write_text(json.dumps(cfg))  # JSON is YAML
    result = case / "result.json"
    env = {**os.environ, "PREFECT_HOME": str(case / "prefect"), "PREFECT_LOGGING_LEVEL": "WARNING"}
    proc = subprocess.run(
        [sys.executable, __file__, "--child", str(case / "config.yaml"), str(result)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
    )
    if proc.returncode != 0 or not result.is_file() or json.loads(result.read_text())["rc"] != 0:
        sys.stderr.write(proc.stdout[-4000:] + proc.stderr[-4000:])
        raise SystemExit(f"curate on {n} records failed (rc {proc.returncode})")
    facts = json.loads(result.read_text())
    stored = store_bytes(case / "store")
    derived = {k: v for k, v in stored.items() if k not in ("corpus", "seeds", "models")}
    curated = [json.loads(line) for line in (case / "out" / "curated.jsonl").open()]
    precision = sum(r["id"].startswith("t-") for r in curated) / max(1, len(curated))
    facts["stage_seconds"] = stage_seconds(case / "store")
    return {
        "n": n,
        **facts,
        "stored": stored,
        "derived_bytes": sum(derived.values()),
        "precision": precision,
        "codes_bytes": stored.get("sae-codes", 0),
        "case": case,
    }


def dense_vs_streaming(case: Path, seeds: int = 10, m: int = 100) -> dict[str, float]:
    """Streaming sparse retrieval vs the dense matrix on one run's stored codes: seconds and peak bytes.

    The seeds are the codes of the first `seeds` planted records; both paths search the same codes.
    """
    import tracemalloc

    import numpy as np

    from finescope_core.retrieval import topm_max_over_seeds
    from finescope_core.retrieval.stream import stream_topm
    from finescope_core.sae.codes import SparseCodeSource, dense_layer

    run = json.loads((case / "out" / "run.json").read_text())
    parts = run["stages"]["codes"]["parts"]
    dirs = [case / "store" / "sae-codes" / p["key"] for p in parts]
    source = SparseCodeSource(dirs)
    rows = [100 * i for i in range(seeds)]
    seed_codes = {layer: c[np.linalg.norm(c, axis=1) > 0] for layer, c in source.gather(rows).items()}
    out: dict[str, float] = {}

    tracemalloc.start()
    t = time.perf_counter()
    for i, layer in enumerate(source.layers):
        topm_max_over_seeds(dense_layer(dirs, i), seed_codes[layer], m)
    out["dense_s"], out["dense_peak"] = time.perf_counter() - t, tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()

    tracemalloc.start()
    t = time.perf_counter()
    stream_topm(source, seed_codes, m)
    out["stream_s"], out["stream_peak"] = time.perf_counter() - t, tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return out


def main() -> None:
    if len(sys.argv) == 4 and sys.argv[1] == "--child":
        child(Path(sys.argv[2]), Path(sys.argv[3]))
        return
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sizes", default="10000,100000", help="comma-separated corpus sizes")
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--d-sae", type=int, default=1024)
    parser.add_argument(
        "--sae-kind",
        default="topk",
        choices=("relu", "topk"),
        help="curate.sae.kind (default: topk, the config default)",
    )
    parser.add_argument("--sae-steps", type=int, default=300)
    parser.add_argument(
        "--code-k", default="all", help="curate.code_k: all (the default: every nonzero latent) or a number"
    )
    parser.add_argument("--code-dtype", default="float16", choices=("float16", "float32"))
    parser.add_argument(
        "--dense-max", type=int, default=100_000, help="largest size to time the dense retrieval on"
    )
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT))
    import torch

    from finescope_core.tiny import save_tiny

    sizes = [int(s) for s in args.sizes.split(",")]
    work = Path(tempfile.mkdtemp(prefix="bench-scale-"))
    model = save_tiny(
        work / "model",
        "llama",
        hidden=args.hidden,
        layers=args.layers,
        heads=4,
        kv_heads=2,
        intermediate=2 * args.hidden,
    )
    print(
        f"machine: {os.cpu_count()} CPUs ({platform.processor() or platform.machine()}), "
        f"torch {torch.__version__}"
    )
    print(
        f"tiny llama hidden {args.hidden} x {args.layers} layers; SAE {args.sae_kind} d_sae {args.d_sae}, "
        f"{args.sae_steps} steps; codes: {args.code_k} latents, {args.code_dtype}; "
        "records of 8-24 words, 1 % on a "
        "planted topic; default config otherwise"
    )
    print(
        f"\n{'records':>9} {'seconds':>8} {'s/1k':>6} {'peak RSS':>9} "
        f"{'stored B/rec':>12} {'codes B/rec':>11} "
        f"{'p@100':>6}"
    )
    rows = []
    try:
        for n in sizes:
            r = run_size(work, model, n, args)
            rows.append(r)
            print(
                f"{n:>9} {r['seconds']:>8.1f} {1000 * r['seconds'] / n:>6.2f} "
                f"{r['peak_rss'] / 2**30:>7.2f}GB "
                f"{r['derived_bytes'] / n:>12.0f} {r['codes_bytes'] / n:>11.0f} {r['precision']:>6.2f}",
                flush=True,
            )
        for a, b in zip(rows, rows[1:], strict=False):
            marginal = 1000 * (b["seconds"] - a["seconds"]) / (b["n"] - a["n"])
            print(f"marginal cost {a['n']} -> {b['n']}: {marginal:.3f} s per 1k records")
        names = list(rows[-1]["stage_seconds"])
        print(
            "\nseconds per 1k records by stage "
            "(every shard's artifact summed; the whole run's includes Prefect's start):"
        )
        print(f"{'records':>9} " + " ".join(f"{k[:16]:>16}" for k in names))
        for r in rows:
            print(
                f"{r['n']:>9} "
                + " ".join(f"{1000 * r['stage_seconds'].get(k, 0) / r['n']:>16.3f}" for k in names)
            )
        base = rows[0]
        for r in rows[1:]:
            per = (r["seconds"] / r["n"]) / (base["seconds"] / base["n"])
            print(
                f"{r['n']} vs {base['n']}: s/1k x{per:.2f}, "
                f"peak RSS x{r['peak_rss'] / base['peak_rss']:.2f}, "
                f"stored B/rec x{(r['derived_bytes'] / r['n']) / (base['derived_bytes'] / base['n']):.2f}"
            )
        print("\nstored bytes per record by stage (largest size):")
        last = rows[-1]
        for stage, b in last["stored"].items():
            print(f"  {stage:<20} {b / last['n']:>10.1f}")
        dense = [r for r in rows if r["n"] <= args.dense_max]
        if dense:
            r = dense[-1]
            d = dense_vs_streaming(r["case"])
            print(
                f"\nretrieval on {r['n']} stored codes ({args.layers} layers, 10 seeds, top-100): "
                f"dense {d['dense_s']:.2f}s "
                f"peak {d['dense_peak'] / 2**20:.0f} MiB; "
                f"streaming {d['stream_s']:.2f}s peak {d['stream_peak'] / 2**20:.0f} MiB "
                f"(time x{d['stream_s'] / d['dense_s']:.2f}, "
                f"memory x{d['stream_peak'] / d['dense_peak']:.3f})"
            )
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
        else:
            print(f"work directory: {work}")


if __name__ == "__main__":
    main()
