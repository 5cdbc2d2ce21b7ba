"""Applying a plan: the projections sliced in place, the config updated, no custom modelling code.

Qwen3's q_norm/k_norm act over `head_dim` and are shared by all heads, so head pruning leaves them as is.
"""

from __future__ import annotations

from collections import Counter

import torch
from torch import Tensor, nn
from transformers import PreTrainedModel

from finescope_core.model import AttentionParts, DecoderArch, MLPParts, resolve_arch
from finescope_core.prune.errors import PruneError
from finescope_core.prune.plan import PrunePlan


def _slice_linear(lin: nn.Linear, rows: Tensor | None = None, cols: Tensor | None = None) -> nn.Linear:
    """A new nn.Linear holding copies of the kept output rows (+ bias) and/or input columns."""
    weight = lin.weight.detach()
    if rows is not None:
        weight = weight.index_select(0, rows.to(weight.device))
    if cols is not None:
        weight = weight.index_select(1, cols.to(weight.device))
    bias = lin.bias.detach() if lin.bias is not None else None
    if bias is not None and rows is not None:
        bias = bias.index_select(0, rows.to(bias.device))
    # Built on the meta device: no throw-away initialisation of weights that are replaced at once.
    new = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device="meta")
    new.weight = nn.Parameter(weight.clone(), requires_grad=lin.weight.requires_grad)
    if bias is not None:
        new.bias = nn.Parameter(bias.clone(), requires_grad=lin.bias.requires_grad)
    new.train(lin.training)
    return new


def _head_rows(heads: Tensor, head_dim: int) -> Tensor:
    """Row indices [len(heads) * head_dim] of the given heads in a head-major projection."""
    return (heads.long()[:, None] * head_dim + torch.arange(head_dim)).flatten()


def _layer_fits(arch: DecoderArch, plan: PrunePlan, q: list[int], kv: list[int], ch: list[int]) -> bool:
    """Whether one layer's kept indices are valid, distinct, and `heads_per_kv_keep` per kept KV group."""
    group = arch.num_heads // arch.num_kv_heads
    if len(set(kv)) != len(kv) or len(kv) != plan.kv_keep or not all(0 <= g < arch.num_kv_heads for g in kv):
        return False
    if len(set(q)) != len(q) or not all(0 <= h < arch.num_heads for h in q):
        return False
    if Counter(h // group for h in q) != dict.fromkeys(kv, plan.heads_per_kv_keep):
        return False
    return len(set(ch)) == len(ch) == plan.intermediate_keep and all(
        0 <= c < arch.intermediate_size for c in ch
    )


def _check_plan(arch: DecoderArch, plan: PrunePlan) -> None:
    """Raise PruneError unless the plan's indices fit this (unpruned) model, layer by layer."""
    if not len(plan.keep_q) == len(plan.keep_kv) == len(plan.keep_channels) == arch.num_layers:
        raise PruneError(f"the plan covers {len(plan.keep_q)} layers, the model has {arch.num_layers}")
    for i, (q, kv, ch) in enumerate(zip(plan.keep_q, plan.keep_kv, plan.keep_channels, strict=True)):
        if not _layer_fits(arch, plan, q.tolist(), kv.tolist(), ch.tolist()):
            raise PruneError(
                f"the plan does not fit layer {i} of this model ({arch.num_heads} heads in "
                f"{arch.num_kv_heads} KV groups, {arch.intermediate_size} channels); was it made for "
                "another model, or applied twice?"
            )


@torch.no_grad()
def apply_pruning(model: PreTrainedModel, plan: PrunePlan) -> PreTrainedModel:
    """Slice the projections to the plan and update the config, in place.

    The model keeps running with its own transformers classes and reloads from `save_pretrained`
    with no custom code: attention reads `num_key_value_groups` and `head_dim` from the module and
    reshapes with -1, so only those attributes and the config change. `head_dim` is written to the
    config because hidden_size // num_attention_heads no longer equals it; `scaling` stays head_dim**-0.5.

    Returns:
        The same model object.

    Raises:
        PruneError: the plan does not fit the model (checked before anything changes).
    """
    arch = resolve_arch(model)
    _check_plan(arch, plan)
    for a, m, q, kv, ch in zip(
        arch.attention, arch.mlp, plan.keep_q, plan.keep_kv, plan.keep_channels, strict=True
    ):
        # Sorted, so the kept query heads of each kept KV group stay contiguous and in group order.
        _slice_attention(a, q.sort().values, kv.sort().values, arch.head_dim, plan.heads_per_kv_keep)
        _slice_mlp(m, ch.sort().values)
    cfg = model.config
    cfg.num_attention_heads = plan.heads_per_kv_keep * plan.kv_keep
    cfg.num_key_value_heads = plan.kv_keep
    cfg.intermediate_size = plan.intermediate_keep
    cfg.head_dim = arch.head_dim
    resolve_arch(model)  # the shape check now runs against the new config
    return model


def _slice_attention(a: AttentionParts, q: Tensor, kv: Tensor, head_dim: int, heads_per_kv: int) -> None:
    """Keep query heads `q` and KV groups `kv` (sorted) of one attention module."""
    q_rows, kv_rows = _head_rows(q, head_dim), _head_rows(kv, head_dim)
    a.module.q_proj = _slice_linear(a.q_proj, rows=q_rows)
    a.module.k_proj = _slice_linear(a.k_proj, rows=kv_rows)
    a.module.v_proj = _slice_linear(a.v_proj, rows=kv_rows)
    a.module.o_proj = _slice_linear(a.o_proj, cols=q_rows)
    # Plain ints on an nn.Module: setattr, as Module.__setattr__ is typed for tensors and modules.
    setattr(a.module, "num_key_value_groups", heads_per_kv)  # noqa: B010
    for attr, value in (("num_heads", len(q)), ("num_key_value_heads", len(kv))):
        if hasattr(a.module, attr):  # older/other attention classes keep these too
            setattr(a.module, attr, value)


def _slice_mlp(m: MLPParts, channels: Tensor) -> None:
    """Keep MLP channels `channels` (sorted) of one gated MLP."""
    m.module.gate_proj = _slice_linear(m.gate_proj, rows=channels)
    m.module.up_proj = _slice_linear(m.up_proj, rows=channels)
    m.module.down_proj = _slice_linear(m.down_proj, cols=channels)
    if hasattr(m.module, "intermediate_size"):
        setattr(m.module, "intermediate_size", len(channels))  # noqa: B010
