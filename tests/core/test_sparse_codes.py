"""Sparse SAE codes on disk (`sae.codes`) and curation streamed over them, against the dense path.

The dense path is how curation worked before codes were stored: every corpus code decoded into one
[N, d_sae] matrix per layer (`curate.sae_codes`), then `select_records` on it. The streamed path reads
the stored codes shard by shard. With a TopK SAE whose k fits `code_k` and float32 values, the stored
codes are the codes, so the curated records must be the same, in the same order, with the same scores.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from finescope_core import curate as core
from finescope_core import sae as sae_lib
from finescope_core.activations import load_activations
from finescope_core.config import CurateConfig
from finescope_core.data import RecordSet
from finescope_core.sae.codes import CodesError, SparseCodeSource, dense_layer, top_nonzeros, write_codes
from finescope_core.saliency import LayerSaliency
from finescope_core.tiny import byte_tokenizer, tiny_model
from tests.core.test_planted_topic import LAYERS, planted_corpus

SLICES = [(0, 150), (150, 151), (151, 440)]  # three corpus shards, one of a single record


def _cfg(kind: str, **over: object) -> CurateConfig:
    sae = {"d_sae": 64, "steps": 200, "batch_size": 64, "kind": kind, "k": 8}
    return CurateConfig(
        final_size=40,
        top_m=40,
        k_act=16,
        probes=1,
        reference_size=48,
        max_length=32,
        batch_size=32,
        sae=sae,
        **over,
    )  # type: ignore[arg-type]


@pytest.fixture(scope="module", params=["topk", "relu"])
def run(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Corpus activations in three shards, SAEs trained on them, seed activations."""
    kind = request.param
    work = tmp_path_factory.mktemp(f"codes-{kind}")
    cfg = _cfg(kind)
    corpus, seeds, planted = planted_corpus()
    model, tok = tiny_model("llama", hidden=48, layers=3, intermediate=96), byte_tokenizer()
    (work / "saliency").mkdir()
    core.saliency_stage(model, tok, corpus, LAYERS, cfg, 0, work / "saliency")
    indices = LayerSaliency.load(work / "saliency").indices
    dirs = []
    for a, b in SLICES:
        d = work / f"corpus-{a}"
        d.mkdir()
        core.activation_stage(model, tok, RecordSet(corpus.records[a:b]), LAYERS, indices, cfg, d)
        dirs.append(d)
    (work / "seeds").mkdir()
    core.activation_stage(model, tok, seeds, LAYERS, indices, cfg, work / "seeds")
    (work / "sae").mkdir()
    core.sae_stage(dirs, LAYERS, indices, cfg, 0, work / "sae")
    return {"kind": kind, "cfg": cfg, "work": work, "dirs": dirs, "corpus": corpus, "planted": planted}


def _codes(run: dict, code_k: int | None, value_dtype: str) -> list[Path]:
    model, layers, _ = sae_lib.load_saes(run["work"] / "sae")
    out = []
    for d in run["dirs"]:
        target = run["work"] / f"codes-{code_k}-{value_dtype}" / d.name
        write_codes(model, d, layers, target, code_k=code_k, value_dtype=value_dtype, chunk=64)
        out.append(target)
    return out


def _dense(run: dict, cfg: CurateConfig):
    corpus_emb, seed_emb = core.sae_codes(run["dirs"], run["work"] / "seeds", run["work"] / "sae")
    ids = [r.id for r in run["corpus"].records]
    return core.curate_records("sae", corpus_emb, seed_emb, len(ids), cfg, 0, [3, 99], ids=ids)


def _streamed(run: dict, cfg: CurateConfig, code_dirs: list[Path]):
    source, seed_emb = core.streamed_embeddings(
        "sae", run["dirs"], [run["work"] / "seeds"], LAYERS, sae_dir=run["work"] / "sae", code_dirs=code_dirs
    )
    ids = [r.id for r in run["corpus"].records]
    return core.curate_records("sae", source, seed_emb, len(ids), cfg, 0, [3, 99], ids=ids)


def test_stored_codes_decode_to_the_encoded_codes(run: dict) -> None:
    model, _, _ = sae_lib.load_saes(run["work"] / "sae")
    dense = sae_lib.encode(model, load_activations(run["dirs"]))
    dirs = _codes(run, None, "float32")  # every nonzero latent (the default, `curate.code_k: all`)
    for i in range(len(LAYERS)):
        # Encoding a 1-record shard alone rounds differently from inside a batch (BLAS): ulps, no more.
        np.testing.assert_allclose(dense_layer(dirs, i), dense[:, i].numpy(), rtol=1e-6, atol=1e-7)
        assert ((dense_layer(dirs, i) > 0) == (dense[:, i] > 0).numpy()).all()
    info = SparseCodeSource(dirs).info()
    assert info["truncated_fraction"] == 0
    stored = sum(len(shard.values) for _, shard in SparseCodeSource(dirs).shards())
    assert stored == int((dense > 0).sum())  # CSR: exactly the nonzeros, no padding
    assert info["mean_l0"] == pytest.approx(
        float((dense > 0).sum(-1).float().mean()), abs=0.01
    )  # rounded to 2 places


