"""Corpus embedding fanned out as mapped shard tasks vs one direct call, on threads and on Dask.

Three ways to write the same pooled activations of a synthetic corpus with a random model:
  direct   `write_activation_shards` in one call, no Prefect (the naive way, and the floor);
  threads  `flows.fanout.embed`: one Prefect task per shard, thread runner, one shared model;
  dask     the same tasks on a local Dask cluster of `--workers` single-threaded processes.
Each run uses a fresh store, so nothing is cached; the activations of every variant are compared
with the direct ones. Prefect runs against a temporary local API started by the benchmark.

    python bench/bench_fanout.py                       # 2,000 texts, shards of 250, 2 Dask workers
    python bench/bench_fanout.py --texts 8000 --hidden 512
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import tempfile
import time
from pathlib import Path

import torch

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")


def corpus(n: int, seed: int = 0) -> list[dict[str, str]]:
    rng = random.Random(seed)
    words = [
        "the",
        "a",
        "model",
        "layer",
        "token",
        "prune",
        "seed",
        "corpus",
        "math",
        "code",
        "science",
        "data",
        "sparse",
        "value",
    ]
    return [
        {"id": str(i), "text": " ".join(rng.choice(words) for _ in range(rng.randint(10, 40)))}
        for i in range(n)
    ]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--texts", type=int, default=2000)
    parser.add_argument("--shard-size", type=int, default=250)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--max-length", type=int, default=64)
    args = parser.parse_args()

    from prefect.testing.utilities import prefect_test_harness

    from finescope_core.activations import load_activations, write_activation_shards
    from finescope_core.config import FinescopeConfig
    from finescope_core.io import dump_jsonl
    from finescope_core.model import load_model
    from finescope_core.tiny import save_tiny
    from flows.fanout import embed
    from tasks.activations import activation_dirs
    from tasks.context import RunContext, open_store
    from tasks.data import data_task, model_task, read_inputs

    root = Path(tempfile.mkdtemp(prefix="bench-fanout-"))
    save_tiny(root / "model", "qwen3", hidden=args.hidden, layers=args.layers, intermediate=2 * args.hidden)
    with open(root / "corpus.jsonl", "w", encoding="utf-8") as f:
        dump_jsonl(corpus(args.texts), f)
    (root / "seeds.jsonl").write_text(json.dumps({"text": "seed"}) + "\n")
    layers = list(range(args.layers))

    def cfg(store: str, **orchestration) -> FinescopeConfig:
        return FinescopeConfig(
            model=str(root / "model"),
            seeds=[str(root / "seeds.jsonl")],
            corpus=[str(root / "corpus.jsonl")],
            store=store,
            device="cpu",
            orchestration={"persist_results": False, **orchestration},
            curate={
                "max_length": args.max_length,
                "batch_size": 16,
                "shard_size": args.shard_size,
                "final_size": 1,
            },
        )

    print(
        f"machine: {os.cpu_count()} CPUs ({platform.processor() or platform.machine()}), "
        f"torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads in this process"
    )
    print(
        f"{args.texts} texts, max_length {args.max_length}, "
        f"qwen3 hidden {args.hidden} x {args.layers} layers, "
        f"shards of {args.shard_size}"
    )

    model, tok = load_model(str(root / "model"), device="cpu", dtype=torch.float32)
    texts = [r["text"] for r in corpus(args.texts)]
    start = time.perf_counter()
    write_activation_shards(
        model,
        tok,
        texts,
        layers,
        root / "direct",
        indices=None,
        max_length=args.max_length,
        batch_size=16,
        skip_first=1,
        shard_size=args.shard_size,
    )
    direct_s = time.perf_counter() - start
    direct = load_activations(root / "direct")

    results = {}
    with prefect_test_harness(server_startup_timeout=120):
        from prefect import flow

        for name, orchestration in (
            ("threads", {"task_runner": "threads", "workers": args.workers}),
            ("dask", {"task_runner": "dask", "workers": args.workers}),
        ):
            c = cfg(str(root / f"store-{name}"), **orchestration)

            def timed_embed(c: FinescopeConfig = c):
                ctx = RunContext.of(c)
                corpus_m, _ = data_task(ctx, read_inputs(c))
                ref = model_task(ctx, c.model)
                begin = time.perf_counter()
                (acts,) = embed(c, ctx, ref, [corpus_m], layers, None)
                return time.perf_counter() - begin, acts

            run = flow(name=f"bench-{name}", validate_parameters=False)(timed_embed)
            seconds, acts = run()
            got = load_activations(activation_dirs(open_store(c), acts))
            results[name] = (seconds, (got - direct).abs().max().item())

    print(f"direct (one call, no Prefect)      {direct_s:7.2f} s")
    for name, (seconds, diff) in results.items():
        print(
            f"{name:8s} ({args.texts // args.shard_size} shard tasks)        {seconds:7.2f} s | "
            f"vs direct {seconds / direct_s:5.2f}x | max |diff| {diff:.1e}"
        )
    print("(dask includes starting the local cluster and loading the model in each worker)")


if __name__ == "__main__":
    main()
