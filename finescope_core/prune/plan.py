"""The plan: which query heads, KV groups and channels each layer keeps, by its own scores.

A `PrunePlan` is also the `prune_report.json` saved next to the pruned model (`to_dict` / `from_dict`),
so a plan can be re-applied to the original model.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor
from transformers import PreTrainedModel

from finescope_core.model import DecoderArch, resolve_arch
from finescope_core.prune.counts import count_parameters, linear_size
from finescope_core.prune.errors import PruneError
from finescope_core.prune.importance import GroupScores
from finescope_core.prune.widths import AttentionUnit, WidthRule, Widths, plan_widths


@dataclass
class PrunePlan:
    """What pruning keeps in every layer, and the parameter counts before and after.

    Attributes:
        heads_per_kv_keep, kv_keep, intermediate_keep: widths after pruning, the same in every layer.
        keep_q: per layer, sorted indices of the kept query heads ([heads_per_kv_keep * kv_keep]).
        keep_kv: per layer, sorted indices of the kept KV groups ([kv_keep]).
        keep_channels: per layer, sorted indices of the kept MLP channels ([intermediate_keep]).
        params_before, params_after: `count_parameters` of the model before / after.
        widths_before: num_attention_heads, num_key_value_heads, intermediate_size, head_dim before.
        target_ratio, attention, importance, width_rule: what was asked for (for the report).
    """

    heads_per_kv_keep: int
    kv_keep: int
    intermediate_keep: int
    keep_q: list[Tensor]
    keep_kv: list[Tensor]
    keep_channels: list[Tensor]
    params_before: dict[str, int]
    params_after: dict[str, int]
    widths_before: dict[str, int] = field(default_factory=dict)
    target_ratio: float | None = None
    attention: str = "heads"
    importance: str | None = None
    width_rule: str | None = None

    @property
    def ratio(self) -> float:
        """Achieved ratio: removed parameters / all parameters before."""
        return 1 - self.params_after["total"] / self.params_before["total"]

    def widths_after(self) -> dict[str, int]:
        """The config widths of the pruned model (`head_dim` is kept, so RoPE is untouched)."""
        return {
            "num_attention_heads": self.heads_per_kv_keep * self.kv_keep,
            "num_key_value_heads": self.kv_keep,
            "intermediate_size": self.intermediate_keep,
            "head_dim": self.widths_before.get("head_dim", 0),
        }

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form (index tensors become lists of ints)."""
        return {
            "target_ratio": self.target_ratio,
            "achieved_ratio": self.ratio,
            "attention": self.attention,
            "importance": self.importance,
            "width_rule": self.width_rule,
            "heads_per_kv_keep": self.heads_per_kv_keep,
            "kv_keep": self.kv_keep,
            "intermediate_keep": self.intermediate_keep,
            "widths_before": dict(self.widths_before),
            "widths_after": self.widths_after(),
            "params_before": dict(self.params_before),
            "params_after": dict(self.params_after),
            "keep_q": [t.tolist() for t in self.keep_q],
            "keep_kv": [t.tolist() for t in self.keep_kv],
            "keep_channels": [t.tolist() for t in self.keep_channels],
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PrunePlan:
        """Inverse of `to_dict` (e.g. to re-apply a saved `prune_report.json`)."""

        def indices(key: str) -> list[Tensor]:
            return [torch.tensor(v, dtype=torch.long) for v in data[key]]

        return cls(
            heads_per_kv_keep=data["heads_per_kv_keep"],
            kv_keep=data["kv_keep"],
            intermediate_keep=data["intermediate_keep"],
            keep_q=indices("keep_q"),
            keep_kv=indices("keep_kv"),
            keep_channels=indices("keep_channels"),
            params_before=data["params_before"],
            params_after=data["params_after"],
            widths_before=data["widths_before"],
            target_ratio=data["target_ratio"],
            attention=data["attention"],
            importance=data["importance"],
            width_rule=data["width_rule"],
        )


def _top(scores: Tensor, k: int) -> Tensor:
    """Sorted indices of the k highest scores; ties keep the lower index (deterministic)."""
    order = torch.argsort(scores, descending=True, stable=True)
    return order[:k].sort().values


def _select_layer(scores: GroupScores, layer: int, w: Widths, group: int) -> tuple[Tensor, Tensor, Tensor]:
    """(kept query heads, kept KV groups, kept channels) of one layer, each sorted."""
    kv = _top(scores.kv[layer], w.kv_keep)
    heads = [
        _top(scores.heads[layer, g * group : (g + 1) * group], w.heads_per_kv_keep) + g * group
        for g in kv.tolist()
    ]
    return torch.cat(heads), kv, _top(scores.channels[layer], w.intermediate_keep)


def build_plan(
    model: PreTrainedModel,
    scores: GroupScores,
    widths: Widths,
    *,
    target_ratio: float | None = None,
    attention: AttentionUnit = "heads",
) -> PrunePlan:
    """Pick, in each layer, the highest-scoring KV groups, query heads per kept group, and channels.

    Raises:
        PruneError: scores or widths that do not fit the model.
    """
    arch = resolve_arch(model)
    group = arch.num_heads // arch.num_kv_heads
    want = {
        "heads": (arch.num_layers, arch.num_heads),
        "kv": (arch.num_layers, arch.num_kv_heads),
        "channels": (arch.num_layers, arch.intermediate_size),
    }
    for name, shape in want.items():
        if tuple(getattr(scores, name).shape) != shape:
            raise PruneError(
                f"scores.{name} has shape {tuple(getattr(scores, name).shape)}, the model needs {shape}"
            )
        if not torch.isfinite(getattr(scores, name)).all():
            raise PruneError(
                f"scores.{name} holds NaN/inf (gradient overflow?); compute importance in float32"
            )
    if not (
        1 <= widths.heads_per_kv_keep <= group
        and 1 <= widths.kv_keep <= arch.num_kv_heads
        and 1 <= widths.intermediate_keep <= arch.intermediate_size
    ):
        raise PruneError(
            f"{widths} does not fit a model with {arch.num_kv_heads} KV groups of {group} heads "
            f"and {arch.intermediate_size} channels; every width must be >= 1 and <= the original"
        )
    chosen = [_select_layer(scores, i, widths, group) for i in range(arch.num_layers)]
    return PrunePlan(
        heads_per_kv_keep=widths.heads_per_kv_keep,
        kv_keep=widths.kv_keep,
        intermediate_keep=widths.intermediate_keep,
        keep_q=[c[0] for c in chosen],
        keep_kv=[c[1] for c in chosen],
        keep_channels=[c[2] for c in chosen],
        params_before=count_parameters(model),
        params_after=_params_after(model, arch, widths),
        widths_before=_widths_of(arch),
        target_ratio=target_ratio,
        attention=attention,
        importance=scores.method,
    )


def plan_pruning(
    model: PreTrainedModel,
    scores: GroupScores,
    ratio: float,
    attention: AttentionUnit = "heads",
    *,
    rule: WidthRule = "importance",
) -> PrunePlan:
    """`plan_widths` then `build_plan`: the plan that removes `ratio` of the parameters by `scores`."""
    widths = plan_widths(model, ratio, attention, scores=scores, rule=rule)
    plan = build_plan(model, scores, widths, target_ratio=ratio, attention=attention)
    plan.width_rule = rule
    return plan


def _widths_of(arch: DecoderArch) -> dict[str, int]:
    """The config widths before pruning, under the config's names (for the report)."""
    return {
        "num_attention_heads": arch.num_heads,
        "num_key_value_heads": arch.num_kv_heads,
        "intermediate_size": arch.intermediate_size,
        "head_dim": arch.head_dim,
    }


def _params_after(model: PreTrainedModel, arch: DecoderArch, w: Widths) -> dict[str, int]:
    """`count_parameters` of the model once pruned to `w`, computed from the shapes."""
    a, m, hd, n = arch.attention[0], arch.mlp[0], arch.head_dim, arch.num_layers
    after = count_parameters(model)
    after.update(
        attn_q=n * linear_size(a.q_proj, out_features=w.num_heads * hd),
        attn_k=n * linear_size(a.k_proj, out_features=w.kv_keep * hd),
        attn_v=n * linear_size(a.v_proj, out_features=w.kv_keep * hd),
        attn_o=n * linear_size(a.o_proj, in_features=w.num_heads * hd),
        mlp_gate=n * linear_size(m.gate_proj, out_features=w.intermediate_keep),
        mlp_up=n * linear_size(m.up_proj, out_features=w.intermediate_keep),
        mlp_down=n * linear_size(m.down_proj, in_features=w.intermediate_keep),
    )
    after["total"] = sum(v for k, v in after.items() if k != "total")
    return after
