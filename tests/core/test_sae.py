"""Tests for finescope_core.sae: batched SAEs, the §6 losses, training, save/load."""

from __future__ import annotations

import json
from typing import Any

import pytest
import torch
from torch.testing import assert_close

from finescope_core.config import SAEConfig
from finescope_core.sae import (
    BatchedSAE,
    DeadLatentTracker,
    SAEInputError,
    auxk_loss,
    encode,
    evaluate_saes,
    fvu_loss,
    layer_seed,
    load_saes,
    sae_losses,
    save_saes,
    total_variance,
    train_saes,
    validation_split,
)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """These tensors are too small to gain from intra-op threads, and on a busy 2-core machine
    torch's two OpenMP threads wait on each other (a 40-step run took 7 s instead of 0.25 s)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def sparse_data(
    n: int = 2000, k: int = 32, atoms: int = 64, active: int = 3, layers: int = 2
) -> torch.Tensor:
    """x = sparse non-negative codes @ a random unit dictionary, a different one per layer. [n, L, k]"""
    gen = torch.Generator().manual_seed(1234)
    out = []
    for _ in range(layers):
        dictionary = torch.randn(atoms, k, generator=gen)
        dictionary /= dictionary.norm(dim=1, keepdim=True)
        which = torch.rand(n, atoms, generator=gen).argsort(dim=1)[:, :active]
        codes = torch.zeros(n, atoms).scatter(1, which, 0.5 + 2 * torch.rand(n, active, generator=gen))
        out.append(codes @ dictionary)
    return torch.stack(out, dim=1)


def random_sae(num_layers: int = 3, d_in: int = 8, d_sae: int = 16, seed: int = 0) -> BatchedSAE:
    """An SAE with every parameter and buffer random (not the training init), to test the maths."""
    sae = BatchedSAE.initialised(d_in, d_sae, [layer_seed(seed, i) for i in range(num_layers)])
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for t in sae.state_dict().values():
            t.copy_(torch.randn(t.shape, generator=gen))
        sae.std.abs_().add_(0.5)
        sae.normalize_decoder_()
    return sae


SMALL = SAEConfig(kind="relu", d_sae=64, steps=40, batch_size=64, lr=3e-3, dead_after=128, k_aux=16)


def test_batched_forward_matches_per_layer_loop() -> None:
    sae = random_sae()
    x = torch.randn(3, 5, 8)
    out = sae(x)
    for i in range(3):
        pre = (x[i] - sae.b_dec[i]) @ sae.W_enc[i] + sae.b_enc[i]
        codes = torch.clamp(pre, min=0)
        assert_close(out.pre_acts[i], pre)
        assert_close(out.codes[i], codes)
        assert_close(out.recon[i], codes @ sae.W_dec[i] + sae.b_dec[i])


def test_normalize_and_encode_use_stored_statistics() -> None:
    sae = random_sae()
    acts = torch.randn(7, 3, 8)
    codes = encode(sae, acts, batch_size=3)
    for i in range(3):
        x_norm = (acts[:, i] - sae.mean[i]) / sae.std[i]
        expected = torch.clamp((x_norm - sae.b_dec[i]) @ sae.W_enc[i] + sae.b_enc[i], min=0)
        assert_close(codes[:, i], expected)


def test_decoder_gradient_keeps_rows_unit_norm() -> None:
    sae = random_sae()
    sae(torch.randn(3, 5, 8)).recon.pow(2).sum().backward()
    sae.remove_parallel_decoder_grad_()
    parallel = (sae.W_dec.grad * sae.W_dec).sum(dim=-1) / sae.W_dec.grad.norm(dim=-1).clamp_min(1e-6)
    assert_close(parallel, torch.zeros(3, 16), atol=1e-5, rtol=0)
    with torch.no_grad():
        sae.W_dec.mul_(3.0)
    sae.normalize_decoder_()
    assert_close(sae.W_dec.norm(dim=-1), torch.ones(3, 16))


def test_fvu_matches_direct_computation() -> None:
    x = torch.randn(2, 10, 4)
    recon = torch.randn(2, 10, 4)
    got = fvu_loss(x, recon, total_variance(x))
    for i in range(2):
        err = sum(float(((recon[i, b] - x[i, b]) ** 2).sum()) for b in range(10))
        mean = x[i].mean(dim=0)
        var = sum(float(((x[i, b] - mean) ** 2).sum()) for b in range(10))
        assert got[i].item() == pytest.approx(err / var, rel=1e-5)


def test_loss_terms_combine_as_eq27() -> None:
    sae = random_sae()
    x = torch.randn(3, 6, 8)
    cfg = SAEConfig(kind="relu", d_sae=16, l1_coef=0.1, aux_alpha=0.5, k_aux=4)
    dead = torch.zeros(3, 16, dtype=torch.bool)
    dead[:, :5] = True
    losses = sae_losses(sae, x, dead, cfg)
    codes = sae(x).codes
    assert_close(losses.l1, codes.abs().sum(dim=-1).mean(dim=-1))
    assert_close(losses.total, losses.fvu + 0.5 * losses.auxk + 0.1 * losses.l1)
    assert (losses.auxk > 0).all()


def test_auxk_matches_hand_computation() -> None:
    torch.manual_seed(0)
    num_layers, batch, d_in, d_sae, k_aux = 2, 4, 3, 6, 2
    w_dec = torch.randn(num_layers, d_sae, d_in)
    pre = torch.randn(num_layers, batch, d_sae, requires_grad=True)
    residual = torch.randn(num_layers, batch, d_in)
    variance = torch.tensor([3.0, 5.0])
    dead = torch.zeros(num_layers, d_sae, dtype=torch.bool)
    dead[0, [1, 3, 4]] = True  # three dead: top-2 of them per sample, s = 1
    dead[1, 5] = True  # one dead: only it is decoded, s = 1/2
    got = auxk_loss(w_dec, pre, residual, dead, k_aux, variance)
    got.sum().backward()
    values = pre.detach()
    expected_grad = torch.zeros_like(values)
    for layer in range(num_layers):
        dead_ids = dead[layer].nonzero().flatten().tolist()
        s = min(len(dead_ids) / k_aux, 1.0)
        total = 0.0
        for b in range(batch):
            ranked = sorted(dead_ids, key=lambda j: -float(values[layer, b, j]))[:k_aux]
            e_hat = sum(max(float(values[layer, b, j]), 0.0) * w_dec[layer, j] for j in ranked)
            diff = e_hat - residual[layer, b]
            total += float((diff**2).sum())
            for j in ranked:  # straight through the ReLU: d/dpre = d/dcode even where pre < 0
                expected_grad[layer, b, j] = 2 * s * float(w_dec[layer, j] @ diff) / float(variance[layer])
        assert got[layer].item() == pytest.approx(s * total / float(variance[layer]), rel=1e-5)
    assert_close(pre.grad, expected_grad)


def test_auxk_is_zero_without_dead_latents() -> None:
    pre = torch.randn(2, 4, 6, requires_grad=True)
    dead = torch.zeros(2, 6, dtype=torch.bool)
    dead[1, 0] = True  # layer 0 has none; layer 1 has one
    got = auxk_loss(torch.randn(2, 6, 3), pre, torch.randn(2, 4, 3), dead, 3, torch.ones(2))
    assert got[0].item() == 0.0 and got[1].item() > 0
    none = auxk_loss(
        torch.randn(2, 6, 3), pre, torch.randn(2, 4, 3), torch.zeros_like(dead), 3, torch.ones(2)
    )
    assert_close(none, torch.zeros(2))


def test_auxk_sends_gradient_to_dead_latents_only_when_enabled() -> None:
    sae = random_sae(num_layers=1)
    x = torch.randn(1, 32, 8)
    with torch.no_grad():
        sae.W_enc[0, :, 2] = 0.0
        sae.b_enc[0, 2] = -5.0  # latent 2 can never fire: no FVU/L1 gradient reaches it
    dead = torch.zeros(1, 16, dtype=torch.bool)
    dead[0, 2] = True
    for alpha, expect_grad in ((0.0, False), (1 / 32, True)):
        sae.zero_grad()
        cfg = SAEConfig(kind="relu", d_sae=16, aux_alpha=alpha, k_aux=4)
        sae_losses(sae, x, dead, cfg).total.sum().backward()
        assert (sae.b_enc.grad[0, 2].abs() > 0).item() is expect_grad


def test_auxk_revives_latents_that_never_fire(monkeypatch) -> None:
    fresh = BatchedSAE.initialised

    def half_dead_init(d_in: int, d_sae: int, layer_seeds: list[int], *args: Any) -> BatchedSAE:
        sae = fresh(d_in, d_sae, layer_seeds, *args)
        with torch.no_grad():
            sae.b_enc[:, :32] = -1.0  # silent on (almost) every sample from the first step
        return sae

    monkeypatch.setattr(BatchedSAE, "initialised", half_dead_init)
    acts = sparse_data(n=1000, k=16, atoms=64, active=3, layers=1)
    cfg = SAEConfig(
        kind="relu", d_sae=128, steps=300, batch_size=64, lr=3e-3, l1_coef=3e-2, dead_after=128, k_aux=32
    )
    _, without = train_saes(acts, cfg.model_copy(update={"aux_alpha": 0.0}), seed=0)
    _, with_auxk = train_saes(acts, cfg, seed=0)
    assert without[0].dead_fraction > 0.2
    assert with_auxk[0].dead_fraction < 0.05


def test_dead_tracker_reports_latent_with_negative_encoder() -> None:
    sae = random_sae(num_layers=2, d_sae=16)
    with torch.no_grad():
        sae.b_dec.zero_()
        sae.b_enc.zero_()
        sae.W_enc[1, :, 7] = 0.0
        sae.b_enc[1, 7] = -1.0
    tracker = DeadLatentTracker(2, 16, dead_after=64)
    gen = torch.Generator().manual_seed(0)
    for step in range(4):
        tracker.update(sae(torch.randn(2, 32, 8, generator=gen)).codes)
        if step == 0:
            assert not tracker.dead_mask().any()  # 32 samples < dead_after
    expected = torch.zeros(2, 16, dtype=torch.bool)
    expected[1, 7] = True
    assert torch.equal(tracker.dead_mask(), expected)
    assert_close(evaluate_saes(sae, torch.randn(256, 2, 8)).dead_fraction, torch.tensor([0.0, 1 / 16]))


def test_training_recovers_sparse_dictionary() -> None:
    acts = sparse_data()
    cfg = SAEConfig(
        kind="relu", d_sae=128, steps=300, batch_size=128, lr=3e-3, l1_coef=3e-2, dead_after=512, k_aux=32
    )
    calls = []
    sae, metrics = train_saes(acts, cfg, seed=0, progress=lambda *args, **info: calls.append((*args, info)))
    assert len(metrics) == 2
    assert len(calls) == 100 and calls[-1][:2] == (300, 300)
    assert calls[-1][2]["fvu"] == [m.fvu_curve[-1] for m in metrics]
    for m in metrics:
        assert m.fvu < 0.2
        assert m.l0 < 0.3 * cfg.d_sae
        assert m.fvu_curve[-1] < 0.5 * m.fvu_curve[0]
        assert len(m.loss_curve) == len(m.fvu_curve) == len(m.curve_steps) == 100
    assert_close(sae.W_dec.norm(dim=-1), torch.ones(2, 128))
    # `fvu` is over the training rows (the held-out ones have their own metrics).
    train_rows, _ = validation_split(len(acts), cfg.val_fraction, 0)
    assert_close(evaluate_saes(sae, acts[train_rows]).fvu, torch.tensor([m.fvu for m in metrics]))


def test_training_stores_standardisation_statistics() -> None:
    acts = sparse_data(n=300, layers=2) * torch.tensor([1.0, 50.0])[None, :, None] + 7.0
    sae, _ = train_saes(acts, SMALL.model_copy(update={"steps": 2}), seed=0)
    train_rows, _ = validation_split(len(acts), SMALL.val_fraction, 0)  # the held-out rows are not seen
    assert_close(sae.mean, acts[train_rows].mean(dim=0))
    assert_close(sae.std, acts[train_rows].std(dim=0, unbiased=False))


def test_training_is_deterministic() -> None:
    acts = sparse_data(n=300)
    a, ma = train_saes(acts, SMALL, seed=3)
    b, mb = train_saes(acts, SMALL, seed=3)
    c, _ = train_saes(acts, SMALL, seed=4)
    for name, t in a.state_dict().items():
        assert torch.equal(t, b.state_dict()[name]), name
    assert ma == mb
    assert not torch.equal(a.W_dec, c.W_dec)


def test_per_layer_training_stacks_to_joint_training() -> None:
    acts = sparse_data(n=300, layers=3)
    layers = [4, 9, 13]
    joint, joint_metrics = train_saes(acts, SMALL, seed=5, layer_ids=layers)
    parts = [train_saes(acts[:, [i]], SMALL, seed=5, layer_ids=[layer]) for i, layer in enumerate(layers)]
    stacked = BatchedSAE.stack([sae for sae, _ in parts])
    for name, t in joint.state_dict().items():
        assert_close(stacked.state_dict()[name], t, rtol=1e-5, atol=1e-6, msg=name)
    for i, (_, metrics) in enumerate(parts):
        assert metrics[0].fvu == pytest.approx(joint_metrics[i].fvu, rel=1e-4)


def test_layer_and_stack_round_trip() -> None:
    sae = random_sae(num_layers=3)
    rebuilt = BatchedSAE.stack([sae.layer(i) for i in range(3)])
    for name, t in sae.state_dict().items():
        assert torch.equal(rebuilt.state_dict()[name], t)
    assert torch.equal(sae.layer(-1).W_enc[0], sae.W_enc[2])
    with pytest.raises(IndexError):
        sae.layer(3)


def test_save_load_round_trip(tmp_path) -> None:
    acts = sparse_data(n=300)
    cfg = SMALL.model_copy(update={"steps": 5})
    sae, metrics = train_saes(acts, cfg, seed=0)
    coords = [{"coordinates": [1, 5, 9]}, {"coordinates": [2, 3, 4]}]
    save_saes(sae, metrics, [12, 3], tmp_path, coords, cfg=cfg)
    stored = json.loads((tmp_path / "layer_03" / "cfg.json").read_text())
    assert stored["layer"] == 3 and stored["d_in"] == 32 and stored["l1_coef"] == cfg.l1_coef
    loaded, layers, cfgs = load_saes(tmp_path)
    assert layers == [3, 12]
    assert cfgs[0]["coordinates"] == [2, 3, 4] and cfgs[1]["coordinates"] == [1, 5, 9]
    assert not list(tmp_path.rglob(".*tmp*"))
    # load_saes orders by layer, so position 0 now holds the SAE saved for layer 3.
    expected = encode(sae, acts)[:, [1, 0]]
    assert torch.equal(encode(loaded, acts[:, [1, 0]]), expected)
    saved_metrics = json.loads((tmp_path / "layer_12" / "metrics.json").read_text())
    assert saved_metrics["fvu"] == metrics[0].fvu


def test_save_rejects_mismatched_inputs(tmp_path) -> None:
    sae = random_sae(num_layers=2)
    with pytest.raises(SAEInputError, match="layer ids"):
        save_saes(sae, [], [0], tmp_path)
    with pytest.raises(SAEInputError, match="repeated layer ids"):
        save_saes(sae, [None, None], [4, 4], tmp_path)
    with pytest.raises(SAEInputError, match="one per layer"):
        save_saes(sae, [None, None], [0, 1], tmp_path, [{}])
    with pytest.raises(SAEInputError, match="overwrite"):
        save_saes(sae, [None, None], [0, 1], tmp_path, {"layer": 3})
    with pytest.raises(SAEInputError, match="no SAE found"):
        load_saes(tmp_path / "missing")


def test_nan_input_names_the_layer() -> None:
    acts = sparse_data(n=50, layers=3)
    acts[7, 2, 4] = float("nan")
    with pytest.raises(SAEInputError, match="layer 21 "):
        train_saes(acts, SMALL, seed=0, layer_ids=[3, 12, 21])
    acts[7, 2, 4] = float("inf")
    with pytest.raises(SAEInputError, match="NaN/inf values in layer 2 "):
        train_saes(acts, SMALL, seed=0)


def test_bad_shapes_are_rejected() -> None:
    with pytest.raises(SAEInputError, match="at least 2 samples"):
        train_saes(torch.randn(1, 2, 4), SMALL, seed=0)
    with pytest.raises(SAEInputError, match="N samples, L layers"):
        train_saes(torch.randn(10, 4), SMALL, seed=0)
    constant = torch.randn(10, 2, 4)
    constant[:, 1] = 3.0
    with pytest.raises(SAEInputError, match="layer 1 .*same activations"):
        train_saes(constant, SMALL, seed=0)
