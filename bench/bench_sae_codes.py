"""ReLU + L1 vs TopK SAEs (and EleutherAI sparsify's TopK SAE) on the demo's pooled activations.

The activations are the demo pipeline's own: the bundled SmolLM2-135M-Instruct, the demo corpus, the
math seeds, Jacobian saliency and pooled activations at the selected coordinates, with the curate
settings of configs/demo.yaml (computed once, then cached in --cache). Each variant trains one SAE per
layer with `finescope_core.sae.train_saes` (held-out split and early stopping as configured) and
reports, as the mean over layers: held-out FVU, held-out dead fraction (latents that fire on no
held-out row), held-out L0, training FVU, steps trained, wall seconds and process CPU seconds (the
steadier of the two on a shared machine); and the demo's curation precision
(share of GSM8K records among the top `final_size` chosen by the layer vote over the variant's codes,
`finescope_core.curate.select_records`), beside the `activation` baseline (the same pooled
activations without an SAE).

When `eai-sparsify` is installed, its TopK SAE (`sparsify.SparseCoder`: encoder, TopK, decoder, FVU
and AuxK loss) is trained on the same standardised training rows at each TopK variant's k, with the
training step of sparsify's trainer for its Adam option (sparsify's default Adam learning rate
2e-4 / sqrt(d_sae / 2^14), gradient parallel to decoder rows removed, decoder rows renormalised,
AuxK on latents silent for `dead_after` samples, weighted like ours), for the same `steps`, without
early stopping (sparsify has none). Its `SaeTrainer` itself hooks a model's forward pass over token
streams and cannot take precomputed pooled vectors, so the loop here stands in for it.

Measured (--quick, 4 of the demo's 8 layers, <= 600 steps, 2 shared CPU cores at load ~12, 1 thread;
means over layers; precision of the top 100):

    variant              val FVU  val dead  L0     steps  CPU s  precision
    relu l1=0.003 (dflt) 0.060    0.000     434.6  312    12.5   1.00
    relu l1=0.03         0.458    0.005      65.4  600    29.2   1.00
    relu l1=0.1          0.945    0.000     135.4  300    18.0   0.52
    topk k=32            0.271    0.023      32.0  512    37.3   1.00
    topk k=128           0.113    0.000     128.0  512    27.7   1.00
    topk k=256           0.058    0.000     256.0  475    29.6   1.00
    sparsify topk k=32   0.287    0.016      32.0  600    24.4   1.00
    activation (no SAE)                                          1.00

(three runs of --quick with --l1/--k; the same cached activations and held-out rows.) TopK
reconstructs held-out rows far better than ReLU at a similar or lower L0, and ours matches
sparsify's SparseCoder at k=32. Only k=256 reached the default ReLU's held-out FVU at a lower L0, by
0.002 (one seed, 4 layers), at 2.4x its CPU time, and a default k=256 would exceed the `d_sae` of
small configs; so `relu` stays the default for now. Early stopping on held-out FVU stops a ReLU SAE
before the L1 term has made it sparse (L0 435 of 1024 here).

    python -u bench/bench_sae_codes.py            # every variant
    python -u bench/bench_sae_codes.py --quick    # every other layer, 600 steps at most, 3 variants
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from finescope_core import curate, demo
from finescope_core.activations import load_activations
from finescope_core.config import CurateConfig, SAEConfig
from finescope_core.data import deduplicate, load_records, seed_copies
from finescope_core.model import load_model
from finescope_core.sae import encode, standardisation_stats, train_saes, validation_split
from finescope_core.saliency import LayerSaliency

DOMAIN = "math"
SEED = 0


@dataclass
class Demo:
    corpus_acts: torch.Tensor
    seed_acts: torch.Tensor
    layers: list[int]
    ids: list[str]
    exclude: list[int]
    extract_s: float


def demo_curate_config(num_layers: int) -> CurateConfig:
    """configs/demo.yaml's curate section (the SAE settings are the variants')."""
    return CurateConfig(
        final_size=100,
        top_m=100,
        num_layers=num_layers,
        k_act=128,
        probes=2,
        reference_size=64,
        max_length=64,
    )


def demo_activations(cache: Path, ccfg: CurateConfig) -> Demo:
    """Pooled corpus and seed activations of the demo, computed once per setting and cached."""
    tag = hashlib.sha256(ccfg.model_dump_json().encode()).hexdigest()[:12]
    root = cache / tag
    with tempfile.TemporaryDirectory() as tmp:
        data = demo.build_demo_corpus(Path(tmp))
        corpus = deduplicate(load_records([str(data.corpus)], role="corpus")).corpus
        seeds = load_records([str(data.seeds[DOMAIN])], role="seeds")
    ids, exclude = [r.id for r in corpus.records], seed_copies(corpus, seeds)
    start = time.perf_counter()
    if not (root / "done.json").is_file():
        model, tokenizer = load_model("default", device="cpu")
        layers = curate.hooked_layers(model.config.num_hidden_layers, ccfg)
        curate.saliency_stage(model, tokenizer, corpus, layers, ccfg, SEED, root / "saliency")
        indices = LayerSaliency.load(root / "saliency").indices
        curate.activation_stage(model, tokenizer, corpus, layers, indices, ccfg, root / "corpus")
        curate.activation_stage(model, tokenizer, seeds, layers, indices, ccfg, root / "seeds")
        (root / "done.json").write_text(json.dumps({"layers": layers}))
    layers = json.loads((root / "done.json").read_text())["layers"]
    return Demo(
        load_activations(root / "corpus"),
        load_activations(root / "seeds"),
        layers,
        ids,
        exclude,
        time.perf_counter() - start,
    )


def precision(
    corpus_emb: dict[int, np.ndarray], seed_emb: dict[int, np.ndarray], d: Demo, ccfg: CurateConfig
) -> float:
    """Domain precision of the curated set (top `final_size` of the layer vote) on these embeddings."""
    voted, _ = curate.select_records(
        "sae", corpus_emb, seed_emb, len(d.ids), ccfg, SEED, exclude_rows=d.exclude
    )
    return demo.domain_precision([d.ids[v.row] for v in voted], DOMAIN)


def split(x: torch.Tensor, layers: Sequence[int]) -> dict[int, np.ndarray]:
    return {layer: x[:, i].contiguous().float().numpy() for i, layer in enumerate(layers)}


def run_ours(name: str, cfg: SAEConfig, d: Demo, ccfg: CurateConfig) -> dict[str, Any]:
    start, cpu = time.perf_counter(), time.process_time()
    sae, metrics = train_saes(d.corpus_acts, cfg, seed=SEED, layer_ids=d.layers)
    seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
    prec = precision(
        split(encode(sae, d.corpus_acts), d.layers), split(encode(sae, d.seed_acts), d.layers), d, ccfg
    )

    def mean(key: str) -> float:
        return float(np.mean([getattr(m, key) for m in metrics]))

    return {
        "variant": name,
        "val_fvu": mean("val_fvu"),
        "val_dead": mean("val_dead_fraction"),
        "val_l0": mean("val_l0"),
        "train_fvu": mean("fvu"),
        "train_dead": mean("dead_fraction"),
        "steps": mean("steps_trained"),
        "seconds": seconds,
        "cpu_s": cpu,
        "precision": prec,
    }


def run_sparsify(k: int, cfg: SAEConfig, d: Demo, ccfg: CurateConfig) -> dict[str, Any]:
    """sparsify's TopK SparseCoder on the same standardised training rows, one layer at a time
    (see the docstring)."""
    from sparsify import SaeConfig, SparseCoder

    train_rows, val_rows = validation_split(len(d.corpus_acts), cfg.val_fraction, SEED)
    train, val = d.corpus_acts[train_rows].float(), d.corpus_acts[val_rows].float()
    mean, std = standardisation_stats(train, d.layers)
    lr = 2e-4 / (cfg.d_sae / 2**14) ** 0.5
    start, cpu = time.perf_counter(), time.process_time()
    val_fvu, val_dead, train_fvu, train_dead, codes_c, codes_s = [], [], [], [], [], []
    for i in range(len(d.layers)):
        torch.manual_seed(SEED + i)
        coder = SparseCoder(train.shape[-1], SaeConfig(num_latents=cfg.d_sae, k=k))
        opt = torch.optim.Adam(coder.parameters(), lr=lr)
        x_all = (train[:, i] - mean[i]) / std[i]
        since_fired = torch.zeros(cfg.d_sae, dtype=torch.long)
        gen = torch.Generator().manual_seed(SEED + i)
        perm, pos = torch.randperm(len(x_all), generator=gen), 0
        for _ in range(cfg.steps):
            if pos + cfg.batch_size > len(perm):
                perm, pos = torch.randperm(len(x_all), generator=gen), 0
            x = x_all[perm[pos : pos + cfg.batch_size]]
            pos += cfg.batch_size
            out = coder(x, dead_mask=since_fired >= cfg.dead_after)
            loss = out.fvu + cfg.aux_alpha * out.auxk_loss
            opt.zero_grad(set_to_none=True)
            loss.backward()
            coder.remove_gradient_parallel_to_decoder_directions()
            opt.step()
            coder.set_decoder_norm_to_unit_norm()
            fired = torch.zeros(cfg.d_sae, dtype=torch.bool)
            fired[out.latent_indices[out.latent_acts > 0]] = True
            since_fired += len(x)
            since_fired[fired] = 0
        with torch.no_grad():
            for rows, fvus, deads in ((val, val_fvu, val_dead), (train, train_fvu, train_dead)):
                out = coder((rows[:, i] - mean[i]) / std[i])  # FVU around these rows' own mean, as ours
                fired = torch.zeros(cfg.d_sae, dtype=torch.bool)
                fired[out.latent_indices[out.latent_acts > 0]] = True
                deads.append(float((~fired).float().mean()))
                fvus.append(float(out.fvu))
            for acts, sink in ((d.corpus_acts, codes_c), (d.seed_acts, codes_s)):
                enc = coder.encode((acts[:, i].float() - mean[i]) / std[i])
                sink.append(torch.zeros(len(acts), cfg.d_sae).scatter(1, enc.top_indices, enc.top_acts))
    seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
    prec = precision(
        split(torch.stack(codes_c, 1), d.layers), split(torch.stack(codes_s, 1), d.layers), d, ccfg
    )
    return {
        "variant": f"sparsify topk k={k}",
        "val_fvu": float(np.mean(val_fvu)),
        "val_dead": float(np.mean(val_dead)),
        "val_l0": float(k),
        "train_fvu": float(np.mean(train_fvu)),
        "train_dead": float(np.mean(train_dead)),
        "steps": float(cfg.steps),
        "seconds": seconds,
        "cpu_s": cpu,
        "precision": prec,
    }


def sparsify_status() -> str | None:
    """None when sparsify can be used, else why not."""
    try:
        import sparsify  # noqa: F401
    except Exception as err:  # not installed, or a dependency missing
        return f"{type(err).__name__}: {err}"
    return None


def print_table(rows: list[dict[str, Any]]) -> None:
    cols = [
        "variant",
        "val_fvu",
        "val_dead",
        "val_l0",
        "train_fvu",
        "train_dead",
        "steps",
        "seconds",
        "cpu_s",
        "precision",
    ]
    print("| " + " | ".join(cols) + " |")
    print("|" + "|".join("---" for _ in cols) + "|")
    for r in rows:
        cells = [r["variant"]] + [
            f"{r[c]:.3f}"
            if c in ("val_fvu", "val_dead", "train_fvu", "train_dead", "precision")
            else f"{r[c]:.1f}"
            for c in cols[1:]
        ]
        print("| " + " | ".join(cells) + " |")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--quick", action="store_true", help="every other layer, 600 steps at most, 3 variants"
    )
    parser.add_argument(
        "--cache", type=Path, default=Path(tempfile.gettempdir()) / "finescope-bench-sae-codes"
    )
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 on a shared machine)")
    parser.add_argument("--no-sparsify", action="store_true")
    parser.add_argument(
        "--l1",
        type=float,
        nargs="*",
        help="ReLU variants' l1_coef values (default: 3e-3 1e-2 3e-2; --quick 3e-3)",
    )
    parser.add_argument(
        "--k", type=int, nargs="*", help="TopK variants' k values (default: 16 32 64; --quick 32)"
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    ccfg = demo_curate_config(8)
    d = demo_activations(args.cache, ccfg)
    if args.quick:  # the same cached activations, half the layers
        keep = list(range(0, len(d.layers), 2))
        d = Demo(
            d.corpus_acts[:, keep],
            d.seed_acts[:, keep],
            [d.layers[i] for i in keep],
            d.ids,
            d.exclude,
            d.extract_s,
        )
    base = SAEConfig(steps=600 if args.quick else 1000)  # configs/demo.yaml trains 1000 steps
    relu = args.l1 if args.l1 is not None else [3e-3] if args.quick else [3e-3, 1e-2, 3e-2]
    ks = args.k if args.k is not None else [32] if args.quick else [16, 32, 64]
    print(
        f"machine: {os.cpu_count()} CPUs ({platform.processor() or 'cpu'}), torch {torch.__version__}, "
        f"{args.threads} thread(s)\n"
        f"demo: {len(d.ids)} corpus records, {len(d.seed_acts)} {DOMAIN} seeds, "
        f"layers {d.layers}, k_act {ccfg.k_act}; "
        f"activations {d.extract_s:.0f} s (0: cached)\n"
        f"SAEs: d_sae {base.d_sae}, steps <= {base.steps}, batch {base.batch_size}, lr {base.lr}, "
        f"val_fraction {base.val_fraction}, "
        f"eval_every {base.eval_every}, patience {base.patience}; means over layers; "
        f"precision of the top {ccfg.final_size}"
    )
    rows = []
    # The `activation` baseline: the pooled activations z-scored with corpus statistics, as curate does.
    mean, std = (
        d.corpus_acts.float().mean(0, keepdim=True),
        d.corpus_acts.float().std(0, keepdim=True).clamp_min(1e-6),
    )
    base_prec = precision(
        split((d.corpus_acts - mean) / std, d.layers), split((d.seed_acts - mean) / std, d.layers), d, ccfg
    )
    nan = float("nan")
    rows.append(
        {
            "variant": "activation (no SAE)",
            "val_fvu": nan,
            "val_dead": nan,
            "val_l0": nan,
            "train_fvu": nan,
            "train_dead": nan,
            "steps": 0.0,
            "seconds": 0.0,
            "cpu_s": 0.0,
            "precision": base_prec,
        }
    )
    for coef in relu:
        rows.append(run_ours(f"relu l1={coef:g}", base.model_copy(update={"l1_coef": coef}), d, ccfg))
        print_table(rows[-1:])
    for k in ks:
        rows.append(run_ours(f"topk k={k}", base.model_copy(update={"kind": "topk", "k": k}), d, ccfg))
        print_table(rows[-1:])
    why = "--no-sparsify" if args.no_sparsify else sparsify_status()
    if why is None:
        for k in ks:
            rows.append(run_sparsify(k, base, d, ccfg))
            print_table(rows[-1:])
    else:
        print(f"sparsify skipped: {why}")
    print()
    print_table(rows)


if __name__ == "__main__":
    main()
