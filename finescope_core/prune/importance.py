"""Importance of every query head, KV group and MLP channel (LLM-Pruner's first-order Taylor scores).

Gradients are accumulated over the whole pruning set first (one gradient copy in memory, however many
batches), then each group scores `taylor` = sum |w * g| (element-wise), `vector` = |sum w * g|, or
`magnitude` = sum |w| (no data), with g the gradient of the token-averaged LM loss over all pruning
tokens. Only the projections require grad meanwhile, so embeddings and lm_head cost no gradient memory
or compute.

Groups (GQA-safe): a query head is its `head_dim` rows of q_proj (+ bias) and its `head_dim` columns of
o_proj; a KV group its rows of k_proj and v_proj (+ biases) and all the query heads that read it; an MLP
channel one row of gate_proj and up_proj (+ biases) and the matching column of down_proj.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sized
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import PreTrainedModel

from finescope_core.model import AttentionParts, DecoderArch, MLPParts, resolve_arch
from finescope_core.progress import Progress, no_progress
from finescope_core.prune.counts import projections
from finescope_core.prune.errors import PruneError

Method = Literal["taylor", "vector", "magnitude"]


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
    progress: Progress = no_progress,
) -> GroupScores:
    """Score every query head, KV group and MLP channel of every layer.

    Args:
        model: a Llama/Qwen2/Qwen3-style causal LM; its weights are not changed.
        batches: dicts with `input_ids`, `attention_mask` and `labels` ([B, T], pads -100), e.g. from
            `lm_batches`. Ignored for `magnitude`.
        method: `taylor` (sum |w*g|), `vector` (|sum w*g|) or `magnitude` (sum |w|).
        progress: called as progress(batches done, batches in all) after each backward pass; the
            total is 0 when `batches` has no length.

    Returns:
        The scores. Any `.grad` the model held is discarded; gradients are cleared again on return.
        Gradients accumulate in float32 whatever the parameters' dtype. One gradient-sized accumulator
        is held: a float32 model's own `.grad`; for a lower-precision model a float32 running sum,
        into which each parameter's gradient is folded as soon as backward produces it (so the whole
        model's bf16 gradients never exist beside the sum).

    Raises:
        PruneError: an unknown method, or batches without a single loss token.
    """
    if method not in ("taylor", "vector", "magnitude"):
        raise PruneError(f"importance method {method!r} is unknown; choose taylor, vector or magnitude")
    arch = resolve_arch(model)
    if method == "magnitude":
        return _collect_scores(arch, method, tokens=0, grads={})
    try:
        tokens, grads = _accumulate_grads(model, arch, batches, progress)
        return _collect_scores(arch, method, tokens, grads)
    finally:
        for p in model.parameters():
            p.grad = None


def _prunable_params(arch: DecoderArch) -> list[nn.Parameter]:
    return [p for _, lin in projections(arch) for p in lin.parameters()]


def _accumulate_grads(
    model: PreTrainedModel, arch: DecoderArch, batches: Iterable[dict[str, Tensor]], progress: Progress
) -> tuple[int, dict[Tensor, Tensor]]:
    """The float32 gradient of the mean token loss over all batches per projection parameter, and the
    token count.

    Only the projections' weights require grad meanwhile (embeddings, norms and lm_head would cost
    memory for nothing); the previous flags and train/eval mode are restored afterwards. Parameters
    stored in a lower precision have their gradient moved into a float32 sum by a post-accumulate-grad
    hook, the moment backward produces it: the sum over many batches does not round at bf16
    precision, and only one parameter's low-precision gradient exists at a time.
    """
    flags = {p: p.requires_grad for p in model.parameters()}
    was_training = model.training
    prunable = _prunable_params(arch)
    device = next(model.parameters()).device
    total = len(batches) if isinstance(batches, Sized) else 0
    tokens = 0
    sums: dict[Tensor, Tensor] = {}
    fold = _folder(sums)
    low = [p for p in prunable if p.dtype != torch.float32]
    # untyped in torch
    hooks = [p.register_post_accumulate_grad_hook(fold) for p in low]  # type: ignore[no-untyped-call]
    try:
        model.train(False)  # no dropout: the scores should not depend on a random mask
        for p in model.parameters():
            p.requires_grad_(False)
            p.grad = None
        for p in prunable:
            p.requires_grad_(True)
        with torch.enable_grad():
            for done, batch in enumerate(batches, start=1):
                loss, n = _summed_lm_loss(model, {k: v.to(device) for k, v in batch.items()})
                if n:
                    torch.autograd.backward(loss)
                tokens += n
                progress(done, total)
    finally:
        for hook in hooks:
            hook.remove()
        for p, flag in flags.items():
            p.requires_grad_(flag)
        model.train(was_training)
    if tokens == 0:
        raise PruneError(
            "the pruning batches hold no loss tokens (all padding or empty texts); give longer texts"
        )
    grads: dict[Tensor, Tensor] = {}
    for p in prunable:
        grad = sums.get(p, p.grad)
        assert grad is not None, "every projection takes part in the forward pass"
        grads[p] = grad.div_(tokens)
    return tokens, grads


def _folder(sums: dict[Tensor, Tensor]) -> Callable[[Tensor], None]:
    """A post-accumulate-grad hook that moves a parameter's fresh `.grad` into its float32 running sum."""

    def fold(p: Tensor) -> None:
        assert p.grad is not None, "the hook runs after the gradient is accumulated"
        if p in sums:
            sums[p].add_(p.grad)  # add_ upcasts the bf16 gradient into the float32 sum
        else:
            sums[p] = p.grad.float()
        p.grad = None

    return fold


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


