"""Curation quality on a hard labeled benchmark of our own: near topics in a large background.

The corpus is built at run time from installed packages (`bench/curation_data.py`: GPQA Diamond by
its high-level domain, GSM8K, AIME 2025, HumanEval, chatterbot conversations by category, and the
Python standard library's docstrings by library-reference chapter), ~3.3k records. Eight targets,
each beside a near neighbour: GPQA physics and chemistry, GSM8K math (beside money chat and AIME),
HumanEval code (beside chat about coding and docstrings), chat about coding, chat about AI, and the
internet-protocol and numeric chapters' docstrings among every other docstring. Each target has 10
seeds drawn from its own records and left out of the corpus.

Everything corpus-side is computed once with the pipeline's own stage functions and the default
`curate` settings (bundled SmolLM2-135M-Instruct, Jacobian saliency on the corpus, pooled
activations at the selected coordinates; `finescope_core.curate`): then every method ranks the
corpus for every target with `curate.curate_records`, and each variant of the SAE is trained once
on the corpus activations. Printed for each method: precision@25/50/100 per target, where precision@k
is the share of the target among the first k records, divided by min(k, the target's corpus records)
so that a perfect ranking scores 1 for a small target too; the mean over targets; the weakest target
against random (the expected precision of a uniform sample, same formula).

Methods: `random` (the expectation), `sentence` (all-MiniLM-L6-v2), `activation` for each hooked
layer alone and for the best of them (chosen with the labels: an oracle no run has), `activation`
and `sae` over all layers with each `curate.layer_weighting`, with `fusion: sentence` and with
`expand_seeds`, for the SAE kinds given (default: the default ReLU + L1 SAE, TopK k=32 and k=64).

    python -u bench/bench_curation.py                 # everything (~15 min on 2 cores, first run)
    python -u bench/bench_curation.py --quick         # 4 layers, the default SAE only
    python -u bench/bench_curation.py --json out.json # also write every number
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import curation_data  # noqa: E402

from finescope_core import curate  # noqa: E402
from finescope_core.activations import load_activations  # noqa: E402
from finescope_core.config import CurateConfig, SAEConfig  # noqa: E402
from finescope_core.data import RecordSet, deduplicate, load_records  # noqa: E402
from finescope_core.model import load_model  # noqa: E402
from finescope_core.sae import encode, train_saes  # noqa: E402
from finescope_core.saliency import LayerSaliency  # noqa: E402
from finescope_core.sentence import sentence_embeddings  # noqa: E402

SEED = 0
KS = (25, 50, 100)
MODEL_SIDE = {
    "layers",
    "num_layers",
    "selector",
    "k_act",
    "probes",
    "reference_size",
    "max_length",
    "batch_size",
    "skip_first",
}
"""The `curate` settings the cached activations and sentence embeddings depend on."""
Emb = dict[int, np.ndarray]


@dataclass
class Prepared:
    corpus: RecordSet
    labels: list[str]
    topics: list[curation_data.Topic]
    layers: list[int]
    corpus_acts: torch.Tensor
    seed_acts: dict[str, torch.Tensor]
    sentence_corpus: np.ndarray
    sentence_seeds: dict[str, np.ndarray]
    seconds: float


def prepare(cache: Path, ccfg: CurateConfig) -> Prepared:
    """The benchmark corpus, its activations and sentence embeddings, and each topic's seeds' (cached)."""
    start = time.perf_counter()
    data = curation_data.build(cache / "data", seed=SEED)
    corpus = deduplicate(load_records([str(data.corpus)], role="corpus")).corpus
    seeds = {t.name: load_records([str(data.seeds[t.name])], role="seeds") for t in curation_data.TOPICS}
    model_side = ccfg.model_dump_json(include=MODEL_SIDE)  # retrieval settings do not change the cache
    tag = hashlib.sha256((corpus.sha256 + model_side).encode()).hexdigest()[:12]
    root = cache / tag
    if not (root / "done.json").is_file():
        print(f"computing activations of {len(corpus)} records (cached in {root})", flush=True)
        model, tokenizer = load_model("default", device="cpu")
        layers = curate.hooked_layers(model.config.num_hidden_layers, ccfg)
        curate.saliency_stage(model, tokenizer, corpus, layers, ccfg, SEED, root / "saliency")
        indices = LayerSaliency.load(root / "saliency").indices
        curate.activation_stage(model, tokenizer, corpus, layers, indices, ccfg, root / "corpus")
        for name, records in seeds.items():
            curate.activation_stage(model, tokenizer, records, layers, indices, ccfg, root / f"seeds-{name}")
        print("sentence embeddings", flush=True)
        np.save(root / "sentence-corpus.npy", sentence_embeddings(corpus.texts))
        for name, records in seeds.items():
            np.save(root / f"sentence-{name}.npy", sentence_embeddings(records.texts))
        (root / "done.json").write_text(json.dumps({"layers": layers}))
    layers = json.loads((root / "done.json").read_text())["layers"]
    return Prepared(
        corpus=corpus,
        labels=[data.labels[r.id] for r in corpus.records],
        topics=list(curation_data.TOPICS),
        layers=layers,
        corpus_acts=load_activations(root / "corpus"),
        seed_acts={name: load_activations(root / f"seeds-{name}") for name in seeds},
        sentence_corpus=np.load(root / "sentence-corpus.npy"),
        sentence_seeds={name: np.load(root / f"sentence-{name}.npy") for name in seeds},
        seconds=time.perf_counter() - start,
    )


def split(x: torch.Tensor, layers: Sequence[int]) -> Emb:
    return {layer: x[:, i].contiguous().float().numpy() for i, layer in enumerate(layers)}


def precisions(ranked_labels: Sequence[str], label: str, in_corpus: int) -> dict[int, float]:
    return {k: sum(lab == label for lab in ranked_labels[:k]) / min(k, in_corpus) for k in KS}


def random_expectation(label_count: int, n: int) -> dict[int, float]:
    return {k: k * label_count / n / min(k, label_count) for k in KS}


class Runner:
    """Ranks the corpus for every topic with one method's embeddings and records the precisions."""

    def __init__(self, p: Prepared, ccfg: CurateConfig):
        self.p, self.ccfg = p, ccfg
        self.ids = [r.id for r in p.corpus.records]
        self.counts = {t.name: p.labels.count(t.label) for t in p.topics}
        self.rows: list[dict[str, Any]] = []

    def add(self, name: str, result: Mapping[str, dict[int, float]], seconds: float = 0.0) -> dict[str, Any]:
        row = {"method": name, "topics": dict(result), "seconds": seconds}
        row["mean"] = {k: float(np.mean([r[k] for r in result.values()])) for k in KS}
        self.rows.append(row)
        print_rows([row], self.p.topics, header=False)
        return row

    def run(
        self,
        name: str,
        method: str,
        corpus_emb: Emb,
        seed_emb: Mapping[str, Emb],
        cfg: CurateConfig | None = None,
        fusion: bool = False,
    ) -> dict[str, Any]:
        cfg = cfg or self.ccfg
        start = time.perf_counter()
        out = {}
        for t in self.p.topics:
            fusion_emb = (
                ({-1: self.p.sentence_corpus}, {-1: self.p.sentence_seeds[t.name]}) if fusion else None
            )
            voted = curate.curate_records(
                method,
                corpus_emb,
                seed_emb[t.name],
                len(self.ids),
                cfg,
                SEED,
                ids=self.ids,
                fusion_emb=fusion_emb,
            ).voted
            out[t.name] = precisions([self.p.labels[v.row] for v in voted], t.label, self.counts[t.name])
        return self.add(name, out, time.perf_counter() - start)

    def variants(
        self, prefix: str, method: str, corpus_emb: Emb, seed_emb: Mapping[str, Emb], expand: int
    ) -> None:
        for weighting in ("vote", "quality", "agreement"):
            cfg = self.ccfg.model_copy(update={"layer_weighting": weighting})
            self.run(f"{prefix} {weighting}", method, corpus_emb, seed_emb, cfg)
        for pooling in ("max", "mean", "softmax"):
            if pooling != self.ccfg.seed_pooling:
                cfg = self.ccfg.model_copy(update={"seed_pooling": pooling})
                self.run(f"{prefix} vote, {pooling} over seeds", method, corpus_emb, seed_emb, cfg)
        self.run(f"{prefix} vote +fusion", method, corpus_emb, seed_emb, fusion=True)
        self.run(
            f"{prefix} quality +fusion",
            method,
            corpus_emb,
            seed_emb,
            self.ccfg.model_copy(update={"layer_weighting": "quality"}),
            fusion=True,
        )
        if expand:
            cfg = self.ccfg.model_copy(update={"expand_seeds": expand})
            self.run(f"{prefix} vote +expand{expand}", method, corpus_emb, seed_emb, cfg)


