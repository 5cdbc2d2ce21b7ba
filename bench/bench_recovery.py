"""Benchmark: how much of what pruning lost does tuning win back, by loss (CE / logit KD) and method
(LoRA / full).

    python bench/bench_recovery.py            # SmolLM2-135M pruned at 0.3, GSM8K; ~10 min on 2 shared cores
    python bench/bench_recovery.py --quick    # fewer records and variants, ~3 min

The bundled model (`load_model("default")`) is pruned at ratio 0.3 (Taylor importance on the
training problems' texts), then tuned on the GSM8K training problems (the first `--prune-texts`, 32,
are the pruning data) with their reference answers as targets (no teacher generation), one epoch
each. Every model is scored on other GSM8K problems. Training and scored problems are disjoint from
every item a config under `configs/` reports (`recovery_items.bench_problems`: demo-corpus problems
outside every evaluation split), so settings chosen here are not tuned to the reported items. The
score is the chat-formatted response perplexity (prompt through `teacher.encode_prompt`, loss on
the response tokens only). `recovered` is the share of the pruning loss in log-perplexity won back:
(log ppl_pruned - log ppl_tuned) / (log ppl_pruned - log ppl_base).
"""

from __future__ import annotations

import argparse
import copy
import math
import os
import platform
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from finescope_core.config import FinetuneConfig, PruneConfig
from finescope_core.finetune import build_examples, evaluate_loss, lora_finetune
from finescope_core.model import load_model
from finescope_core.prune import prune_model

try:  # run as `python bench/bench_recovery.py`, or imported as `bench.bench_recovery`
    from recovery_items import bench_problems
except ImportError:
    from bench.recovery_items import bench_problems

VARIANTS: dict[str, dict[str, Any]] = {
    "lora CE (old defaults)": {"method": "lora", "kd_weight": 0.0, "warmup_ratio": 0.0},
    "lora CE": {"method": "lora", "kd_weight": 0.0},
    "lora KD w=0.5 T=1": {"method": "lora", "kd_weight": 0.5, "temperature": 1.0},
    "lora KD w=0.9 T=1": {"method": "lora", "kd_weight": 0.9, "temperature": 1.0},
    "lora KD w=0.9 T=2": {"method": "lora", "kd_weight": 0.9, "temperature": 2.0},
    "full CE": {"method": "full", "kd_weight": 0.0, "lr": 2e-5},
    "full KD w=0.5 T=1": {"method": "full", "kd_weight": 0.5, "temperature": 1.0, "lr": 2e-5},
    "full KD w=0.9 T=1": {"method": "full", "kd_weight": 0.9, "temperature": 1.0, "lr": 2e-5},
    "full KD w=0.5 T=1 lr=1e-4": {"method": "full", "kd_weight": 0.5, "temperature": 1.0, "lr": 1e-4},
    "lora KD w=0.5 T=1 lr=5e-4": {"method": "lora", "kd_weight": 0.5, "temperature": 1.0, "lr": 5e-4},
}
QUICK = ("lora CE", "lora KD w=0.5 T=1", "lora KD w=0.9 T=1", "full KD w=0.9 T=1")


