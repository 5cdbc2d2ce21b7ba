"""Benchmark: Jacobian saliency of ALL layers from one forward-mode pass vs one pass per layer (same probes).

    python bench/bench_saliency.py                    # random 10-layer Llama, hidden 256 (~1 min on 2 cores)
    python bench/bench_saliency.py --model default    # SmolLM2-135M (30 layers), converted once from the GGUF
    python bench/bench_saliency.py --texts 32 --probes 2 --seq-len 128
    python bench/bench_saliency.py --threads 1        # steadier timings when other jobs share the CPU

Also prints what one JVP pass costs against a plain eager forward pass of the same batch.
"""

from __future__ import annotations

import argparse
import os
import platform
import random
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run as a plain script
from finescope_core.batching import TextBatch, iter_text_batches
from finescope_core.model import load_model, resolve_arch
from finescope_core.saliency import batch_saliency, forward_ad_attention, jacobian_saliency, rademacher_probe
from finescope_core.tiny import byte_tokenizer, tiny_model

WORDS = [
    "the",
    "model",
    "data",
    "layer",
    "token",
    "energy",
    "cell",
    "market",
    "court",
    "poem",
    "proof",
    "graph",
    "law",
    "river",
    "price",
    "vote",
    "theorem",
    "protein",
    "novel",
    "circuit",
    "tax",
    "enzyme",
    "sonnet",
    "matrix",
    "verdict",
    "orbit",
    "inflation",
    "gene",
    "treaty",
    "lemma",
    "neuron",
]


def make_texts(n: int, words: int, seed: int = 0) -> list[str]:
    """n pseudo-sentences of `words` words each, deterministic."""
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(words)) for _ in range(n)]


def build(args: argparse.Namespace):
    """(model, tokenizer, description) for --model tiny|default."""
    if args.model == "default":
        model, tok = load_model("default", Path(".finescope-cache"), device="cpu")
        return model, tok, "SmolLM2-135M-Instruct"
    model = tiny_model(
        "llama", layers=args.layers, hidden=args.hidden, heads=8, kv_heads=4, intermediate=args.hidden * 2
    )
    return model, byte_tokenizer(), f"random Llama, {args.layers} layers, hidden {args.hidden}"


def timed(fn: Callable[[], object], repeats: int) -> float:
    """Median wall time of `repeats` calls, after one warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def pass_cost(model, batch: TextBatch, repeats: int) -> tuple[float, float]:
    """(seconds of one all-layers JVP pass, seconds of one plain eager forward pass) on `batch`."""
    arch = resolve_arch(model)
    layers = list(range(arch.num_layers))
    probe = rademacher_probe(
        batch.attention_mask, arch.hidden_size, torch.Generator().manual_seed(0), torch.float32
    )[None]
    jvp = timed(lambda: batch_saliency(model, batch, layers, probe, skip_first=1), repeats)
    with forward_ad_attention(model), torch.no_grad():
        fwd = timed(
            lambda: model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False),
            repeats,
        )
    return jvp, fwd


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=["tiny", "default"], default="tiny")
    p.add_argument("--layers", type=int, default=10, help="tiny model depth")
    p.add_argument("--hidden", type=int, default=256, help="tiny model width")
    p.add_argument("--texts", type=int, default=8, help="reference corpus size |D0|")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=64, help="tokens per text (texts are built long enough)")
    p.add_argument("--probes", type=int, default=1, help="R of eq. 8")
    p.add_argument("--repeats", type=int, default=3, help="timed repeats of the single-pass costs")
    p.add_argument(
        "--threads", type=int, default=0, help="torch threads (0: torch's default); 1 on a shared box"
    )
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    model, tok, what = build(args)
    arch = resolve_arch(model)
    texts = make_texts(args.texts, words=args.seq_len)
    batches = list(iter_text_batches(tok, texts, max_length=args.seq_len, batch_size=args.batch_size))
    all_layers = list(range(arch.num_layers))
    print(
        f"machine: {os.cpu_count()} cpus ({platform.processor() or platform.machine()}), "
        f"torch {torch.__version__} "
        f"({torch.get_num_threads()} threads), device cpu"
    )
    print(
        f"model: {what} ({model.config._attn_implementation} attention, eager during saliency); "
        f"|D0|={len(texts)}, batch {args.batch_size}x{batches[0].input_ids.shape[1]} tokens, "
        f"R={args.probes}, L={arch.num_layers}"
    )

    def run(layers: list[int]) -> torch.Tensor:
        gen = torch.Generator().manual_seed(0)  # same probes for both strategies
        return jacobian_saliency(model, batches, layers, probes=args.probes, skip_first=1, generator=gen)

    # Warm-up: the first forward-mode pass pays one-off costs (decompositions, allocator).
    jacobian_saliency(model, batches[:1], all_layers, probes=1, skip_first=1, generator=torch.Generator())
    start = time.perf_counter()
    together = run(all_layers)
    t_one = time.perf_counter() - start
    start = time.perf_counter()
    separate = torch.cat([run([layer]) for layer in all_layers])
    t_per = time.perf_counter() - start
    rel = ((together - separate).abs().max() / separate.abs().max()).item()

    jvp, fwd = pass_cost(model, batches[0], args.repeats)
    print(f"all {arch.num_layers} layers, one JVP pass per probe : {t_one:8.2f} s")
    print(f"one layer at a time ({arch.num_layers} x passes)      : {t_per:8.2f} s")
    print(
        f"speed-up                                 : {t_per / t_one:8.2f}x  "
        f"(per-layer passes stop at their layer, so the ideal is (L+1)/2 = {(arch.num_layers + 1) / 2:.1f}x)"
    )
    print(f"max |difference| / max |W|               : {rel:.2e}")
    print(
        f"one JVP pass (all layers) vs eager forward (incl. lm_head), batch 0: "
        f"{jvp * 1e3:.1f} ms vs {fwd * 1e3:.1f} ms = {jvp / fwd:.2f}x"
    )


if __name__ == "__main__":
    main()