MIXED = {
    "physics+code": ("gpqa-physics", "humaneval"),
    "math+ai-chat": ("gsm8k", "chat-ai"),
    "doc-numeric+code-chat": ("doc-numeric", "chat-coding"),
}
"""Domains of two unrelated sub-topics (5 seeds from each): what a rule that pools the seeds by their
mean would drown and the nearest-seed rule handles (`curate.seed_pooling`)."""


class Draws:
    """The same methods on `count` more seed sets per target, each drawn (seeded) from the target's own
    corpus records and excluded from the ranking: one seed draw is a small sample (n = 8 targets), and
    a method's lead over another must hold across seed sets to count. Besides the 8 targets, the
    `MIXED` ones: two sub-topics, 5 seeds each. Precision@100 over min(100, the target's records
    left); per method the mean over the 8 targets and draws, with a 95 % interval from a bootstrap over
    the draws (each draw's mean over targets is one sample), and the same over the mixed targets."""

    def __init__(self, p: Prepared, ccfg: CurateConfig, count: int):
        self.p, self.ccfg = p, ccfg
        labels = np.array(p.labels)
        rng = np.random.default_rng(SEED + 1)
        self.targets: dict[str, tuple[str, ...]] = {t.name: (t.label,) for t in p.topics} | MIXED
        self.draws: dict[str, list[list[int]]] = {}
        for name, labs in self.targets.items():
            per = curation_data.SEEDS_PER_TOPIC // len(labs)
            self.draws[name] = [
                [
                    r
                    for lab in labs
                    for r in rng.choice(np.flatnonzero(labels == lab), per, replace=False).tolist()
                ]
                for _ in range(count)
            ]
        self.ids = [r.id for r in p.corpus.records]
        self.rows: list[dict[str, Any]] = []

    @staticmethod
    def _interval(samples: np.ndarray) -> list[float]:
        boot = np.random.default_rng(SEED).choice(samples, size=(2000, samples.size)).mean(axis=1)
        return [float(np.quantile(boot, 0.025)), float(np.quantile(boot, 0.975))]

    def run(self, name: str, method: str, corpus_emb: Emb, cfg: CurateConfig | None = None) -> dict[str, Any]:
        cfg = cfg or self.ccfg
        per_target: dict[str, list[float]] = {}
        for target, labs in self.targets.items():
            left = sum(self.p.labels.count(lab) for lab in labs) - curation_data.SEEDS_PER_TOPIC
            for rows in self.draws[target]:
                seeds = {layer: emb[rows] for layer, emb in corpus_emb.items()}
                voted = curate.curate_records(
                    method, corpus_emb, seeds, len(self.ids), cfg, SEED, exclude_rows=rows, ids=self.ids
                ).voted
                hits = sum(self.p.labels[v.row] in labs for v in voted[:100])
                per_target.setdefault(target, []).append(hits / min(100, left))
        single = np.mean([per_target[t.name] for t in self.p.topics], axis=0)
        mixed = np.mean([per_target[t] for t in MIXED], axis=0)
        row = {
            "method": name,
            "mean": float(single.mean()),
            "ci": self._interval(single),
            "mixed": float(mixed.mean()),
            "mixed_ci": self._interval(mixed),
            "topics": {k: float(np.mean(v)) for k, v in per_target.items()},
        }
        self.rows.append(row)
        cells = [f"{row['topics'][t]:.2f}" for t in self.targets]
        print(
            f"| {name} | {row['mean']:.3f} [{row['ci'][0]:.3f}, {row['ci'][1]:.3f}] "
            f"| {row['mixed']:.3f} [{row['mixed_ci'][0]:.3f}, {row['mixed_ci'][1]:.3f}] | "
            + " | ".join(cells)
            + " |",
            flush=True,
        )
        return row

    def header(self) -> None:
        draws = len(next(iter(self.draws.values())))
        print(
            f"\n{draws} more seed sets per target, drawn from its corpus records "
            "(excluded from the ranking); precision@100"
        )
        print(
            "| method | mean @100 [95 % CI over draws] | mixed targets @100 [95 % CI] | "
            + " | ".join(self.targets)
            + " |"
        )
        print("|---" * (3 + len(self.targets)) + "|")


