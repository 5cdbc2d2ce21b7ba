"""Tests for TopK SAEs, held-out metrics and early stopping (finescope_core.sae, issue 12)."""

from __future__ import annotations

import json

import pytest
import torch
from pydantic import ValidationError
from torch.testing import assert_close

from finescope_core.config import SAEConfig
from finescope_core.sae import (
    CFG_FILE,
    BatchedSAE,
    EarlyStopping,
    SAEInputError,
    encode,
    evaluate_saes,
    layer_seed,
    load_saes,
    save_saes,
    train_saes,
    validation_split,
)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny tensors: intra-op threads only wait on each other on a busy machine (see test_sae.py)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def sparse_data(
    n: int = 1000, k: int = 16, atoms: int = 48, active: int = 3, layers: int = 2, seed: int = 99
) -> torch.Tensor:
    """x = sparse non-negative codes @ a random unit dictionary per layer, plus a little noise. [n, L, k]"""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(layers):
        dictionary = torch.randn(atoms, k, generator=gen)
        dictionary /= dictionary.norm(dim=1, keepdim=True)
        which = torch.rand(n, atoms, generator=gen).argsort(dim=1)[:, :active]
        codes = torch.zeros(n, atoms).scatter(1, which, 0.5 + 2 * torch.rand(n, active, generator=gen))
        out.append(codes @ dictionary + 0.05 * torch.randn(n, k, generator=gen))
    return torch.stack(out, dim=1)


def random_topk_sae(k: int, num_layers: int = 2, d_in: int = 8, d_sae: int = 32, seed: int = 0) -> BatchedSAE:
    sae = BatchedSAE.initialised(d_in, d_sae, [layer_seed(seed, i) for i in range(num_layers)], "topk", k)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for t in sae.state_dict().values():
            t.copy_(torch.randn(t.shape, generator=gen))
        sae.std.abs_().add_(0.5)
        sae.normalize_decoder_()
    return sae


TOPK = SAEConfig(
    kind="topk", k=4, d_sae=64, steps=300, batch_size=64, lr=3e-3, dead_after=256, k_aux=16, patience=0
)


# --- TopK ----------------------------------------------------------------------------------------------


def test_topk_keeps_the_k_largest_relu_codes_per_sample() -> None:
    sae = random_topk_sae(k=5)
    x = torch.randn(2, 40, 8)
    out = sae(x)
    assert out.pre_acts.shape == out.codes.shape == (2, 40, 32)
    assert out.recon.shape == (2, 40, 8)
    relu = out.pre_acts.clamp_min(0)
    nonzero = (out.codes != 0).sum(dim=-1)
    positive = (relu > 0).sum(dim=-1)
    # exactly k, or fewer only where fewer than k pre-activations are positive
    assert torch.equal(nonzero, positive.clamp(max=5))
    assert (nonzero == 5).float().mean() > 0.9
    kept = out.codes != 0
    assert_close(out.codes[kept], relu[kept])  # kept values are the ReLU values themselves
    # every kept value is at least every dropped one, per sample
    smallest_kept = torch.where(kept, relu, torch.inf).amin(dim=-1)
    largest_dropped = torch.where(kept, -torch.inf, relu).amax(dim=-1)
    assert (smallest_kept[nonzero == 5] >= largest_dropped[nonzero == 5]).all()
    assert_close(out.recon, sae.decode(out.codes))


def test_topk_with_ties_and_zeros_keeps_at_most_k() -> None:
    sae = BatchedSAE(1, 4, 8, "topk", 3)
    pre = torch.tensor(
        [[[1.0, 1.0, 1.0, 1.0, 0.0, 0.0, 0.0, 0.0], [2.0, -1.0, 0.0, 0.0, -3.0, 0.0, 0.0, 0.0]]]
    )
    codes = sae.activate(pre)
    assert (codes != 0).sum(dim=-1).tolist() == [[3, 1]]  # ties: exactly 3 of the 4; zeros: only 1 positive
    assert codes[0, 1].tolist() == [2.0, 0, 0, 0, 0, 0, 0, 0]


def test_encode_uses_the_topk_activation() -> None:
    sae = random_topk_sae(k=3)
    acts = torch.randn(30, 2, 8) * 3 + 1
    codes = encode(sae, acts, batch_size=7)
    assert codes.shape == (30, 2, 32)
    assert ((codes != 0).sum(dim=-1) <= 3).all()
    assert_close(codes, sae.encode_normalized(sae.normalize(acts.transpose(0, 1))).transpose(0, 1))


