"""Jacobian saliency (eq. 6-10): Hutchinson vs exact Jacobian, one pass vs per-layer passes, padding, sdpa."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch.testing import assert_close

from finescope_core.batching import TextBatch, iter_text_batches
from finescope_core.saliency import (
    LayerSaliency,
    SaliencyError,
    batch_saliency,
    compute_saliency,
    exact_saliency,
    jacobian_saliency,
    rademacher_probe,
    select_coordinates,
    statistic_scores,
)
from finescope_core.tiny import byte_tokenizer, tiny_model

TEXTS = ["the cat sat on the mat", "hi", "forward-mode autodiff", "a b c d"]
ARCHS = ["llama", "qwen3"]


def _batch(texts: list[str], max_length: int = 24) -> TextBatch:
    return next(iter_text_batches(byte_tokenizer(), texts, max_length=max_length, batch_size=len(texts)))


def _probes(batch: TextBatch, r: int, seed: int, width: int = 48) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.stack([rademacher_probe(batch.attention_mask, width, g, torch.float32) for _ in range(r)])


@pytest.mark.parametrize("arch", ARCHS)
def test_hutchinson_converges_to_exact_row_norms(arch: str) -> None:
    model = tiny_model(arch, layers=2, hidden=32, heads=4, kv_heads=2, intermediate=64)
    small = _batch(["the cat sat", "hi!"])
    exact_sq = exact_saliency(model, small, [0, 1], skip_first=1).square()  # [2, L, d]
    # 1000 copies of each text x 2 probes = 2000 independent probes per text, in two JVP passes.
    copies = 1000
    big = TextBatch(
        small.input_ids.repeat_interleave(copies, 0),
        small.attention_mask.repeat_interleave(copies, 0),
        torch.arange(2 * copies),
    )
    s_hat = batch_saliency(model, big, [0, 1], _probes(big, 2, seed=1, width=32), skip_first=1)
    estimate = s_hat.square().view(2, copies, 2, -1).mean(dim=1)
    # Var(u_j^2) <= 2 ||J_j||^4 for Rademacher probes, so the relative std of a 2000-probe mean is
    # <= sqrt(2/2000) = 0.032; 0.15 is ~5 sigma, safe over the 128 coordinates checked (seeded anyway).
    assert_close(estimate, exact_sq, rtol=0.15, atol=0.0)
    assert exact_sq.min() > 0


@pytest.mark.parametrize("arch", ARCHS)
def test_all_layers_in_one_pass_equal_per_layer_passes(arch: str) -> None:
    model = tiny_model(arch, layers=3)
    batch = _batch(TEXTS)
    probes = _probes(batch, 3, seed=2)
    layers = [2, 0, 1]
    together = batch_saliency(model, batch, layers, probes, skip_first=1)
    for i, layer in enumerate(layers):
        alone = batch_saliency(model, batch, [layer], probes, skip_first=1)
        assert_close(together[:, i], alone[:, 0], rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("arch", ARCHS)
def test_padded_batch_matches_each_sample_alone(arch: str) -> None:
    model = tiny_model(arch)
    batch = _batch(TEXTS)
    assert (batch.attention_mask == 0).any(), "the test needs padding"
    probes = _probes(batch, 2, seed=3)
    batched = batch_saliency(model, batch, [0, -1], probes, skip_first=1)
    for b in range(len(batch)):
        n = int(batch.attention_mask[b].sum())
        alone = TextBatch(
            batch.input_ids[b : b + 1, :n], batch.attention_mask[b : b + 1, :n], batch.rows[b : b + 1]
        )
        single = batch_saliency(model, alone, [0, -1], probes[:, b : b + 1, :n], skip_first=1)
        assert_close(batched[b], single[0], rtol=1e-4, atol=1e-6)


def test_jacobian_saliency_is_mean_over_corpus_of_per_sample_estimates() -> None:
    model = tiny_model("llama")
    batches = list(iter_text_batches(byte_tokenizer(), TEXTS * 2, max_length=24, batch_size=3))
    g = torch.Generator().manual_seed(4)
    seen: list[tuple[int, int]] = []
    got = jacobian_saliency(
        model, batches, [0, 1], probes=2, skip_first=1, generator=g, progress=lambda d, t: seen.append((d, t))
    )
    # Same draws in the same order (per batch, probe by probe) from a fresh generator.
    g_ref = torch.Generator().manual_seed(4)
    per_sample = []
    for batch in batches:
        probes = torch.stack(
            [rademacher_probe(batch.attention_mask, 48, g_ref, torch.float32) for _ in range(2)]
        )
        per_sample.append(batch_saliency(model, batch, [0, 1], probes, skip_first=1))
    assert_close(got, torch.cat(per_sample).mean(dim=0))
    assert seen == [(3, 8), (6, 8), (8, 8)]


@pytest.mark.parametrize("arch", ARCHS)
def test_sdpa_model_gives_eager_result_and_is_restored(arch: str) -> None:
    eager, sdpa = tiny_model(arch, seed=5), tiny_model(arch, seed=5, attn_implementation="sdpa")
    batches = [_batch(TEXTS)]
    w_eager = jacobian_saliency(
        eager, batches, [0, 1], probes=2, skip_first=1, generator=torch.Generator().manual_seed(0)
    )
    w_sdpa = jacobian_saliency(
        sdpa, batches, [0, 1], probes=2, skip_first=1, generator=torch.Generator().manual_seed(0)
    )
    assert_close(w_sdpa, w_eager, rtol=1e-5, atol=1e-7)
    assert sdpa.config._attn_implementation == "sdpa"


def test_select_coordinates_orders_by_score_and_breaks_ties_by_index() -> None:
    scores = torch.tensor([[0.1, 0.9, 0.5, 0.9], [3.0, 2.0, 1.0, 0.0]])
    assert select_coordinates(scores, 3).tolist() == [[1, 3, 2], [0, 1, 2]]
    assert select_coordinates(scores, 4).shape == (2, 4)
    with pytest.raises(SaliencyError, match="k_act=5.*d=4"):
        select_coordinates(scores, 5)
    with pytest.raises(SaliencyError, match="k_act=0"):
        select_coordinates(scores, 0)


def test_statistic_scores_match_their_definitions() -> None:
    pooled = torch.randn(10, 2, 6, generator=torch.Generator().manual_seed(0)) * torch.arange(1, 7)
    assert_close(statistic_scores(pooled, "magnitude"), pooled.abs().mean(0))
    assert_close(statistic_scores(pooled, "variance"), ((pooled - pooled.mean(0)) ** 2).mean(0))
    with pytest.raises(SaliencyError, match="selector"):
        statistic_scores(pooled, "median")  # type: ignore[arg-type]


@pytest.mark.parametrize("selector", ["jacobian", "magnitude", "variance"])
def test_compute_saliency_selects_top_k_of_its_scores(selector: str, tmp_path: Path) -> None:
    model = tiny_model("qwen3", layers=3)
    batches = list(iter_text_batches(byte_tokenizer(), TEXTS, max_length=24, batch_size=2))
    sal = compute_saliency(
        model,
        batches,
        [-1, 0],
        selector=selector,
        k_act=8,
        probes=2,
        skip_first=1,
        generator=torch.Generator(),
    )
    assert sal.layers == [2, 0] and sal.selector == selector
    assert sal.scores.shape == (2, 48) and sal.indices.shape == (2, 8)
    top = torch.gather(sal.scores, 1, sal.indices)
    assert (top[:, :-1] >= top[:, 1:]).all()
    assert (top[:, -1:] >= sal.scores.sort(dim=1, descending=True).values[:, 8:]).all()
    loaded = LayerSaliency.load(sal.save(tmp_path / "sal"))
    assert loaded.layers == sal.layers and loaded.selector == selector
    assert torch.equal(loaded.scores, sal.scores) and torch.equal(loaded.indices, sal.indices)


def test_compute_saliency_rejects_bad_input_before_running_the_model() -> None:
    model = tiny_model("llama")

    def no_batches():
        raise AssertionError("the model must not run")
        yield

    with pytest.raises(SaliencyError, match="k_act=49.*d=48"):
        compute_saliency(
            model,
            no_batches(),
            [0],
            selector="jacobian",
            k_act=49,
            probes=1,
            skip_first=1,
            generator=torch.Generator(),
        )
    with pytest.raises(SaliencyError, match="probes=0"):
        jacobian_saliency(model, no_batches(), [0], probes=0, skip_first=1, generator=torch.Generator())
    with pytest.raises(SaliencyError, match="empty"):
        jacobian_saliency(model, [], [0], probes=1, skip_first=1, generator=torch.Generator())
    with pytest.raises(SaliencyError, match="no saliency.json"):
        LayerSaliency.load(Path("/nonexistent"))


@pytest.mark.slow
def test_default_model_with_sdpa_switches_to_eager_and_matches() -> None:
    """The real architecture (SmolLM2-135M, loaded with sdpa as load_model does by default)."""
    from finescope_core.model import load_model

    model, tok = load_model("default", Path(__file__).resolve().parents[2] / ".finescope-cache", device="cpu")
    assert model.config._attn_implementation == "sdpa"
    batches = list(
        iter_text_batches(tok, ["The mitochondria is the powerhouse.", "Hi"], max_length=16, batch_size=2)
    )
    got = jacobian_saliency(
        model, batches, [0, 14, -1], probes=1, skip_first=1, generator=torch.Generator().manual_seed(0)
    )
    assert model.config._attn_implementation == "sdpa"
    model.set_attn_implementation("eager")
    ref = jacobian_saliency(
        model, batches, [0, 14, -1], probes=1, skip_first=1, generator=torch.Generator().manual_seed(0)
    )
    assert_close(got, ref)
    assert got.shape == (3, 576) and bool((got > 0).all())