def print_rows(
    rows: Sequence[Mapping[str, Any]],
    topics: Sequence[curation_data.Topic],
    header: bool = True,
    k: int = 100,
) -> None:
    cols = [t.name for t in topics]
    if header:
        print("| method | mean @25 | mean @50 | mean @100 | " + " | ".join(f"{c} @{k}" for c in cols) + " |")
        print("|---" * (4 + len(cols)) + "|")
    for r in rows:
        cells = (
            [r["method"]] + [f"{r['mean'][kk]:.3f}" for kk in KS] + [f"{r['topics'][c][k]:.2f}" for c in cols]
        )
        print("| " + " | ".join(cells) + " |", flush=True)


def sae_variant(text: str) -> SAEConfig:
    """`relu`, `relu:L1`, `topk:K` -> the SAE settings (the rest default)."""
    kind, _, arg = text.partition(":")
    if kind == "relu":
        return SAEConfig(**({"l1_coef": float(arg)} if arg else {}))
    if kind == "topk":
        return SAEConfig(kind="topk", k=int(arg or 32))
    raise SystemExit(f"--sae {text!r}: use relu, relu:L1 or topk:K")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="4 hooked layers, the default SAE only")
    parser.add_argument(
        "--sae",
        nargs="*",
        default=None,
        help="SAE variants: relu, relu:L1, topk:K (default: relu topk:32 topk:64)",
    )
    parser.add_argument(
        "--expand", type=int, default=10, help="pseudo-seeds of the +expand variants (0: none)"
    )
    parser.add_argument(
        "--cache", type=Path, default=Path(tempfile.gettempdir()) / "finescope-bench-curation"
    )
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", type=Path, help="write every number here")
    parser.add_argument(
        "--draws",
        type=int,
        default=5,
        help="more seed sets per target drawn from the corpus, for intervals (0: none)",
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    ccfg = CurateConfig(num_layers=4) if args.quick else CurateConfig()
    saes = args.sae if args.sae is not None else (["relu"] if args.quick else ["relu", "topk:32", "topk:64"])

    p = prepare(args.cache, ccfg)
    run = Runner(p, ccfg)
    n = len(p.corpus)
    print(
        f"machine: {os.cpu_count()} CPUs ({platform.processor() or 'cpu'}), torch {torch.__version__}, "
        f"{args.threads} thread(s); python {platform.python_version()}\n"
        f"corpus: {n} records; layers {p.layers}; k_act {ccfg.k_act}; final_size {ccfg.final_size}, "
        f"top_m {ccfg.top_m}; "
        f"corpus-side stages {p.seconds:.0f} s (a few: cached)\n"
        + "\n".join(
            f"  target {t.name:<12} {t.label:<15} {run.counts[t.name]:>4} in the corpus "
            f"(random @100 {random_expectation(run.counts[t.name], n)[100]:.3f}); near: {t.near}"
            for t in p.topics
        )
    )
    print_rows([], p.topics)
    rand = run.add("random (expected)", {t.name: random_expectation(run.counts[t.name], n) for t in p.topics})
    sentence_seeds = {k: {-1: v} for k, v in p.sentence_seeds.items()}
    sentence = run.run("sentence", "sentence", {-1: p.sentence_corpus}, sentence_seeds)
    run.run(
        "sentence, max over seeds",
        "sentence",
        {-1: p.sentence_corpus},
        sentence_seeds,
        ccfg.model_copy(update={"seed_pooling": "max"}),
    )

    # The activation baseline: corpus-statistics z-scores, as curate's `activation` method.
    mean = p.corpus_acts.float().mean(0, keepdim=True)
    std = p.corpus_acts.float().std(0, keepdim=True).clamp_min(1e-6)
    act_corpus = split((p.corpus_acts - mean) / std, p.layers)
    act_seeds = {name: split((x - mean) / std, p.layers) for name, x in p.seed_acts.items()}
    single = [
        run.run(
            f"activation layer {layer}",
            "activation",
            {layer: act_corpus[layer]},
            {k: {layer: v[layer]} for k, v in act_seeds.items()},
        )
        for layer in p.layers
    ]
    best = max(single, key=lambda r: r["mean"][100])
    run.add(f"activation best layer (oracle: {best['method'].rsplit(' ', 1)[1]})", best["topics"])
    run.variants("activation", "activation", act_corpus, act_seeds, args.expand)

    draws = Draws(p, ccfg, args.draws) if args.draws else None
    if draws:
        draws.header()
        draws.run("sentence", "sentence", {-1: p.sentence_corpus})
        draws.run(
            "sentence, max over seeds",
            "sentence",
            {-1: p.sentence_corpus},
            ccfg.model_copy(update={"seed_pooling": "max"}),
        )
        for layer in p.layers:
            draws.run(f"activation layer {layer}", "activation", {layer: act_corpus[layer]})
        draws.run("activation vote", "activation", act_corpus)
    for text in saes:
        cfg = sae_variant(text)
        start = time.perf_counter()
        model, metrics = train_saes(p.corpus_acts, cfg, seed=SEED, layer_ids=p.layers)
        trained = time.perf_counter() - start
        fvu = np.mean([m.val_fvu for m in metrics])
        l0 = np.mean([m.val_l0 for m in metrics])
        tag = f"sae {text} (val FVU {fvu:.2f}, L0 {l0:.0f}, {trained:.0f} s)"
        print(f"trained {tag}", flush=True)
        sae_corpus = split(encode(model, p.corpus_acts), p.layers)
        sae_seeds = {name: split(encode(model, x), p.layers) for name, x in p.seed_acts.items()}
        run.variants(f"sae {text}", "sae", sae_corpus, sae_seeds, args.expand)
        if draws:
            draws.header()
            draws.run(f"sae {text} vote", "sae", sae_corpus)
            for pooling in ("max", "mean", "softmax"):
                if pooling != ccfg.seed_pooling:
                    draws.run(
                        f"sae {text} vote, {pooling} over seeds",
                        "sae",
                        sae_corpus,
                        ccfg.model_copy(update={"seed_pooling": pooling}),
                    )
            if args.expand:
                draws.run(
                    f"sae {text} vote +expand{args.expand}",
                    "sae",
                    sae_corpus,
                    ccfg.model_copy(update={"expand_seeds": args.expand}),
                )

    print(
        "\nprecision@100 per target; @k = share of the target among the first k, "
        f"over min(k, its records); n = {n}"
    )
    print_rows(run.rows, p.topics)
    print("\nweakest target @100 against random @100 (x): ")
    for r in run.rows[1:]:
        worst = min(p.topics, key=lambda t: r["topics"][t.name][100])
        ratio = r["topics"][worst.name][100] / rand["topics"][worst.name][100]
        print(f"  {r['method']:<45} {worst.name:<12} {r['topics'][worst.name][100]:.2f} ({ratio:.1f}x)")
    default = next((r for r in run.rows if r["method"] == f"sae {saes[0]} vote"), None) if saes else None
    print(
        f"\nsentence mean @100 {sentence['mean'][100]:.3f}; best single layer {best['mean'][100]:.3f}"
        + (f"; sae {saes[0]} at the default settings {default['mean'][100]:.3f}" if default else "")
    )
    if draws:
        print(f"\nover {args.draws} drawn seed sets per target (mean @100 [95 % CI]):")
        for r in draws.rows:
            worst = min(p.topics, key=lambda t: r["topics"][t.name])
            ratio = r["topics"][worst.name] / rand["topics"][worst.name][100]
            print(
                f"  {r['method']:<45} {r['mean']:.3f} [{r['ci'][0]:.3f}, {r['ci'][1]:.3f}]; "
                f"weakest {worst.name} "
                f"{r['topics'][worst.name]:.2f} ({ratio:.1f}x random); mixed targets {r['mixed']:.3f}"
            )
    if args.json:
        out = {
            "n": n,
            "counts": run.counts,
            "layers": p.layers,
            "rows": run.rows,
            "draws": draws.rows if draws else [],
        }
        args.json.write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
