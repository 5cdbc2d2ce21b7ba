"""GPU check: a real-sized decoder with random weights through every model stage, in the run's precision.

    python bench/gpu_check.py                          # Llama-3-8B shape, bf16, on CUDA (needs ~60 GB)
    python bench/gpu_check.py --shape 1b               # Llama-3.2-1B shape
    python bench/gpu_check.py --shape tiny --device cpu --dtype float32 --records 256 --ref 8 --gen 4 \
        --new-tokens 8 --sae-steps 20 --peak-tflops 1   # the script itself, on a CPU
    python bench/gpu_check.py --shape 1b --flow         # then the real `finescope run` on the saved model

Stages, each timed on its own (the finescope_core functions the flows call):
  saliency     Jacobian saliency (one forward-mode pass per probe) on `--ref` records
  activations  pooled activations of `--records` records x `--seq-len` tokens at 8 hooked layers
  sae          SAE training on those activations (the default SAE settings)
  importance   first-order Taylor importance (forward + backward) on `--ref` records
  teacher      greedy generation for `--gen` prompts, `--new-tokens` each

For the forward-only stages it prints tokens/s and the model-FLOP utilisation (MFU): the matmul FLOPs
of the layers that ran (2 x parameters x tokens, plus causal attention 2 x layers x tokens x seq x d)
over the wall time, divided by the GPU's dense peak (`--peak-tflops`; H100/H200 SXM bf16: 989), and
what 1M records x 128 tokens would take at that rate. Writes `gpu_check.json` to $OUT when it is set.

With `--flow`, the same model is then saved to disk and the whole `specialize` flow runs on it, as
`finescope run` does (`bench/gpu_flow.py`): each stage's own peak `torch.cuda.max_memory_allocated`
(reset per stage), its wall time and the memory planner's prediction; with `vllm` installed, a vLLM
teacher smoke test on the saved model follows.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from transformers import LlamaConfig, LlamaForCausalLM

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run as a plain script
from finescope_core.activations import extract_pooled
from finescope_core.batching import TextBatch
from finescope_core.config import SAEConfig
from finescope_core.prune import group_importance
from finescope_core.sae import train_saes
from finescope_core.saliency import jacobian_saliency

SHAPES: dict[str, dict[str, int]] = {
    "8b": {
        "hidden_size": 4096,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "intermediate_size": 14336,
        "vocab_size": 128256,
    },
    "1b": {
        "hidden_size": 2048,
        "num_hidden_layers": 16,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "intermediate_size": 8192,
        "vocab_size": 128256,
    },
    "tiny": {
        "hidden_size": 256,
        "num_hidden_layers": 8,
        "num_attention_heads": 8,
        "num_key_value_heads": 4,
        "intermediate_size": 512,
        "vocab_size": 4096,
    },
}
HOOKED = 8
"""Hooked layers, as the default `curate.num_layers`."""


def build_model(shape: str, dtype: torch.dtype, device: torch.device) -> LlamaForCausalLM:
    """A Llama of `shape` with random weights, built directly on `device` in `dtype`."""
    config = LlamaConfig(**SHAPES[shape], max_position_embeddings=4096, tie_word_embeddings=False)
    config._attn_implementation = "sdpa"
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with device:
            model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(previous)
    return model.train(False)


def hooked_layers(num_layers: int) -> list[int]:
    """HOOKED layers evenly spaced, the last one included (as `curate.num_layers` picks them)."""
    step = num_layers / HOOKED
    return sorted({min(num_layers - 1, round((i + 1) * step) - 1) for i in range(HOOKED)})


def random_batches(n: int, seq: int, batch: int, vocab: int, seed: int) -> list[TextBatch]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for start in range(0, n, batch):
        b = min(batch, n - start)
        ids = torch.randint(0, vocab, (b, seq), generator=g)
        out.append(
            TextBatch(input_ids=ids, attention_mask=torch.ones_like(ids), rows=torch.arange(start, start + b))
        )
    return out


def forward_flops(model: LlamaForCausalLM, tokens: int, seq: int, layers_run: int) -> float:
    """Matmul FLOPs of a forward pass through the first `layers_run` decoder layers (no lm_head)."""
    cfg = model.config
    per_layer = sum(p.numel() for p in model.model.layers[0].parameters() if p.dim() == 2)
    return 2.0 * per_layer * layers_run * tokens + 2.0 * layers_run * tokens * seq * cfg.hidden_size


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(device: torch.device, fn: Callable[[], Any]) -> tuple[float, Any]:
    sync(device)
    start = time.perf_counter()
    out = fn()
    sync(device)
    return time.perf_counter() - start, out


def drain(it: Iterator[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    return torch.cat([acts for _, acts in it])


def peak_memory_gib(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", choices=sorted(SHAPES), default="8b")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", choices=["bfloat16", "float16", "float32"], default="bfloat16")
    ap.add_argument("--records", type=int, default=10_000, help="records through the activations stage")
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--batch", type=int, default=64, help="records per forward pass")
    ap.add_argument("--ref", type=int, default=64, help="records for saliency and importance")
    ap.add_argument("--gen", type=int, default=64, help="teacher prompts")
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--k-act", type=int, default=128)
    ap.add_argument("--sae-steps", type=int, default=SAEConfig().steps)
    ap.add_argument("--peak-tflops", type=float, default=989.0, help="the device's dense peak at --dtype")
    ap.add_argument(
        "--flow", action="store_true", help="then run the real specialize flow on the saved model"
    )
    ap.add_argument("--flow-records", type=int, default=400, help="corpus records of the flow run")
    args = ap.parse_args()

    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    torch.manual_seed(0)
    t_build, model = timed(device, lambda: build_model(args.shape, dtype, device))
    vocab, n_layers = model.config.vocab_size, model.config.num_hidden_layers
    layers = hooked_layers(n_layers)
    params = sum(p.numel() for p in model.parameters())
    name = (
        torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else platform.processor() or platform.machine()
    )
    print(
        f"device: {name}; torch {torch.__version__}; "
        f"{args.shape} Llama ({params / 1e9:.2f} B params), {args.dtype}; "
        f"hooked layers {layers}; built in {t_build:.0f} s"
    )
    results: dict[str, Any] = {
        "device": name,
        "shape": args.shape,
        "dtype": args.dtype,
        "params": params,
        "stages": {},
    }

    def report(stage: str, seconds: float, tokens: int = 0, layers_run: int = 0, **extra: Any) -> None:
        row: dict[str, Any] = {"seconds": round(seconds, 2), **extra}
        if tokens:
            row["tokens_per_s"] = round(tokens / seconds)
        if tokens and layers_run:
            tflops = forward_flops(model, tokens, args.seq_len, layers_run) / seconds / 1e12
            row["tflops"] = round(tflops, 3)
            row["mfu"] = round(tflops / args.peak_tflops, 4)
        mem = peak_memory_gib(device)
        if mem is not None:
            row["peak_gib"] = round(mem, 1)
        results["stages"][stage] = row
        print(f"{stage:12s} " + "  ".join(f"{k}={v}" for k, v in row.items()), flush=True)

    deepest = max(layers) + 1
    ref = random_batches(args.ref, args.seq_len, min(args.batch, 8), vocab, seed=1)
    gen = torch.Generator(device="cpu").manual_seed(0)
    sec, _ = timed(
        device, lambda: jacobian_saliency(model, ref, layers, probes=2, skip_first=1, generator=gen)
    )
    report("saliency", sec, tokens=2 * args.ref * args.seq_len)  # 2 probes: two dual passes per record

    batches = random_batches(args.records, args.seq_len, args.batch, vocab, seed=2)
    indices = torch.stack([torch.randperm(model.config.hidden_size)[: args.k_act] for _ in layers])
    drain(
        extract_pooled(model, batches[:1], layers, skip_first=1, indices=indices)
    )  # warm-up (kernels, allocator)
    sec, acts = timed(
        device, lambda: drain(extract_pooled(model, batches, layers, skip_first=1, indices=indices))
    )
    tokens = args.records * args.seq_len
    report("activations", sec, tokens=tokens, layers_run=deepest)
    rate = tokens / sec
    results["one_million_records_hours"] = round(1_000_000 * 128 / rate / 3600, 2)
    print(
        f"             1M records x 128 tokens at this rate: {results['one_million_records_hours']} h "
        f"(goal <= 2 h; MFU goal >= 0.40)"
    )

    pooled = acts
    sec, (_, metrics) = timed(
        device, lambda: train_saes(pooled, SAEConfig(steps=args.sae_steps), seed=0, device=device)
    )
    report("sae", sec, fvu=round(sum(m.fvu for m in metrics) / len(metrics), 3))

    lm = []
    for b in random_batches(args.ref, args.seq_len, 4, vocab, seed=3):
        lm.append(
            {"input_ids": b.input_ids, "attention_mask": b.attention_mask, "labels": b.input_ids.clone()}
        )
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    sec, _ = timed(device, lambda: group_importance(model, lm, method="taylor"))
    report("importance", sec, tokens=args.ref * args.seq_len)

    prompts = torch.randint(0, vocab, (args.gen, 64), generator=torch.Generator().manual_seed(4)).to(device)

    def generate() -> torch.Tensor:
        with torch.inference_mode():
            return model.generate(
                input_ids=prompts,
                attention_mask=torch.ones_like(prompts),
                do_sample=False,
                max_new_tokens=args.new_tokens,
                min_new_tokens=args.new_tokens,
                pad_token_id=0,
            )

    sec, out = timed(device, generate)
    report("teacher", sec, tokens=args.gen * (out.shape[1] - prompts.shape[1]))

    if args.flow:
        from gpu_flow import flow_check

        del acts, pooled, lm, prompts, out, batches, ref  # the flow measures from an empty allocator
        results["flow"] = flow_check(model, device, args.dtype, args.flow_records)

    if os.environ.get("OUT"):
        Path(os.environ["OUT"], "gpu_check.json").write_text(json.dumps(results, indent=2))
    print(json.dumps(results))


if __name__ == "__main__":
    main()
