"""Structured pruning of attention heads and MLP channels, guided by data (paper §3.2.1, LLM-Pruner style).

Pipeline: `group_importance` (first-order Taylor scores per head / KV group / MLP channel, from the LM
loss on the pruning texts) -> `plan_widths` (one width per unit type, the same in every layer, that
lands on the parameter ratio; among those, the one whose removed groups matter least) -> `build_plan`
(which units each layer keeps, by its own scores) ->
`apply_pruning` (sliced `nn.Linear`s + config) -> `save_pruned` (a plain `save_pretrained` directory).

Units (GQA-safe, `head_dim` kept so RoPE is untouched):
- a query head: its `head_dim` rows of q_proj (+ bias) and its `head_dim` columns of o_proj;
- a KV group: its rows of k_proj and v_proj (+ biases) and all the query heads that read it;
- an MLP channel: one row of gate_proj and up_proj (+ biases) and the matching column of down_proj.
Qwen3's q_norm/k_norm act over `head_dim` and are shared by all heads, so head pruning leaves them as is.

Importance follows LLM-Pruner: gradients are accumulated over the whole pruning set first (one
gradient copy in memory, however many batches), then each group scores
`taylor` = sum |w * g| (element-wise), `vector` = |sum w * g|, or `magnitude` = sum |w| (no data),
with g the gradient of the token-averaged LM loss over all pruning tokens. Only the projections
require grad meanwhile, so embeddings and lm_head cost no gradient memory or compute.
"""

from __future__ import annotations

import json
import shutil
import uuid
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from finescope_core.config import PruneConfig
from finescope_core.model import AttentionParts, DecoderArch, MLPParts, resolve_arch

Method = Literal["taylor", "vector", "magnitude"]
AttentionUnit = Literal["heads", "kv_groups"]
WidthRule = Literal["importance", "proportional"]

RATIO_TOLERANCE = 0.02
"""Largest accepted |achieved - requested| ratio (fraction of all parameters)."""

PARAM_KEYS = (
    "attn_q", "attn_k", "attn_v", "attn_o", "mlp_gate", "mlp_up", "mlp_down",
    "embeddings", "norms", "lm_head", "other",
)  # fmt: skip


class PruneError(ValueError):
    """A pruning request that cannot be met; the message says what would work."""


# ----------------------------------------------------------------------------------------------- data


def lm_batches(
    tokenizer: PreTrainedTokenizerBase, texts: Sequence[str], *, max_length: int, batch_size: int
) -> Iterator[dict[str, Tensor]]:
    """Tokenise texts into right-padded causal-LM batches.

    Args:
        tokenizer: must have a pad token.
        texts: pruning texts, in order (longer ones are truncated to `max_length` tokens).
        max_length: tokens per text.
        batch_size: texts per batch.

    Returns:
        An iterator of dicts with `input_ids`, `attention_mask`, `labels` ([B, T]); labels are the
        input ids with padding set to -100 so the loss ignores it.

    Raises:
        PruneError: no texts, or a tokenizer without a pad token (raised at the call, not lazily).
    """
    if not texts:
        raise PruneError("no pruning texts were given; pass at least one non-empty text")
    if tokenizer.pad_token_id is None:
        raise PruneError(
            "the tokenizer has no pad token; set one (e.g. tokenizer.pad_token = tokenizer.eos_token)"
        )
    if max_length < 2 or batch_size < 1:
        raise PruneError(
            f"max_length={max_length}, batch_size={batch_size}: need max_length >= 2, batch_size >= 1"
        )
    return _batches(tokenizer, list(texts), max_length, batch_size)


