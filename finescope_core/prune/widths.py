"""Planning the widths: one number of heads, KV groups and MLP channels for every layer, on the ratio.

The same widths in every layer keep the pruned model a plain `save_pretrained` checkpoint (its config
holds one width of each kind). Which widths: every allowed attention width is tried, the MLP width
solved for each so the total lands on the requested ratio; `plan_widths` then picks by importance or
proportionally. That depends on the shapes only, so an unreachable ratio is refused before any work.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from transformers import PreTrainedModel

from finescope_core.model import DecoderArch, resolve_arch
from finescope_core.prune.counts import count_parameters, linear_size
from finescope_core.prune.errors import PruneError
from finescope_core.prune.importance import GroupScores

AttentionUnit = Literal["heads", "kv_groups"]
WidthRule = Literal["importance", "proportional"]

RATIO_TOLERANCE = 0.02
"""Largest accepted |achieved - requested| ratio (fraction of all parameters)."""


@dataclass(frozen=True)
class Widths:
    """Per-layer widths after pruning (the same in every layer)."""

    heads_per_kv_keep: int
    kv_keep: int
    intermediate_keep: int

    @property
    def num_heads(self) -> int:
        return self.heads_per_kv_keep * self.kv_keep


@dataclass(frozen=True)
class _Units:
    """Parameters removed per unit in one layer."""

    layers: int
    per_head: int
    per_kv: int
    per_channel: int


def _units(arch: DecoderArch) -> _Units:
    """Per-unit parameter costs, from layer 0 (every layer has the same widths, `resolve_arch` checks)."""
    a, m, hd = arch.attention[0], arch.mlp[0], arch.head_dim
    per_channel = m.gate_proj.in_features + m.up_proj.in_features + m.down_proj.out_features
    per_channel += (m.gate_proj.bias is not None) + (m.up_proj.bias is not None)
    return _Units(
        layers=arch.num_layers,
        per_head=linear_size(a.q_proj, out_features=hd) + a.o_proj.out_features * hd,
        per_kv=linear_size(a.k_proj, out_features=hd) + linear_size(a.v_proj, out_features=hd),
        per_channel=per_channel,
    )


def _removed(arch: DecoderArch, u: _Units, w: Widths) -> int:
    """Parameters removed over all layers by widths `w`."""
    attn = (arch.num_heads - w.num_heads) * u.per_head + (arch.num_kv_heads - w.kv_keep) * u.per_kv
    return u.layers * (attn + (arch.intermediate_size - w.intermediate_keep) * u.per_channel)


def _attention_options(arch: DecoderArch, attention: AttentionUnit) -> list[tuple[int, int]]:
    """(heads_per_kv_keep, kv_keep) pairs the attention unit allows, from no pruning downwards."""
    group = arch.num_heads // arch.num_kv_heads
    if attention == "heads":
        return [(h, arch.num_kv_heads) for h in range(group, 0, -1)]
    if attention == "kv_groups":
        return [(group, kv) for kv in range(arch.num_kv_heads, 0, -1)]
    raise PruneError(f"attention unit {attention!r} is unknown; choose heads or kv_groups")


def _config_refusal(model: PreTrainedModel, arch: DecoderArch, heads: int, kv: int) -> str | None:
    """Why the model's config class would refuse these head counts on reload (None: it accepts them).

    The check builds the config through the class's own validators, as `from_pretrained` will; e.g.
    `LlamaConfig` in transformers 5 insists on hidden_size % num_attention_heads == 0 even when
    head_dim is explicit.
    """
    values = model.config.to_dict()
    values.update(num_attention_heads=heads, num_key_value_heads=kv, head_dim=arch.head_dim)
    try:
        type(model.config).from_dict(values)
    except Exception as e:  # noqa: BLE001 - huggingface_hub's strict-dataclass errors are not ValueErrors
        return str(e).strip().splitlines()[-1].strip()
    return None


def _mode_candidates(
    model: PreTrainedModel, arch: DecoderArch, total: int, ratio: float, attention: AttentionUnit
) -> tuple[list[tuple[Widths, float]], list[str]]:
    """Widths for each allowed attention option, with the MLP width solved for `ratio`.

    Returns:
        ([(widths, achieved ratio)], [head counts the config class refuses, with its reason]).
    """
    u, inter = _units(arch), arch.intermediate_size
    found, refused = [], []
    for h, kv in _attention_options(arch, attention):
        if h * kv != arch.num_heads and (why := _config_refusal(model, arch, h * kv, kv)):
            refused.append(f"{h * kv} heads / {kv} KV heads: {why}")
            continue
        channels = round(
            (ratio * total - _removed(arch, u, Widths(h, kv, inter))) / (u.layers * u.per_channel)
        )
        w = Widths(h, kv, min(inter, max(1, inter - channels)))
        found.append((w, _removed(arch, u, w) / total))
    return found, refused


def _removed_score(scores: GroupScores, w: Widths) -> float:
    """Total score of the groups `build_plan` would remove at widths `w` (all layers)."""
    layers, kv = scores.kv.shape
    kept_kv = scores.kv.topk(w.kv_keep, dim=1)
    removed = scores.kv.sum() - kept_kv.values.sum()
    heads = scores.heads.view(layers, kv, -1).gather(
        1, kept_kv.indices[..., None].expand(-1, -1, scores.heads.shape[1] // kv)
    )
    removed += heads.sum() - heads.topk(w.heads_per_kv_keep, dim=-1).values.sum()
    removed += scores.channels.sum() - scores.channels.topk(w.intermediate_keep, dim=1).values.sum()
    return float(removed)


def _unit_balance(arch: DecoderArch, w: Widths) -> float:
    """|fraction of query heads removed - fraction of MLP channels removed|."""
    return abs((1 - w.num_heads / arch.num_heads) - (1 - w.intermediate_keep / arch.intermediate_size))


def plan_widths(
    model: PreTrainedModel,
    ratio: float,
    attention: AttentionUnit = "heads",
    *,
    scores: GroupScores | None = None,
    rule: WidthRule = "importance",
) -> Widths:
    """Choose one set of widths for all layers that removes `ratio` of all parameters.

    Every allowed attention width is tried (query heads per KV group in `heads` mode, KV groups in
    `kv_groups` mode), the MLP width solved for each so the total lands on `ratio`; candidates
    outside ±`RATIO_TOLERANCE` or refused by the config class are dropped. Then:
    - `importance` (with element-wise `taylor` scores): the candidate whose removed groups (each
      layer's lowest-scoring, as `build_plan` picks them) carry the least total score. Element-wise
      Taylor sums estimate the loss change, so heads and channels compare on one scale. `vector`
      scores cancel inside big groups (|sum w*g| of a head is far below its sum |w*g|), which makes
      heads look cheap, so they and `magnitude` use the proportional rule. On SmolLM2-135M at ratio 0.3
      (bench/bench_prune.py) this kept every head and cut channels: held-out GSM8K perplexity 32,
      against 182 for the proportional widths (2 of 3 heads per group kept).
    - `proportional` (also the fallback): the candidate whose fraction of query heads removed is
      closest to its fraction of MLP channels removed (LLM-Pruner prunes both by one ratio); ties
      keep more heads.

    Args:
        model: the unpruned model.
        ratio: removed parameters / all parameters (embeddings and lm_head included, tied ones once).
        attention: `heads` or `kv_groups`.
        scores: group importance of this model, for the `importance` rule.
        rule: `importance` or `proportional`.

    Raises:
        PruneError: when no widths reach the ratio (the message gives the reachable ranges); this
            depends on the shapes only, so call it without scores to refuse before any work.
    """
    if not 0 <= ratio < 1:
        raise PruneError(f"prune ratio {ratio} is outside [0, 1); give the fraction of parameters to remove")
    if rule not in ("importance", "proportional"):
        raise PruneError(f"width rule {rule!r} is unknown; choose importance or proportional")
    arch = resolve_arch(model)
    total = count_parameters(model)["total"]
    found, refused = _mode_candidates(model, arch, total, ratio, attention)
    ok = [(w, achieved) for w, achieved in found if abs(achieved - ratio) <= RATIO_TOLERANCE]
    if not ok:
        raise PruneError(_unreachable(model, arch, total, ratio, attention, refused))
    if rule == "importance" and scores is not None and scores.method == "taylor":
        return min(ok, key=lambda c: (_removed_score(scores, c[0]), -c[0].num_heads))[0]
    return min(ok, key=lambda c: (round(_unit_balance(arch, c[0]), 9), -c[0].num_heads, abs(c[1] - ratio)))[0]


def _reachable(model: PreTrainedModel, arch: DecoderArch, total: int, attention: AttentionUnit) -> str:
    """Reachable ratio ranges ('0.000-0.123, 0.200-0.350') for one attention unit."""
    # Solving for ratio 0 keeps every channel, for ~1 keeps one: each attention option's extremes.
    lows, _ = _mode_candidates(model, arch, total, 0.0, attention)
    highs, _ = _mode_candidates(model, arch, total, 0.999, attention)
    spans = sorted(zip((c[1] for c in lows), (c[1] for c in highs), strict=True))
    merged: list[list[float]] = []
    for lo, hi in spans:
        lo, hi = lo - RATIO_TOLERANCE, hi + RATIO_TOLERANCE
        if merged and lo <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], hi)
        else:
            merged.append([lo, hi])
    return ", ".join(f"{max(lo, 0.0):.3f}-{hi:.3f}" for lo, hi in merged)


def _unreachable(
    model: PreTrainedModel,
    arch: DecoderArch,
    total: int,
    ratio: float,
    attention: AttentionUnit,
    refused: list[str],
) -> str:
    """The refusal of an unreachable ratio: what both attention units can reach, and what was skipped."""
    other: AttentionUnit = "kv_groups" if attention == "heads" else "heads"
    msg = (
        f"prune ratio {ratio} cannot be reached with attention={attention!r} while keeping at least one head "
        "per KV group and one MLP channel per layer: reachable ratios are "
        f"{_reachable(model, arch, total, attention)} (with attention={other!r}: "
        f"{_reachable(model, arch, total, other)}). Pick a ratio in those ranges."
    )
    if refused:
        msg += " Widths the model's config class refuses on reload were skipped: " + "; ".join(refused)
    return msg
