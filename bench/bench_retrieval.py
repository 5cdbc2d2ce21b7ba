"""Benchmark: exact top-M by max-over-seeds cosine with FAISS (union of per-seed lists) vs brute force.

    python bench/bench_retrieval.py                 # 1M codes, d=256, 10 seeds, top-100
    python bench/bench_retrieval.py --n 100000      # smaller corpus

The corpus imitates SAE codes: non-negative, clustered, sparse-ish. The seeds are noisy copies of
rows from one cluster; those source rows are excluded, as the pipeline excludes seed copies.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from collections.abc import Callable
from typing import Any

import faiss
import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run as a plain script
from finescope_core.retrieval import brute_force_topm, topm_max_over_seeds


def make_codes(n: int, d: int, clusters: int, seed: int) -> np.ndarray:
    """[n, d] float32 ReLU codes around `clusters` centres, built in chunks to bound memory."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((clusters, d), dtype=np.float32)
    out = np.empty((n, d), dtype=np.float32)
    step = 65536
    for start in range(0, n, step):
        stop = min(n, start + step)
        labels = rng.integers(0, clusters, size=stop - start)
        noise = rng.standard_normal((stop - start, d), dtype=np.float32)
        np.maximum(centres[labels] + noise, 0.0, out=out[start:stop])
    return out


def naive_numpy(
    corpus: np.ndarray, seeds: np.ndarray, m: int, exclude: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """What one writes by hand: normalise, full [N, S] matmul, max, argpartition, sort."""
    c = corpus / np.sqrt(np.einsum("ij,ij->i", corpus, corpus))[:, None]
    s = seeds / np.linalg.norm(seeds, axis=1, keepdims=True)
    scores = (c @ s.T).max(axis=1)
    scores[exclude] = -np.inf
    top = np.argpartition(-scores, m)[:m]
    top = top[np.lexsort((top, -scores[top]))]
    return top, scores[top]


def naive_torch(
    corpus: np.ndarray, seeds: np.ndarray, m: int, exclude: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """The torch version: F.normalize, mm, amax, topk."""
    c = torch.nn.functional.normalize(torch.from_numpy(corpus), dim=1)
    s = torch.nn.functional.normalize(torch.from_numpy(seeds), dim=1)
    scores = (c @ s.T).amax(dim=1)
    scores[torch.from_numpy(exclude)] = -torch.inf
    values, idx = torch.topk(scores, m)
    return idx.numpy(), values.numpy()


def timed(fn: Callable[[], Any], repeat: int) -> tuple[float, Any]:
    """Best wall time of `repeat` runs, and the last result."""
    best, out = float("inf"), None
    for _ in range(repeat):
        start = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - start)
    return best, out


def compare(name: str, got: tuple[np.ndarray, np.ndarray], ref: tuple[np.ndarray, np.ndarray]) -> str:
    same_order = np.array_equal(got[0], ref[0])
    same_set = set(got[0].tolist()) == set(ref[0].tolist())
    diff = float(np.max(np.abs(np.asarray(got[1], np.float64) - ref[1]))) if same_set else float("nan")
    return f"{name}: same rows in same order={same_order}, same set={same_set}, max |score diff|={diff:.2e}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=1_000_000, help="corpus rows")
    p.add_argument("--d", type=int, default=256, help="code dimension")
    p.add_argument("--seeds", type=int, default=10)
    p.add_argument("--m", type=int, default=100)
    p.add_argument("--clusters", type=int, default=1000)
    p.add_argument("--repeat", type=int, default=2, help="timing runs per method (best is reported)")
    p.add_argument("--threads", type=int, default=None, help="FAISS threads (default: all available)")
    args = p.parse_args()

    print(
        f"machine: {platform.processor() or platform.machine()}, cpus={os.cpu_count()}, "
        f"torch {torch.__version__} "
        f"(threads {torch.get_num_threads()}), faiss {faiss.__version__}, numpy {np.__version__}, device=cpu"
    )
    print(
        f"corpus N={args.n:,} d={args.d} ({args.n * args.d * 4 / 2**30:.2f} GiB float32), "
        f"seeds S={args.seeds}, top-m={args.m}"
    )
    t0 = time.perf_counter()
    corpus = make_codes(args.n, args.d, args.clusters, seed=0)
    rng = np.random.default_rng(1)
    source = rng.choice(np.flatnonzero(np.all(corpus[:5000] >= 0, axis=1)), args.seeds, replace=False)
    seeds = corpus[source] + 0.1 * np.abs(rng.standard_normal((args.seeds, args.d), dtype=np.float32))
    exclude = np.zeros(args.n, dtype=bool)
    exclude[source] = True
    print(f"data generated in {time.perf_counter() - t0:.1f}s")

    runs = {
        "faiss flat (union of per-seed top-k, certified)": lambda: topm_max_over_seeds(
            corpus, seeds, args.m, exclude=exclude, threads=args.threads
        ),
        "brute_force_topm (numpy full matrix, certified)": lambda: brute_force_topm(
            corpus, seeds, args.m, exclude=exclude
        ),
        "naive numpy (matmul + argpartition)": lambda: naive_numpy(corpus, seeds, args.m, exclude),
        "naive torch (mm + topk)": lambda: naive_torch(corpus, seeds, args.m, exclude),
    }
    times, results = {}, {}
    for name, fn in runs.items():
        times[name], results[name] = timed(fn, args.repeat)
    flat_name = next(iter(runs))
    exact = results[flat_name]
    print("\nexact methods (best of", args.repeat, "runs; each includes L2-normalising the corpus):")
    for name, t in times.items():
        print(f"  {name:50s} {t:7.3f} s   time / faiss-flat time = {t / times[flat_name]:.2f}")
    for name in list(runs)[1:]:
        print("  " + compare(name, results[name], exact))


if __name__ == "__main__":
    main()
