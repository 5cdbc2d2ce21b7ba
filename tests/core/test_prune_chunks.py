"""Importance in layer chunks: the same scores as one pass, with one chunk's float32 sums at a time."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from transformers import PreTrainedModel

from finescope_core.config import FinescopeConfig
from finescope_core.memplan import Shapes, importance_sums, plan_memory
from finescope_core.model import resolve_arch
from finescope_core.prune import group_importance, lm_batches
from finescope_core.prune.chunks import layer_chunks, sums_limit
from finescope_core.tiny import byte_tokenizer, tiny_config, tiny_model

TEXTS = [
    "Natalia sold clips to 48 of her friends in April.",
    "Janet has 16 eggs and eats 3 of them.",
    "2 + 2 = 4, and 3 * 3 = 9.",
    "The quick brown fox jumps over the lazy dog, again and again.",
]


def _model(dtype: torch.dtype) -> PreTrainedModel:
    model = tiny_model("qwen2", layers=4)  # qwen2: projection biases are scored too
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("proj.bias"):
                p.normal_(0, 0.1)
    nn.Module.to(model, dtype)  # transformers' wrapper of `to` hides its signature
    return model


def _batches() -> list[dict[str, torch.Tensor]]:
    return list(lm_batches(byte_tokenizer(), TEXTS, max_length=24, batch_size=1))


def test_layer_chunks_fill_each_chunk_up_to_the_limit() -> None:
    assert layer_chunks([4, 4, 4, 4], None) == [range(4)]
    assert layer_chunks([4, 4, 4, 4], 8) == [range(0, 2), range(2, 4)]
    assert layer_chunks([4, 4, 4, 4], 9) == [range(0, 2), range(2, 4)]
    assert layer_chunks([4, 4, 4, 4], 1) == [range(i, i + 1) for i in range(4)]  # at least one layer
    assert layer_chunks([3, 6, 2, 2], 7) == [range(0, 1), range(1, 2), range(2, 4)]
    assert sums_limit(100, 4) is None and sums_limit(100, 2) == 50


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("method", ["taylor", "vector"])
@pytest.mark.parametrize("max_sums", [1, 2 * 10**5])
def test_chunked_importance_equals_one_pass(dtype: torch.dtype, method: str, max_sums: int) -> None:
    """One layer (or two) per pass gives the one-pass scores: each weight's gradient comes from the
    same backward, summed over the same batches in the same order."""
    model = _model(dtype)
    reference = copy.deepcopy(model)
    one = group_importance(reference, _batches(), method=method)  # type: ignore[arg-type]
    passes: list[int] = []
    handle = model.register_forward_pre_hook(lambda *_: passes.append(1))
    chunked = group_importance(model, _batches(), method=method, max_sums=max_sums)  # type: ignore[arg-type]
    handle.remove()
    layers = len(resolve_arch(model).mlp)
    per_layer = 4 * sum(p.numel() for n, p in model.named_parameters() if "layers.0." in n and "_proj" in n)
    assert len(passes) == len(layer_chunks([per_layer] * layers, max_sums)) * len(_batches())
    assert len(passes) > len(_batches())  # several passes indeed
    assert chunked.tokens == one.tokens
    for got, want in ((chunked.heads, one.heads), (chunked.kv, one.kv), (chunked.channels, one.channels)):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=0.0)
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_pass_holds_only_its_chunks_sums(dtype: torch.dtype) -> None:
    """At every forward pass only one layer's projections require grad, and no other layer's gradient
    or float32 sum is alive (weakly referenced sums of finished chunks are gone)."""
    model = _model(dtype)
    arch = resolve_arch(model)
    layer_of = {
        p: i
        for i, (a, m) in enumerate(zip(arch.attention, arch.mlp, strict=True))
        for mod in (a.q_proj, a.k_proj, a.v_proj, a.o_proj, m.gate_proj, m.up_proj, m.down_proj)
        for p in mod.parameters()
    }
    seen: list[tuple[set[int], set[int]]] = []

    def check(*_: object) -> None:
        training = {layer_of[p] for p in model.parameters() if p.requires_grad}
        holding = {layer_of[p] for p in model.parameters() if p.grad is not None}
        seen.append((training, holding))

    handle = model.register_forward_pre_hook(check)
    group_importance(model, _batches(), max_sums=1)
    handle.remove()
    assert [t for t, _ in seen[:: len(_batches())]] == [{i} for i in range(4)]
    # float32: `.grad` is the sum and belongs to the chunk; bf16: folded at once, no `.grad` left
    assert all(h <= t for t, h in seen), seen


def test_planner_predicts_one_chunks_sums_under_bf16() -> None:
    """bf16: one pass's sums are at most half the model's bytes (four layers of a 1B-wide model: one
    layer a pass); float32 keeps one pass over every projection."""
    config = tiny_config("llama", layers=4, hidden=256, heads=8, kv_heads=2, intermediate=1024)
    s = Shapes.of(config)
    per_layer = 4 * s.projection_params // s.layers
    assert importance_sums(s, 4) == 4 * per_layer
    assert importance_sums(s, 2) == per_layer <= sums_limit(s.params * 2, 2)  # type: ignore[operator]
    cfg = FinescopeConfig.model_validate(
        {"model": "x", "seeds": ["s.jsonl"], "corpus": ["c.jsonl"], "model_dtype": "bfloat16"}
    )
    pruned = {p.name: p for p in plan_memory(cfg, config).stages}["pruned"]
    assert pruned.parts["gradients"] == per_layer + s.largest_param * 2
