"""Batching, pooling, layer hooks and sharded pooled activations (paper eq. 11)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch.testing import assert_close

from finescope_core.activations import (
    ActivationError,
    extract_pooled,
    iter_shards,
    load_activations,
    write_activation_shards,
)
from finescope_core.batching import BatchingError, iter_text_batches, masked_mean, pooling_mask
from finescope_core.hooks import LayerSelectionError, capture_layers, resolve_layers
from finescope_core.model import resolve_arch
from finescope_core.tiny import byte_tokenizer, tiny_model

TEXTS = ["short", "a somewhat longer text here", "mid length", "x", "another one", "pooling!", "zz top"]
ARCHS = ["llama", "qwen3"]


def _reference_pooled(model, texts: list[str], layers: list[int], skip_first: int) -> torch.Tensor:
    """[N, L, d]: each text alone through the full model (lm_head included), plain hooks, pooled by hand."""
    arch = resolve_arch(model)
    tok = byte_tokenizer()
    out = []
    for text in texts:
        ids = torch.tensor([tok(text, truncation=True, max_length=32)["input_ids"]])
        seen: dict[int, torch.Tensor] = {}
        handles = [
            arch.layers[layer].register_forward_hook(
                lambda m, a, o, layer=layer, seen=seen: seen.__setitem__(layer, o)
            )
            for layer in layers
        ]
        try:
            with torch.no_grad():
                model(ids)
        finally:
            for h in handles:
                h.remove()
        keep = slice(skip_first, None) if ids.shape[1] > skip_first else slice(-1, None)
        out.append(torch.stack([seen[layer][0, keep].mean(dim=0) for layer in layers]))
    return torch.stack(out)


def _extract(model, texts, layers, *, sort=True, batch_size=3, indices=None, skip_first=1):
    batches = iter_text_batches(
        byte_tokenizer(), texts, max_length=32, batch_size=batch_size, sort_by_length=sort
    )
    got = list(extract_pooled(model, batches, layers, skip_first=skip_first, indices=indices))
    rows = torch.cat([r for r, _ in got])
    acts = torch.cat([a for _, a in got])
    out = torch.empty_like(acts)
    out[rows] = acts
    return out


@pytest.mark.parametrize("arch", ARCHS)
def test_pooled_activations_match_full_forward_reference(arch: str) -> None:
    model = tiny_model(arch, layers=3)
    got = _extract(model, TEXTS, [2, 0])
    assert_close(got, _reference_pooled(model, TEXTS, [2, 0], skip_first=1), rtol=1e-4, atol=1e-5)


def test_indices_select_coordinates_per_layer() -> None:
    model = tiny_model("llama", layers=3)
    indices = torch.tensor([[5, 0, 47], [1, 2, 3]])
    got = _extract(model, TEXTS, [1, -1], indices=indices)
    full = _extract(model, TEXTS, [1, -1])
    assert got.shape == (len(TEXTS), 2, 3)
    assert_close(got[:, 0], full[:, 0, [5, 0, 47]])
    assert_close(got[:, 1], full[:, 1, [1, 2, 3]])
    with pytest.raises(ActivationError, match="one row per requested layer"):
        extract_pooled(model, [], [0], skip_first=1, indices=indices)
    with pytest.raises(ActivationError, match="0..47"):
        extract_pooled(model, [], [0, 1], skip_first=1, indices=indices + 1)


def test_length_sorting_does_not_change_results() -> None:
    model = tiny_model("qwen3")
    assert_close(
        _extract(model, TEXTS, [0, 1], sort=True),
        _extract(model, TEXTS, [0, 1], sort=False),
        rtol=1e-4,
        atol=1e-5,
    )


def test_forward_stops_after_deepest_requested_layer() -> None:
    model = tiny_model("llama", layers=3)
    arch = resolve_arch(model)
    calls = {"layer2": 0, "layer1": 0, "norm": 0, "lm_head": 0}
    watched = {
        "layer2": arch.layers[2],
        "layer1": arch.layers[1],
        "norm": arch.backbone.norm,
        "lm_head": model.lm_head,
    }
    handles = [
        mod.register_forward_hook(lambda m, a, o, name=name: calls.__setitem__(name, calls[name] + 1))
        for name, mod in watched.items()
    ]
    try:
        _extract(model, TEXTS, [1, 0])
        assert calls == {"layer2": 0, "layer1": 3, "norm": 0, "lm_head": 0}  # 3 batches
        _extract(model, TEXTS, [-1])
        assert calls["layer2"] == 3 and calls["norm"] == 0 and calls["lm_head"] == 0
    finally:
        for h in handles:
            h.remove()


def test_hooks_are_removed_even_when_the_forward_fails() -> None:
    model = tiny_model("llama")
    arch = resolve_arch(model)
    with pytest.raises(RuntimeError, match="boom"), capture_layers(arch, [0, 1]) as cap:
        assert all(len(layer._forward_hooks) == 1 for layer in arch.layers)
        cap.run(lambda: (_ for _ in ()).throw(RuntimeError("boom")))
    assert all(len(layer._forward_hooks) == 0 for layer in arch.layers)
    ids = torch.tensor([[5, 6, 7]])
    with torch.no_grad():
        assert model(ids).logits.shape == (1, 3, 259)  # no stray stop-hook left behind


def test_resolve_layers_normalises_and_rejects() -> None:
    assert resolve_layers([-1, 0, -4, 2], 5) == [4, 0, 1, 2]
    with pytest.raises(LayerSelectionError, match="out of range"):
        resolve_layers([4], 4)
    with pytest.raises(LayerSelectionError, match="twice"):
        resolve_layers([-1, 3], 4)
    with pytest.raises(LayerSelectionError, match="no layers"):
        resolve_layers([], 4)


def test_sharded_write_and_load_restore_original_order(tmp_path: Path) -> None:
    model = tiny_model("qwen3", layers=3)
    tok = byte_tokenizer()
    indices = torch.tensor([[0, 2, 4, 6], [7, 5, 3, 1]])
    progress: list[tuple[int, int]] = []
    manifest = write_activation_shards(
        model,
        tok,
        TEXTS,
        [0, 2],
        tmp_path,
        indices=indices,
        max_length=32,
        batch_size=2,
        skip_first=1,
        shard_size=3,
        progress=lambda d, t: progress.append((d, t)),
    )
    assert [s.num_rows for s in manifest.shards] == [3, 3, 1]
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "activations.json",
        "shard-00000.safetensors",
        "shard-00001.safetensors",
        "shard-00002.safetensors",
    ]
    shards = list(iter_shards(tmp_path))
    assert all(acts.shape[1:] == (2, 4) for _, acts in shards)
    expected = _extract(model, TEXTS, [0, 2], indices=indices)
    assert_close(load_activations(tmp_path), expected)
    unsharded = tmp_path / "one"
    write_activation_shards(
        model,
        tok,
        TEXTS,
        [0, 2],
        unsharded,
        indices=indices,
        max_length=32,
        batch_size=2,
        skip_first=1,
        shard_size=100,
    )
    assert_close(load_activations(unsharded), load_activations(tmp_path))
    meta = json.loads((tmp_path / "activations.json").read_text())
    assert (
        meta["layers"] == [0, 2] and meta["k"] == 4 and meta["num_rows"] == 7 and meta["dtype"] == "float32"
    )
    assert meta["indices"] == indices.tolist()
    assert progress[-1] == (7, 7)


def test_rewrite_removes_stale_shards_and_incomplete_dirs_are_refused(tmp_path: Path) -> None:
    model = tiny_model("llama")
    tok = byte_tokenizer()
    kw = dict(indices=None, max_length=32, batch_size=4, skip_first=1, dtype=torch.float16)
    write_activation_shards(model, tok, TEXTS, [1], tmp_path, shard_size=2, **kw)
    write_activation_shards(model, tok, TEXTS[:3], [1], tmp_path, shard_size=5, **kw)
    assert sorted(p.name for p in tmp_path.glob("shard-*")) == ["shard-00000.safetensors"]
    acts = load_activations(tmp_path)
    assert acts.shape == (3, 1, 48) and acts.dtype == torch.float16
    (tmp_path / "activations.json").unlink()
    with pytest.raises(ActivationError, match="interrupted"):
        load_activations(tmp_path)
    with pytest.raises(ActivationError, match="empty"):
        write_activation_shards(model, tok, [], [1], tmp_path, shard_size=5, **kw)


def test_extracted_tensors_are_ordinary_tensors() -> None:
    acts = _extract(tiny_model("llama"), TEXTS[:2], [0])
    rows, got = next(
        extract_pooled(
            tiny_model("llama"),
            iter_text_batches(byte_tokenizer(), ["abc"], max_length=8, batch_size=1),
            [0],
            skip_first=0,
        )
    )
    got.mul_(2)  # an inference-mode tensor would refuse this outside inference mode
    assert not got.is_inference() and acts.shape == (2, 1, 48) and rows.tolist() == [0]


def test_iter_text_batches_sorts_truncates_and_pads() -> None:
    tok = byte_tokenizer()
    texts = ["ab", "abcdefgh", "abcd", "abcdefghijklmnop"]
    batches = list(iter_text_batches(tok, texts, max_length=10, batch_size=2))
    assert [b.rows.tolist() for b in batches] == [[3, 1], [2, 0]]
    assert batches[0].input_ids.shape == (2, 10)  # truncated to max_length
    assert batches[1].attention_mask.tolist() == [[1, 1, 1, 1], [1, 1, 0, 0]]
    assert batches[1].input_ids[1, 2:].tolist() == [tok.pad_token_id] * 2
    unsorted = list(iter_text_batches(tok, texts, max_length=10, batch_size=3, sort_by_length=False))
    assert [b.rows.tolist() for b in unsorted] == [[0, 1, 2], [3]]
    with pytest.raises(BatchingError, match=r"texts \[1\]"):
        list(iter_text_batches(tok, ["ok", ""], max_length=10, batch_size=2))
    with pytest.raises(BatchingError, match="batch_size=0"):
        list(iter_text_batches(tok, texts, max_length=10, batch_size=0))


def test_pooling_mask_skips_sink_for_right_and_left_padding() -> None:
    right = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0], [1, 0, 0, 0]])
    assert pooling_mask(right, 1).tolist() == [[0, 1, 1, 1], [0, 1, 0, 0], [1, 0, 0, 0]]
    left = torch.tensor([[1, 1, 1, 1], [0, 0, 1, 1], [0, 0, 0, 1]])
    assert pooling_mask(left, 1).tolist() == [[0, 1, 1, 1], [0, 0, 0, 1], [0, 0, 0, 1]]
    assert pooling_mask(right, 2).tolist() == [[0, 0, 1, 1], [0, 1, 0, 0], [1, 0, 0, 0]]
    assert torch.equal(pooling_mask(right, 0), right.float())
    hidden = torch.arange(24, dtype=torch.float32).view(3, 4, 2)
    mean = masked_mean(hidden, pooling_mask(right, 1))
    assert_close(mean, torch.stack([hidden[0, 1:].mean(0), hidden[1, 1], hidden[2, 0]]))


def test_directories_of_consecutive_slices_load_as_one_corpus(tmp_path: Path) -> None:
    """What the fanned-out embedding writes: one directory per corpus slice, concatenated in order."""
    model = tiny_model("qwen3", layers=3)
    tok = byte_tokenizer()
    kw = dict(indices=None, max_length=32, batch_size=2, skip_first=1)
    write_activation_shards(model, tok, TEXTS, [0, 1, 2], tmp_path / "whole", shard_size=100, **kw)
    cuts = [(0, 3), (3, 4), (4, 7)]
    for start, stop in cuts:
        write_activation_shards(
            model, tok, TEXTS[start:stop], [0, 1, 2], tmp_path / f"part{start}", shard_size=2, **kw
        )
    parts = [tmp_path / f"part{start}" for start, _ in cuts]
    whole = load_activations(tmp_path / "whole")
    assert_close(load_activations(parts), whole)
    # One layer at a time (a per-layer SAE task) reads only that slice, and it is the same slice.
    assert_close(load_activations(parts, positions=[2]), whole[:, [2]])
    assert_close(load_activations(parts, positions=[0, 2]), whole[:, [0, 2]])
    with pytest.raises(ActivationError, match="out of range"):
        load_activations(parts, positions=[3])
    write_activation_shards(model, tok, TEXTS[:2], [0, 1], tmp_path / "other", shard_size=2, **kw)
    with pytest.raises(ActivationError, match="same settings"):
        load_activations([parts[0], tmp_path / "other"])
