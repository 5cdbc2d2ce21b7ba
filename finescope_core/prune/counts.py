"""Parameter counts by module kind: what the ratio is measured against and the prune report shows.

Evaluation counts with the same function (its `total`), so a model's size reads the same everywhere.
"""

from __future__ import annotations

from collections.abc import Iterator

from torch import nn
from transformers import PreTrainedModel

from finescope_core.model import DecoderArch, resolve_arch

PARAM_KEYS = (
    "attn_q",
    "attn_k",
    "attn_v",
    "attn_o",
    "mlp_gate",
    "mlp_up",
    "mlp_down",
    "embeddings",
    "norms",
    "lm_head",
    "other",
)


def projections(arch: DecoderArch) -> Iterator[tuple[str, nn.Linear]]:
    """Every prunable projection of every layer, with its `PARAM_KEYS` kind, layer by layer."""
    for a, m in zip(arch.attention, arch.mlp, strict=True):
        yield from (("attn_q", a.q_proj), ("attn_k", a.k_proj), ("attn_v", a.v_proj), ("attn_o", a.o_proj))
        yield from (("mlp_gate", m.gate_proj), ("mlp_up", m.up_proj), ("mlp_down", m.down_proj))


def count_parameters(model: PreTrainedModel) -> dict[str, int]:
    """Count parameters by module type.

    Returns:
        `{key: count}` for every key of `PARAM_KEYS` plus `total`. Tied input/output embeddings are one
        tensor and are counted once, under `embeddings`; `norms` includes Qwen3's q_norm/k_norm.
    """
    arch = resolve_arch(model)
    where: dict[int, str] = {}
    out_emb = model.get_output_embeddings()  # type: ignore[no-untyped-call]  # unannotated in transformers
    if out_emb is not None:
        where.update((id(p), "lm_head") for p in out_emb.parameters())
    where.update((id(p), "embeddings") for p in arch.embed.parameters())
    for key, lin in projections(arch):
        where.update((id(p), key) for p in lin.parameters())
    for module in model.modules():
        if "norm" in type(module).__name__.lower():
            where.update((id(p), "norms") for p in module.parameters(recurse=False))
    counts = dict.fromkeys(PARAM_KEYS, 0)
    for p in model.parameters():  # deduplicated: a tied weight is visited once
        counts[where.get(id(p), "other")] += p.numel()
    counts["total"] = sum(counts.values())
    return counts


def linear_size(lin: nn.Linear, out_features: int | None = None, in_features: int | None = None) -> int:
    """Parameters of `lin` (weight + bias), or of `lin` cut to the given widths."""
    out_f = lin.out_features if out_features is None else out_features
    in_f = lin.in_features if in_features is None else in_features
    return out_f * in_f + (out_f if lin.bias is not None else 0)