def _elementwise(p: Tensor, method: Method, grads: Mapping[Tensor, Tensor]) -> Tensor:
    """Per-element contribution: |w*g| (taylor), w*g (vector, abs taken per group), |w| (magnitude)."""
    w = p.detach().float()
    if method == "magnitude":
        return w.abs()
    assert p in grads, "importance from gradients runs after the backward passes"
    wg = w * grads[p]
    return wg.abs() if method == "taylor" else wg


def _rows(lin: nn.Linear, units: int, method: Method, grads: Mapping[Tensor, Tensor]) -> Tensor:
    """[units] contribution of consecutive equal blocks of output rows (+ their bias)."""
    s = _elementwise(lin.weight, method, grads).view(units, -1).sum(1)
    if lin.bias is not None:
        s = s + _elementwise(lin.bias, method, grads).view(units, -1).sum(1)
    return s


def _cols(lin: nn.Linear, units: int, method: Method, grads: Mapping[Tensor, Tensor]) -> Tensor:
    """[units] contribution of consecutive equal blocks of input columns (the bias is not per column)."""
    w = _elementwise(lin.weight, method, grads)
    return w.view(lin.out_features, units, -1).sum((0, 2))


def _layer_scores(
    a: AttentionParts, m: MLPParts, arch: DecoderArch, method: Method, grads: Mapping[Tensor, Tensor]
) -> tuple[Tensor, Tensor, Tensor]:
    """Signed group sums for one layer -> ([H], [KV], [I]) scores."""
    h, kv = arch.num_heads, arch.num_kv_heads
    heads = _rows(a.q_proj, h, method, grads) + _cols(a.o_proj, h, method, grads)
    groups = (
        _rows(a.k_proj, kv, method, grads) + _rows(a.v_proj, kv, method, grads) + heads.view(kv, -1).sum(1)
    )
    inter = _rows(m.gate_proj, m.gate_proj.out_features, method, grads) + _rows(
        m.up_proj, m.up_proj.out_features, method, grads
    )
    inter = inter + _cols(m.down_proj, m.down_proj.in_features, method, grads)
    if method == "vector":  # |sum w*g| over the whole group, LLM-Pruner's `vector`
        return heads.abs(), groups.abs(), inter.abs()
    return heads, groups, inter


@torch.no_grad()
def _collect_scores(
    arch: DecoderArch, method: Method, tokens: int, grads: Mapping[Tensor, Tensor]
) -> GroupScores:
    """Every layer's group scores, stacked [L, ...] on the CPU (the plan is made there)."""
    per_layer = [
        _layer_scores(a, m, arch, method, grads) for a, m in zip(arch.attention, arch.mlp, strict=True)
    ]
    heads, kv, channels = (torch.stack([s[i] for s in per_layer]).cpu() for i in range(3))
    return GroupScores(heads=heads, kv=kv, channels=channels, method=method, tokens=tokens)