@pytest.mark.parametrize("weighting", ["vote", "quality", "agreement"])
@pytest.mark.parametrize("expand", [0, 5])
def test_streamed_curation_equals_the_dense_path(run: dict, weighting: str, expand: int) -> None:
    cfg = run["cfg"].model_copy(update={"layer_weighting": weighting, "expand_seeds": expand})
    # TopK with k = 8 is stored exactly at code_k 8; ReLU codes need every nonzero latent (None).
    code_k = 8 if run["kind"] == "topk" else None
    dense, streamed = _dense(run, cfg), _streamed(run, cfg, _codes(run, code_k, "float32"))
    assert [v.row for v in streamed.voted] == [v.row for v in dense.voted]
    assert [v.votes for v in streamed.voted] == pytest.approx([v.votes for v in dense.voted], rel=1e-6)
    np.testing.assert_allclose(
        [v.mean_score for v in streamed.voted], [v.mean_score for v in dense.voted], rtol=1e-6
    )
    assert streamed.summary.keys() == dense.summary.keys()
    assert streamed.summary["effective_top_m"] == dense.summary["effective_top_m"]
    assert streamed.mean_scores is not None and len(streamed.mean_scores) == len(run["corpus"])


def test_truncated_half_precision_codes_keep_the_curated_set(run: dict) -> None:
    """The defaults' storage (float16, the largest latents only) changes the set little, and says
    how much it cut."""
    dense = _dense(run, run["cfg"])
    dirs = _codes(run, 6, "float16")
    streamed = _streamed(run, run["cfg"], dirs)
    same = len({v.row for v in streamed.voted} & {v.row for v in dense.voted}) / len(dense.voted)
    assert same >= 0.8, f"{run['kind']}: {same:.2f} of the curated set kept"
    planted = run["planted"]
    assert planted[[v.row for v in streamed.voted]].mean() >= 0.8
    assert SparseCodeSource(dirs).info()["truncated_fraction"] > 0  # 6 < k = 8 (TopK) and < L0 (ReLU)


def test_activation_baseline_streamed_equals_dense(run: dict) -> None:
    ids = [r.id for r in run["corpus"].records]
    corpus_emb, seed_emb = core.raw_activation_embeddings(run["dirs"], run["work"] / "seeds", LAYERS)
    dense = core.curate_records("activation", corpus_emb, seed_emb, len(ids), run["cfg"], 0, ids=ids)
    source, s_emb = core.streamed_embeddings("activation", run["dirs"], [run["work"] / "seeds"], LAYERS)
    streamed = core.curate_records("activation", source, s_emb, len(ids), run["cfg"], 0, ids=ids)
    # float64 statistics vs torch's float32 ones: the same records, scores equal to float rounding.
    assert [v.row for v in streamed.voted] == [v.row for v in dense.voted]
    np.testing.assert_allclose(
        [v.mean_score for v in streamed.voted], [v.mean_score for v in dense.voted], rtol=1e-4
    )


def test_top_nonzeros_pads_short_codes_and_counts_nonzeros() -> None:
    codes = torch.tensor([[0.0, 3.0, 0.0, 1.0, 2.0], [5.0, 0.0, 0.0, 0.0, 0.0], [0.0] * 5])
    values, indices, nonzero = top_nonzeros(codes, 3)
    assert values.tolist() == [[3.0, 2.0, 1.0], [5.0, 0.0, 0.0], [0.0, 0.0, 0.0]]
    assert indices[0].tolist() == [1, 4, 3] and indices[1, 0] == 0
    assert nonzero.tolist() == [3, 1, 0]


def test_bad_code_settings_and_directories_are_named(run: dict, tmp_path: Path) -> None:
    model, layers, _ = sae_lib.load_saes(run["work"] / "sae")
    with pytest.raises(CodesError, match="value dtype 'int8'"):
        write_codes(model, run["dirs"][0], layers, tmp_path / "x", code_k=8, value_dtype="int8")
    with pytest.raises(CodesError, match="codes.json does not exist"):
        SparseCodeSource([tmp_path])
    wrong = sae_lib.BatchedSAE.initialised(7, 64, [0] * len(layers))  # 7 inputs, not k_act = 16
    with pytest.raises(CodesError, match="to match the SAEs"):
        write_codes(wrong, run["dirs"][0], layers, tmp_path / "y", code_k=8)