def _batches(
    tokenizer: PreTrainedTokenizerBase, texts: list[str], max_length: int, batch_size: int
) -> Iterator[dict[str, Tensor]]:
    for start in range(0, len(texts), batch_size):
        enc = tokenizer(
            texts[start : start + batch_size],
            padding=True,
            truncation=True,
            max_length=max_length,
            padding_side="right",
            return_tensors="pt",
        )
        labels = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)
        yield {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"], "labels": labels}


# ------------------------------------------------------------------------------------ parameter counts


def _linears(arch: DecoderArch) -> Iterator[tuple[str, nn.Linear]]:
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
    out_emb = model.get_output_embeddings()
    if out_emb is not None:
        where.update((id(p), "lm_head") for p in out_emb.parameters())
    where.update((id(p), "embeddings") for p in arch.embed.parameters())
    for key, lin in _linears(arch):
        where.update((id(p), key) for p in lin.parameters())
    for module in model.modules():
        if "norm" in type(module).__name__.lower():
            where.update((id(p), "norms") for p in module.parameters(recurse=False))
    counts = dict.fromkeys(PARAM_KEYS, 0)
    for p in model.parameters():  # deduplicated: a tied weight is visited once
        counts[where.get(id(p), "other")] += p.numel()
    counts["total"] = sum(counts.values())
    return counts


def _linear_size(lin: nn.Linear, out_features: int | None = None, in_features: int | None = None) -> int:
    out_f = lin.out_features if out_features is None else out_features
    in_f = lin.in_features if in_features is None else in_features
    return out_f * in_f + (out_f if lin.bias is not None else 0)


# ------------------------------------------------------------------------------------------ importance


@dataclass
class GroupScores:
    """Importance of every prunable group (higher = keep), as float32 CPU tensors.

    Attributes:
        heads: [L, H] query heads.
        kv: [L, KV] KV groups (their k/v rows plus all their query heads).
        channels: [L, I] MLP channels.
        method: how they were computed.
        tokens: loss tokens the gradients were averaged over (0 for `magnitude`).
    """

    heads: Tensor
    kv: Tensor
    channels: Tensor
    method: str
    tokens: int = 0


def group_importance(
    model: PreTrainedModel,
    batches: Iterable[dict[str, Tensor]],
    *,
    method: Method = "taylor",
    progress: Callable[[int], None] | None = None,
) -> GroupScores:
    """Score every query head, KV group and MLP channel of every layer.

    Args:
        model: a Llama/Qwen2/Qwen3-style causal LM; its weights are not changed.
        batches: dicts with `input_ids`, `attention_mask` and `labels` ([B, T], pads -100), e.g. from
            `lm_batches`. Ignored for `magnitude`.
        method: `taylor` (sum |w*g|), `vector` (|sum w*g|) or `magnitude` (sum |w|).
        progress: called with the number of batches done after each backward pass.

    Returns:
        The scores. Any `.grad` the model held is discarded; gradients are cleared again on return.
        They accumulate in the parameters' dtype: load the model in float32 for exact sums.

    Raises:
        PruneError: an unknown method, or batches without a single loss token.
    """
    if method not in ("taylor", "vector", "magnitude"):
        raise PruneError(f"importance method {method!r} is unknown; choose taylor, vector or magnitude")
    arch = resolve_arch(model)
    if method == "magnitude":
        return _collect_scores(arch, method, tokens=0)
    try:
        tokens = _accumulate_grads(model, arch, batches, progress)
        return _collect_scores(arch, method, tokens)
    finally:
        for p in model.parameters():
            p.grad = None


def _prunable_params(arch: DecoderArch) -> list[nn.Parameter]:
    return [p for _, lin in _linears(arch) for p in lin.parameters()]


def _accumulate_grads(
    model: PreTrainedModel,
    arch: DecoderArch,
    batches: Iterable[dict[str, Tensor]],
    progress: Callable[[int], None] | None,
) -> int:
    """Leave in `.grad` the gradient of the mean token loss over all batches; return the token count.

    Only the projections' weights require grad meanwhile (embeddings, norms and lm_head would cost
    memory for nothing); the previous flags and train/eval mode are restored afterwards.
    """
    flags = {p: p.requires_grad for p in model.parameters()}
    was_training = model.training
    prunable = _prunable_params(arch)
    device = next(model.parameters()).device
    tokens = 0
    try:
        model.eval()  # no dropout: the scores should not depend on a random mask
        for p in model.parameters():
            p.requires_grad_(False)
            p.grad = None
        for p in prunable:
            p.requires_grad_(True)
        with torch.enable_grad():
            for done, batch in enumerate(batches, start=1):
                loss, n = _summed_lm_loss(model, {k: v.to(device) for k, v in batch.items()})
                if n:
                    loss.backward()
                tokens += n
                if progress is not None:
                    progress(done)
    finally:
        for p, flag in flags.items():
            p.requires_grad_(flag)
        model.train(was_training)
    if tokens == 0:
        raise PruneError(
            "the pruning batches hold no loss tokens (all padding or empty texts); give longer texts"
        )
    for p in prunable:
        assert p.grad is not None, "every projection takes part in the forward pass"
        p.grad.div_(tokens)
    return tokens


def _summed_lm_loss(model: PreTrainedModel, batch: dict[str, Tensor]) -> tuple[Tensor, int]:
    """Sum (not mean) of next-token NLL over non-ignored labels, so batches weigh by their tokens.

    Returns:
        (scalar loss, number of tokens it sums over).
    """
    logits = model(
        input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False
    ).logits
    target = batch["labels"][:, 1:]
    n = int((target != -100).sum())
    loss = F.cross_entropy(
        logits[:, :-1].float().flatten(0, 1), target.flatten(), ignore_index=-100, reduction="sum"
    )
    return loss, n


def _elementwise(p: Tensor, method: Method) -> Tensor:
    """Per-element contribution: |w*g| (taylor), w*g (vector, abs taken per group), |w| (magnitude)."""
    w = p.detach().float()
    if method == "magnitude":
        return w.abs()
    assert p.grad is not None
    wg = w * p.grad.float()
    return wg.abs() if method == "taylor" else wg


def _rows(lin: nn.Linear, units: int, method: Method) -> Tensor:
    """[units] contribution of consecutive equal blocks of output rows (+ their bias)."""
    s = _elementwise(lin.weight, method).view(units, -1).sum(1)
    if lin.bias is not None:
        s = s + _elementwise(lin.bias, method).view(units, -1).sum(1)
    return s


def _cols(lin: nn.Linear, units: int, method: Method) -> Tensor:
    """[units] contribution of consecutive equal blocks of input columns (the bias is not per column)."""
    w = _elementwise(lin.weight, method)
    return w.view(lin.out_features, units, -1).sum((0, 2))


def _layer_scores(a: AttentionParts, m: MLPParts, arch: DecoderArch, method: Method) -> tuple[Tensor, ...]:
    """Signed group sums for one layer -> ([H], [KV], [I]) scores."""
    h, kv = arch.num_heads, arch.num_kv_heads
    heads = _rows(a.q_proj, h, method) + _cols(a.o_proj, h, method)
    groups = _rows(a.k_proj, kv, method) + _rows(a.v_proj, kv, method) + heads.view(kv, -1).sum(1)
    inter = _rows(m.gate_proj, m.gate_proj.out_features, method) + _rows(
        m.up_proj, m.up_proj.out_features, method
    )
    inter = inter + _cols(m.down_proj, m.down_proj.in_features, method)
    if method == "vector":  # |sum w*g| over the whole group, LLM-Pruner's `vector`
        return heads.abs(), groups.abs(), inter.abs()
    return heads, groups, inter


@torch.no_grad()
def _collect_scores(arch: DecoderArch, method: Method, tokens: int) -> GroupScores:
    per_layer = [_layer_scores(a, m, arch, method) for a, m in zip(arch.attention, arch.mlp, strict=True)]
    heads, kv, channels = (torch.stack([s[i] for s in per_layer]).cpu() for i in range(3))
    return GroupScores(heads=heads, kv=kv, channels=channels, method=method, tokens=tokens)


# ------------------------------------------------------------------------------------------- planning


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
    a, m, hd = arch.attention[0], arch.mlp[0], arch.head_dim
    per_channel = m.gate_proj.in_features + m.up_proj.in_features + m.down_proj.out_features
    per_channel += (m.gate_proj.bias is not None) + (m.up_proj.bias is not None)
    return _Units(
        layers=arch.num_layers,
        per_head=_linear_size(a.q_proj, out_features=hd) + a.o_proj.out_features * hd,
        per_kv=_linear_size(a.k_proj, out_features=hd) + _linear_size(a.v_proj, out_features=hd),
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
    other: AttentionUnit = "kv_groups" if attention == "heads" else "heads"
    msg = (
        f"prune ratio {ratio} cannot be reached with attention={attention!r} while keeping at least one head "
        f"per KV group and one MLP channel per layer: reachable ratios are {_reachable(model, arch, total, attention)}"
        f" (with attention={other!r}: {_reachable(model, arch, total, other)}). Pick a ratio in those ranges."
    )
    if refused:
        msg += " Widths the model's config class refuses on reload were skipped: " + "; ".join(refused)
    return msg


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
        as_tensors = {
            k: [torch.tensor(v, dtype=torch.long) for v in data[k]]
            for k in ("keep_q", "keep_kv", "keep_channels")
        }
        scalars = ("heads_per_kv_keep", "kv_keep", "intermediate_keep", "params_before", "params_after",
                   "widths_before", "target_ratio", "attention", "importance", "width_rule")  # fmt: skip
        return cls(**as_tensors, **{k: data[k] for k in scalars})


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
    want = {"heads": (arch.num_layers, arch.num_heads), "kv": (arch.num_layers, arch.num_kv_heads),
            "channels": (arch.num_layers, arch.intermediate_size)}  # fmt: skip
    for name, shape in want.items():
        if tuple(getattr(scores, name).shape) != shape:
            raise PruneError(
                f"scores.{name} has shape {tuple(getattr(scores, name).shape)}, the model needs {shape}"
            )
        if not torch.isfinite(getattr(scores, name)).all():
            raise PruneError(
                f"scores.{name} holds NaN/inf (gradient overflow?); compute importance in float32"
            )
    if not (1 <= widths.heads_per_kv_keep <= group and 1 <= widths.kv_keep <= arch.num_kv_heads
            and 1 <= widths.intermediate_keep <= arch.intermediate_size):  # fmt: skip
        raise PruneError(f"{widths} does not fit a model with {arch.num_kv_heads} KV groups of {group} heads "
                         f"and {arch.intermediate_size} channels; every width must be >= 1 and <= the original")  # fmt: skip
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
        attn_q=n * _linear_size(a.q_proj, out_features=w.num_heads * hd),
        attn_k=n * _linear_size(a.k_proj, out_features=w.kv_keep * hd),
        attn_v=n * _linear_size(a.v_proj, out_features=w.kv_keep * hd),
        attn_o=n * _linear_size(a.o_proj, in_features=w.num_heads * hd),
        mlp_gate=n * _linear_size(m.gate_proj, out_features=w.intermediate_keep),
        mlp_up=n * _linear_size(m.up_proj, out_features=w.intermediate_keep),
        mlp_down=n * _linear_size(m.down_proj, in_features=w.intermediate_keep),
    )
    after["total"] = sum(v for k, v in after.items() if k != "total")
    return after


# ------------------------------------------------------------------------------------------- applying


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
                f"the plan does not fit layer {i} of this model ({arch.num_heads} heads in {arch.num_kv_heads} KV "
                f"groups, {arch.intermediate_size} channels); was it made for another model, or applied twice?"
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
    hd = arch.head_dim
    for a, m, q, kv, ch in zip(
        arch.attention, arch.mlp, plan.keep_q, plan.keep_kv, plan.keep_channels, strict=True
    ):
        # Sorted, so the kept query heads of each kept KV group stay contiguous and in group order.
        q, kv, ch = q.sort().values, kv.sort().values, ch.sort().values
        q_rows, kv_rows = _head_rows(q, hd), _head_rows(kv, hd)
        a.module.q_proj = _slice_linear(a.q_proj, rows=q_rows)
        a.module.k_proj = _slice_linear(a.k_proj, rows=kv_rows)
        a.module.v_proj = _slice_linear(a.v_proj, rows=kv_rows)
        a.module.o_proj = _slice_linear(a.o_proj, cols=q_rows)
        a.module.num_key_value_groups = plan.heads_per_kv_keep
        for attr, value in (("num_heads", len(q)), ("num_key_value_heads", len(kv))):
            if hasattr(a.module, attr):  # older/other attention classes keep these too
                setattr(a.module, attr, value)
        m.module.gate_proj = _slice_linear(m.gate_proj, rows=ch)
        m.module.up_proj = _slice_linear(m.up_proj, rows=ch)
        m.module.down_proj = _slice_linear(m.down_proj, cols=ch)
        if hasattr(m.module, "intermediate_size"):
            m.module.intermediate_size = len(ch)
    cfg = model.config
    cfg.num_attention_heads = plan.heads_per_kv_keep * plan.kv_keep
    cfg.num_key_value_heads = plan.kv_keep
    cfg.intermediate_size = plan.intermediate_keep
    cfg.head_dim = hd
    resolve_arch(model)  # the shape check now runs against the new config
    return model


# ------------------------------------------------------------------------------------ whole stage, I/O


def prune_model(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    texts: Sequence[str],
    cfg: PruneConfig,
    *,
    rule: WidthRule = "importance",
    progress: Callable[[int], None] | None = None,
) -> PrunePlan:
    """Importance on `texts` -> widths and plan for `cfg.ratio` -> prune `model` in place.

    An unreachable ratio is refused before any forward pass. At ratio 0 no gradients are computed.

    Args:
        model: the model to prune (changed in place).
        tokenizer: its tokenizer (needs a pad token).
        texts: the pruning data (the curated domain set).
        cfg: ratio, importance method, attention unit, batch shape.
        rule: how the widths are chosen among those that reach the ratio (see `plan_widths`).
        progress: called with the number of batches done after each backward pass.

    Returns:
        The applied plan (`plan.ratio` is the achieved ratio).
    """
    plan_widths(model, cfg.ratio, cfg.attention, rule="proportional")  # refuse before any work
    method: Method = "magnitude" if cfg.ratio == 0 else cfg.importance
    batches: Iterable[dict[str, Tensor]] = []
    if method != "magnitude":
        batches = lm_batches(tokenizer, texts, max_length=cfg.max_length, batch_size=cfg.batch_size)
    scores = group_importance(model, batches, method=method, progress=progress)
    widths = plan_widths(model, cfg.ratio, cfg.attention, scores=scores, rule=rule)
    plan = build_plan(model, scores, widths, target_ratio=cfg.ratio, attention=cfg.attention)
    plan.importance = cfg.importance
    plan.width_rule = rule
    apply_pruning(model, plan)
    return plan


def save_pruned(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, plan: PrunePlan, out_dir: str | Path
) -> Path:
    """Write the pruned model (safetensors), tokenizer and `prune_report.json` into `out_dir`, atomically.

    Everything goes into a temporary sibling directory that is renamed into place only when complete;
    an existing `out_dir` is replaced.

    Returns:
        `out_dir`, loadable with plain `AutoModelForCausalLM.from_pretrained`.
    """
    out = Path(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    tag = uuid.uuid4().hex[:8]
    tmp, old = out.with_name(f".{out.name}.tmp-{tag}"), out.with_name(f".{out.name}.old-{tag}")
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        (tmp / "prune_report.json").write_text(json.dumps(plan.to_dict(), indent=1), encoding="utf-8")
        if out.exists():
            out.rename(old)
        tmp.rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)
    return out


def load_report(model_dir: str | Path) -> PrunePlan:
    """The plan saved next to a pruned model by `save_pruned`."""
    path = Path(model_dir) / "prune_report.json"
    if not path.is_file():
        raise PruneError(f"{path} does not exist; is {model_dir} a directory written by save_pruned?")
    return PrunePlan.from_dict(json.loads(path.read_text(encoding="utf-8")))


__all__ = [
    "GroupScores", "PruneError", "PrunePlan", "Widths", "apply_pruning", "build_plan", "count_parameters",
    "group_importance", "lm_batches", "load_report", "plan_pruning", "plan_widths",
    "prune_model", "save_pruned",
]  # fmt: skip