def test_topk_training_reduces_heldout_fvu_below_the_mean_predictor() -> None:
    acts = sparse_data()
    sae, metrics = train_saes(acts, TOPK, seed=0)
    train_rows, val_rows = validation_split(len(acts), TOPK.val_fraction, 0)
    val = acts[val_rows]
    x = sae.normalize(val.transpose(0, 1))
    # The mean predictor (the training mean, 0 after standardisation) on the held-out rows,
    # around their own mean.
    mean_fvu = x.pow(2).sum(dim=(1, 2)) / (x - x.mean(dim=1, keepdim=True)).pow(2).sum(dim=(1, 2))
    for i, m in enumerate(metrics):
        assert m.fvu_curve[-1] < 0.5 * m.fvu_curve[0]
        assert m.val_fvu_curve[-1] < m.val_fvu_curve[0]
        assert m.val_fvu is not None and m.val_fvu < 0.5 < 1.0 <= float(mean_fvu[i])
        assert m.l0 <= TOPK.k and m.val_l0 is not None and m.val_l0 <= TOPK.k
    assert_close(evaluate_saes(sae, acts[train_rows]).fvu, torch.tensor([m.fvu for m in metrics]))


def test_topk_penalty_free_and_relu_l1_weighted() -> None:
    """l1_coef does not change a TopK SAE (no L1 term) but does change a ReLU one."""
    acts = sparse_data(n=300)
    short = TOPK.model_copy(update={"steps": 20})
    a, _ = train_saes(acts, short, seed=0)
    b, _ = train_saes(acts, short.model_copy(update={"l1_coef": 0.5}), seed=0)
    assert_close(a.W_enc, b.W_enc)
    c, _ = train_saes(acts, short.model_copy(update={"kind": "relu"}), seed=0)
    d, _ = train_saes(acts, short.model_copy(update={"kind": "relu", "l1_coef": 0.5}), seed=0)
    assert not torch.allclose(c.W_enc, d.W_enc)


def test_config_refuses_k_above_d_sae() -> None:
    with pytest.raises(ValidationError, match="curate.sae.k"):
        SAEConfig(kind="topk", k=65, d_sae=64)
    SAEConfig(kind="relu", k=65, d_sae=64)  # k is unused by relu
    with pytest.raises(SAEInputError, match="topk"):
        BatchedSAE(1, 4, 8, "topk", 9)


# --- held-out metrics ----------------------------------------------------------------------------------


def test_validation_split_is_seeded_disjoint_and_complete() -> None:
    train, val = validation_split(100, 0.2, seed=3)
    assert len(val) == 20 and len(train) == 80
    assert sorted(train.tolist() + val.tolist()) == list(range(100))
    assert torch.equal(val, validation_split(100, 0.2, seed=3)[1])
    assert not torch.equal(val, validation_split(100, 0.2, seed=4)[1])
    for n, fraction in ((100, 0.0), (10, 0.1), (3, 0.9)):  # fewer than 2 rows on a side: no split
        train, val = validation_split(n, fraction, seed=0)
        assert len(val) == 0 and train.tolist() == list(range(n))


def test_heldout_fvu_and_dead_fraction_match_direct_computation() -> None:
    acts = sparse_data(n=600, layers=2)
    cfg = SAEConfig(
        kind="relu",
        d_sae=64,
        steps=60,
        batch_size=64,
        lr=3e-3,
        l1_coef=3e-2,
        dead_after=128,
        k_aux=16,
        val_fraction=0.25,
    )
    sae, metrics = train_saes(acts, cfg, seed=5)
    _, val_rows = validation_split(len(acts), cfg.val_fraction, 5)
    assert len(val_rows) == 150
    x = sae.normalize(acts[val_rows].transpose(0, 1).double().float()).double()
    with torch.no_grad():
        out = sae(x.float())
    err = (out.recon.double() - x).pow(2).sum(dim=(1, 2))
    variance = (x - x.mean(dim=1, keepdim=True)).pow(2).sum(dim=(1, 2))
    fired = (out.codes > 0).any(dim=1)
    for i, m in enumerate(metrics):
        assert m.val_fvu == pytest.approx(float(err[i] / variance[i]), rel=1e-4)
        assert m.val_dead_fraction == pytest.approx(float((~fired[i]).sum()) / cfg.d_sae)
        assert m.val_l0 == pytest.approx(float((out.codes[i] > 0).sum()) / len(val_rows), rel=1e-6)
        assert m.summary()["val_fvu"] == m.val_fvu


def test_no_validation_rows_means_no_heldout_metrics() -> None:
    acts = sparse_data(n=200, layers=1)
    _, metrics = train_saes(acts, TOPK.model_copy(update={"steps": 10, "val_fraction": 0.0}), seed=0)
    assert metrics[0].val_fvu is None and metrics[0].best_step is None and metrics[0].steps_trained == 10
    assert set(metrics[0].summary()) == {"fvu", "l0", "dead_fraction", "steps_trained"}


# --- early stopping -----------------------------------------------------------------------------------


