"""The planner's LoRA term: what autograd keeps for peft's float32 adapter branches, by dtype and dropout."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from finescope_core.config import FinescopeConfig
from finescope_core.finetune.lora import attach_lora
from finescope_core.memplan import Shapes, _lora_inputs, plan_memory
from finescope_core.tiny import tiny_config, tiny_model

WIDTHS = dict(layers=2, hidden=128, heads=4, kv_heads=2, intermediate=512)


def _cfg(dtype: str, dropout: float) -> FinescopeConfig:
    return FinescopeConfig.model_validate(
        {
            "model": "x",
            "seeds": ["s.jsonl"],
            "corpus": ["c.jsonl"],
            "device": "cpu",
            "model_dtype": dtype,
            "finetune": {"method": "lora", "dropout": dropout},
        }
    )


def _saved_float32(model: nn.Module, ids: torch.Tensor) -> int:
    """Bytes of the distinct float32 storages autograd saves in one forward pass of `model`, other
    than its parameters' (the adapters' weights are the planner's `training` part)."""
    seen: dict[int, int] = {}
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}

    def pack(t: torch.Tensor) -> torch.Tensor:
        if t.dtype == torch.float32 and t.untyped_storage().data_ptr() not in params:
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(input_ids=ids, use_cache=False)
    return sum(seen.values())


@pytest.mark.parametrize(
    ("dtype", "dropout"), [("bfloat16", 0.05), ("bfloat16", 0.0), ("float32", 0.05), ("float32", 0.0)]
)
def test_lora_inputs_match_what_autograd_saves(dtype: str, dropout: float) -> None:
    """The float32 bytes autograd saves with adapters minus without them (the frozen model with only
    its embeddings trainable, so the same graph is built) equal the planner's per-token term times the
    tokens, exactly."""
    cfg = _cfg(dtype, dropout)
    model = tiny_model("llama", **WIDTHS)  # type: ignore[arg-type]
    nn.Module.to(model, getattr(torch, dtype))
    model.train()
    frozen = copy.deepcopy(model)
    for p in frozen.parameters():
        p.requires_grad_(False)
    frozen.get_input_embeddings().weight.requires_grad_(True)
    lora = attach_lora(model, cfg.finetune)
    lora.get_input_embeddings().weight.requires_grad_(True)
    ids = torch.randint(0, 200, (2, 24))
    extra = _saved_float32(lora, ids) - _saved_float32(frozen, ids)
    s = Shapes.of(tiny_config("llama", **WIDTHS))  # type: ignore[arg-type]
    predicted = _lora_inputs(s, cfg.finetune, 4 if dtype == "float32" else 2, 1.0) * ids.numel()
    assert extra == predicted, (extra, predicted)


def test_tuned_stage_counts_the_adapter_inputs() -> None:
    config = tiny_config("llama", **WIDTHS)  # type: ignore[arg-type]

    def adapter_inputs(dtype: str, dropout: float) -> int:
        stages = {s.name: s for s in plan_memory(_cfg(dtype, dropout), config).stages}
        return stages["tuned"].parts["adapter_inputs"]

    assert adapter_inputs("bfloat16", 0.05) > adapter_inputs("bfloat16", 0.0) > adapter_inputs("float32", 0.0)
