"""Benchmark: corpus embedding with `extract_pooled` (all layers in one pass, stop early, K coordinates)
vs a bare `torch.no_grad()` full forward (with lm_head) of the same batches.

    python bench/bench_embedding.py                         # random 10-layer Llama, hidden 256
    python bench/bench_embedding.py --model default         # SmolLM2-135M (30 layers)
    python bench/bench_embedding.py --layers 0,4,8          # a shallower deepest layer: more is skipped
    python bench/bench_embedding.py --threads 1             # steadier timings on a shared CPU

By default the hooked layers are 8 evenly spaced ones ending at the last layer (the curate default),
so stopping early only skips the final norm and lm_head; `--layers` shows shallower selections.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run as a plain script
from bench.bench_saliency import build, make_texts
from finescope_core.activations import extract_pooled
from finescope_core.batching import iter_text_batches
from finescope_core.model import resolve_arch


def timed(fn: Callable[[], object], repeats: int) -> float:
    """Median wall time of `repeats` calls, after one warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=["tiny", "default"], default="tiny")
    p.add_argument(
        "--layers", type=str, default="", help="comma-separated hooked layers (default: 8 evenly spaced)"
    )
    p.add_argument("--depth", type=int, default=10, help="tiny model depth")
    p.add_argument("--hidden", type=int, default=256, help="tiny model width")
    p.add_argument("--texts", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--k", type=int, default=128, help="coordinates kept per layer")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    model, tok, what = build(argparse.Namespace(model=args.model, layers=args.depth, hidden=args.hidden))
    arch = resolve_arch(model)
    if args.layers:
        layers = [int(x) for x in args.layers.split(",")]
    else:
        layers = sorted({round(x) for x in np.linspace(0, arch.num_layers - 1, 8)})
    k = min(args.k, arch.hidden_size)
    indices = torch.stack(
        [
            torch.randperm(arch.hidden_size, generator=torch.Generator().manual_seed(i))[:k]
            for i in range(len(layers))
        ]
    )
    texts = make_texts(args.texts, words=args.seq_len)
    batches = list(iter_text_batches(tok, texts, max_length=args.seq_len, batch_size=args.batch_size))

    def ours() -> None:
        for _ in extract_pooled(model, batches, layers, skip_first=1, indices=indices):
            pass

    def bare() -> None:
        with torch.no_grad():
            for b in batches:
                model(input_ids=b.input_ids, attention_mask=b.attention_mask)

    t_ours, t_bare = timed(ours, args.repeats), timed(bare, args.repeats)
    print(
        f"machine: {os.cpu_count()} cpus ({platform.processor() or platform.machine()}), "
        f"torch {torch.__version__} "
        f"({torch.get_num_threads()} threads), device cpu"
    )
    print(
        f"model: {what} ({model.config._attn_implementation} attention), L={arch.num_layers}; "
        f"{len(texts)} texts, batch {args.batch_size}, {args.seq_len} tokens; hooked layers {layers}, k={k}"
    )
    print(
        f"extract_pooled (stop after layer {max(layers)}, {len(layers)} layers, k coords): "
        f"{len(texts) / t_ours:8.1f} texts/s"
    )
    print(f"bare no_grad full forward incl. lm_head                 : {len(texts) / t_bare:8.1f} texts/s")
    print(f"throughput ratio (ours / bare)                          : {t_bare / t_ours:8.2f}x")


if __name__ == "__main__":
    main()