def test_early_stopping_counts_evaluations_without_improvement() -> None:
    sae = BatchedSAE(2, 4, 8)
    stop = EarlyStopping(sae, patience=2)
    for step, fvus in enumerate(([0.5, 0.5], [0.4, 0.6], [0.3, 0.4999], [0.2, 0.45], [0.1, 0.01]), start=1):
        with torch.no_grad():
            sae.b_enc.fill_(step)
        stop.update(sae, step, torch.tensor(fvus))
    # layer 1: 0.6 (wait 1), 0.4999 (better but by < 0.1%: kept as best, wait 2 -> stopped at step 3)
    assert stop.stopped.tolist() == [False, True]
    assert stop.stopped_at == [None, 3] and stop.best_step == [5, 3]
    assert stop.best.tolist() == pytest.approx([0.1, 0.4999])
    stop.restore(sae)
    assert sae.b_enc[:, 0].tolist() == [5.0, 3.0]


def test_early_stopping_stops_on_a_plateau_and_keeps_the_best_weights() -> None:
    acts = sparse_data(n=240, layers=2)  # few rows, many steps: held-out FVU plateaus (then overfits)
    cfg = TOPK.model_copy(
        update={"steps": 4000, "eval_every": 10, "patience": 3, "lr": 1e-2, "val_fraction": 0.25}
    )
    sae, metrics = train_saes(acts, cfg, seed=1)
    _, val_rows = validation_split(len(acts), cfg.val_fraction, 1)
    direct = evaluate_saes(sae, acts[val_rows]).fvu
    for i, m in enumerate(metrics):
        assert m.steps_trained < cfg.steps
        assert (
            m.val_steps[-1] == m.steps_trained and m.best_step is not None and m.best_step < m.steps_trained
        )
        assert m.val_fvu == pytest.approx(min(m.val_fvu_curve), rel=1e-5)
        assert m.val_fvu_curve[m.val_steps.index(m.best_step)] == pytest.approx(m.val_fvu, rel=1e-5)
        assert float(direct[i]) == pytest.approx(m.val_fvu, rel=1e-5)
        assert m.val_fvu < m.val_fvu_curve[-1] or m.best_step == m.val_steps[-1]


def test_per_layer_training_with_early_stopping_stacks_to_joint_training() -> None:
    acts = sparse_data(n=240, layers=3)
    cfg = TOPK.model_copy(
        update={"steps": 600, "eval_every": 10, "patience": 2, "lr": 1e-2, "val_fraction": 0.25}
    )
    joint, joint_metrics = train_saes(acts, cfg, seed=2)
    parts = [train_saes(acts[:, [i]], cfg, seed=2, layer_ids=[i]) for i in range(3)]
    stacked = BatchedSAE.stack([p[0] for p in parts])
    for a, b in zip(joint.state_dict().values(), stacked.state_dict().values(), strict=True):
        assert_close(a, b)
    assert [m.val_fvu for m in joint_metrics] == pytest.approx([p[1][0].val_fvu for p in parts])
    assert [m.steps_trained for m in joint_metrics] == [p[1][0].steps_trained for p in parts]


# --- saved SAEs ---------------------------------------------------------------------------------------


def test_topk_save_load_round_trip(tmp_path) -> None:
    acts = sparse_data(n=200)
    cfg = TOPK.model_copy(update={"steps": 20})
    sae, metrics = train_saes(acts, cfg, seed=0, layer_ids=[3, 7])
    save_saes(sae, metrics, [3, 7], tmp_path, cfg=cfg)
    loaded, layers, cfgs = load_saes(tmp_path)
    assert layers == [3, 7] and loaded.kind == "topk" and loaded.k == 4
    assert cfgs[0]["kind"] == "topk" and cfgs[0]["k"] == 4
    saved = json.loads((tmp_path / "layer_03" / "metrics.json").read_text())
    assert saved["val_fvu"] == metrics[0].val_fvu and saved["steps_trained"] == 20
    assert_close(encode(loaded, acts), encode(sae, acts))


def test_sae_saved_before_topk_loads_as_relu(tmp_path) -> None:
    acts = sparse_data(n=200, layers=1)
    cfg = SAEConfig(kind="relu", d_sae=32, steps=5, batch_size=32)
    sae, metrics = train_saes(acts, cfg, seed=0)
    save_saes(sae, metrics, [0], tmp_path, cfg=cfg)
    path = tmp_path / "layer_00" / CFG_FILE
    old = {
        k: v
        for k, v in json.loads(path.read_text()).items()
        if k not in ("kind", "k", "val_fraction", "eval_every", "patience")
    }
    path.write_text(json.dumps(old))
    loaded, _, _ = load_saes(tmp_path)
    assert loaded.kind == "relu" and loaded.k is None
    assert_close(encode(loaded, acts), encode(sae, acts))


def test_stack_refuses_mixed_activations() -> None:
    with pytest.raises(SAEInputError, match="activations"):
        BatchedSAE.stack([BatchedSAE(1, 4, 8), BatchedSAE(1, 4, 8, "topk", 2)])
