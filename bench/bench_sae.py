"""Train L per-layer SAEs as one batched module vs a Python loop of L separate SAEs.

Both variants run `train_saes` with the same config, so every layer gets the same number of
optimiser steps and the same minibatches; the loop trains one layer per call (as a per-layer
fan-out would), the batched run trains all layers in one call. Runs alternate and the best of
`--repeats` is reported, as wall time and as process CPU time; on a shared machine the CPU time
is the steadier of the two (other processes stretch wall time, not our CPU time). With more than
one thread on a busy machine, OpenMP threads that wait on each other inflate both: use --threads 1
there.

    python bench/bench_sae.py                 # L=8, k=128, d_sae=1024, N=4000, 300 steps
    python bench/bench_sae.py --steps 1500 --n 20000
"""

from __future__ import annotations

import argparse
import os
import platform
import time

import torch

from finescope_core.config import SAEConfig
from finescope_core.sae import BatchedSAE, train_saes


def synthetic_acts(n: int, layers: int, k: int, seed: int = 0) -> torch.Tensor:
    """Sparse codes over a random dictionary per layer plus a few massive coordinates. [n, L, k]"""
    gen = torch.Generator().manual_seed(seed)
    atoms = 4 * k
    out = []
    for _ in range(layers):
        dictionary = torch.randn(atoms, k, generator=gen)
        codes = torch.rand(n, atoms, generator=gen).lt(8 / atoms).float() * torch.rand(
            n, atoms, generator=gen
        )
        x = codes @ dictionary
        x[:, :2] += 100.0  # massive-activation coordinates, as in real pooled hidden states
        out.append(x)
    return torch.stack(out, dim=1)


def time_batched(acts: torch.Tensor, cfg: SAEConfig, device: str) -> tuple[float, float, BatchedSAE]:
    """(wall s, process CPU s, SAEs) for one joint run over all layers."""
    wall, cpu = time.perf_counter(), time.process_time()
    sae, _ = train_saes(acts, cfg, seed=0, device=device)
    return time.perf_counter() - wall, time.process_time() - cpu, sae


def time_loop(acts: torch.Tensor, cfg: SAEConfig, device: str) -> tuple[float, float, BatchedSAE]:
    """(wall s, process CPU s, stacked SAEs) for one run per layer."""
    wall, cpu = time.perf_counter(), time.process_time()
    parts = [
        train_saes(acts[:, [i]], cfg, seed=0, device=device, layer_ids=[i])[0] for i in range(acts.shape[1])
    ]
    return time.perf_counter() - wall, time.process_time() - cpu, BatchedSAE.stack(parts)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--k", type=int, default=128)
    parser.add_argument("--d-sae", type=int, default=1024)
    parser.add_argument("--n", type=int, default=4000)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    acts = synthetic_acts(args.n, args.layers, args.k)
    cfg = SAEConfig(d_sae=args.d_sae, steps=args.steps, batch_size=args.batch_size)
    device_name = (
        torch.cuda.get_device_name() if args.device.startswith("cuda") else platform.processor() or "cpu"
    )
    print(
        f"machine: {os.cpu_count()} CPUs, torch {torch.__version__}, {torch.get_num_threads()} threads, "
        f"device {args.device} ({device_name})"
    )
    print(
        f"L={args.layers} k={args.k} d_sae={args.d_sae} N={args.n} steps={args.steps} "
        f"batch={args.batch_size}, best of {args.repeats}"
    )
    time_batched(acts[:64], cfg.model_copy(update={"steps": 3}), args.device)  # warm-up: lazy init, allocator

    batched_times, loop_times = [], []
    for _ in range(args.repeats):
        *times, batched = time_batched(acts, cfg, args.device)
        batched_times.append(times)
        *times, looped = time_loop(acts, cfg, args.device)
        loop_times.append(times)
    diff = max(
        (a - b).abs().max().item() for a, b in zip(batched.parameters(), looped.parameters(), strict=True)
    )
    for col, what in enumerate(("wall", "CPU (process time, all threads)")):
        batched_s = min(t[col] for t in batched_times)
        loop_s = min(t[col] for t in loop_times)
        print(
            f"{what:32s} batched {batched_s:7.2f} s | python loop {loop_s:7.2f} s | "
            f"speed-up (loop / batched) {loop_s / batched_s:.2f}x"
        )
    print(f"max |param difference| batched vs loop: {diff:.2e} (same seeds per layer, so ~0)")


if __name__ == "__main__":
    main()