def bench_split(n_train: int, n_eval: int) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(training problems, scored problems): the first and the last of `bench_problems()`, disjoint."""
    problems, _ = bench_problems()
    if n_train + n_eval > len(problems):
        raise SystemExit(
            f"--train {n_train} + --eval {n_eval} > {len(problems)} problems no config reports on"
        )
    return problems[:n_train], problems[-n_eval:]


def rows_of(records: list[dict[str, Any]]) -> list[dict[str, str]]:
    return [{"prompt": r["instruction"], "response": r["output"]} for r in records]


def response_ppl(model: torch.nn.Module, tok: Any, rows: list[dict[str, str]], cutoff: int) -> float:
    examples = build_examples(tok, rows, cutoff).examples
    return math.exp(evaluate_loss(model, examples, 8, tok.pad_token_id))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="fewer records and variants")
    ap.add_argument("--train", type=int, default=None, help="training (and pruning) problems")
    ap.add_argument("--eval", type=int, default=50, help="held-out problems scored")
    ap.add_argument("--cutoff", type=int, default=192)
    ap.add_argument("--prune-texts", type=int, default=32, help="training problems used as pruning data")
    ap.add_argument(
        "--importance", default="taylor", choices=["taylor", "magnitude"], help="pruning importance"
    )
    ap.add_argument(
        "--variants", default=None, help="comma-separated variant names (default: all, or the quick set)"
    )
    ap.add_argument("--epochs", type=int, default=1, help="passes over the training problems")
    args = ap.parse_args()
    n_train = args.train or (48 if args.quick else 128)
    n_eval = 24 if args.quick else args.eval
    names = tuple(args.variants.split(",")) if args.variants else QUICK if args.quick else tuple(VARIANTS)
    torch.manual_seed(0)
    print(
        f"machine: {platform.processor() or platform.machine()}, cpus={os.cpu_count()}, "
        f"torch threads={torch.get_num_threads()}, torch {torch.__version__}, device=cpu; "
        f"SmolLM2-135M-Instruct pruned at 0.3 ({args.importance}), {n_train} GSM8K train problems, "
        f"{n_eval} held-out, {args.epochs} epoch(s)"
    )
    train_rec, eval_rec = bench_split(n_train, n_eval)
    train_rows, eval_rows = rows_of(train_rec), rows_of(eval_rec)
    base, tok = load_model("default", device="cpu")
    base.eval()
    t0 = time.perf_counter()
    ppl = {"base": response_ppl(base, tok, eval_rows, args.cutoff)}
    print(f"base scored ({time.perf_counter() - t0:.0f}s)", flush=True)
    pruned = copy.deepcopy(base)
    texts = [f"{r['instruction']}\n{r['output']}" for r in train_rec[: args.prune_texts]]
    prune_model(pruned, tok, texts, PruneConfig(ratio=0.3, importance=args.importance))
    pruned.eval()
    ppl["pruned"] = response_ppl(pruned, tok, eval_rows, args.cutoff)
    print(
        f"base ppl {ppl['base']:.3f}, pruned ppl {ppl['pruned']:.3f} ({time.perf_counter() - t0:.0f}s)",
        flush=True,
    )
    seconds: dict[str, float] = {}
    best_epoch: dict[str, int] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in names:
            settings = {
                "epochs": args.epochs,
                "eval_fraction": 0.1,
                "batch_size": 4,
                "grad_accum": 2,
                "max_length": args.cutoff,
            }
            cfg = FinetuneConfig(**settings | VARIANTS[name])
            student = copy.deepcopy(pruned)
            start = time.perf_counter()
            summary = lora_finetune(
                student,
                tok,
                train_rows,
                cfg,
                Path(tmp) / "out",
                seed=0,
                teacher=base if cfg.kd_weight > 0 else None,
            )
            seconds[name], best_epoch[name] = time.perf_counter() - start, summary.best_epoch
            ppl[name] = response_ppl(student, tok, eval_rows, args.cutoff)
            print(f"  {name}: ppl {ppl[name]:.3f} ({seconds[name]:.0f}s)", flush=True)
            del student
    lost = math.log(ppl["pruned"]) - math.log(ppl["base"])
    print("\n| model | response ppl | recovered (log-ppl) | tune seconds |\n|---|---|---|---|")
    for name, value in ppl.items():
        rec = (math.log(ppl["pruned"]) - math.log(value)) / lost if name not in ("base", "pruned") else None
        cell = f"{100 * rec:.0f} %" if rec is not None else "-"
        secs = f"{seconds[name]:.0f}" if name in seconds else "-"
        print(f"| {name} | {value:.3f} | {cell} | {secs} |")


if __name__ == "__main__":
    main()
