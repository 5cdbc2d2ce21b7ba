"""Importance of every query head, KV group and MLP channel (LLM-Pruner's first-order Taylor scores).

Gradients are accumulated over the whole pruning set first (one gradient copy in memory, however many
batches), then each group scores `taylor` = sum |w * g| (element-wise), `vector` = |sum w * g|, or
`magnitude` = sum |w| (no data), with g the gradient of the token-averaged LM loss over all pruning
tokens. Only the projections require grad meanwhile, so embeddings and lm_head cost no gradient memory
or compute. With `max_sums` the layers are scored in chunks, one pass over all the batches per chunk
with only that chunk's projections requiring grad (`finescope_core.prune.chunks`): only one chunk's
float32 sums exist at a time, and the scores are the one-pass scores.

Groups (GQA-safe): a query head is its `head_dim` rows of q_proj (+ bias) and its `head_dim` columns of
o_proj; a KV group its rows of k_proj and v_proj (+ biases) and all the query heads that read it; an MLP
channel one row of gate_proj and up_proj (+ biases) and the matching column of down_proj.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence, Sized
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import PreTrainedModel

from finescope_core.model import AttentionParts, DecoderArch, MLPParts, resolve_arch
from finescope_core.progress import Progress, no_progress
from finescope_core.prune.chunks import layer_chunks
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
    max_sums: int | None = None,
) -> GroupScores:
    """Score every query head, KV group and MLP channel of every layer.

    Args:
        model: a Llama/Qwen2/Qwen3-style causal LM; its weights are not changed.
        batches: dicts with `input_ids`, `attention_mask` and `labels` ([B, T], pads -100), e.g. from
            `lm_batches`. Ignored for `magnitude`.
        method: `taylor` (sum |w*g|), `vector` (|sum w*g|) or `magnitude` (sum |w|).
        progress: called as progress(batches done, batches in all) after each backward pass (over
            all passes); the total is 0 when `batches` has no length.
        max_sums: the most bytes one pass's float32 gradient sums may take (`chunks.sums_limit`); the
            layers are split into as few consecutive chunks as respect it (at least one layer each)
            and each chunk costs one pass: a forward and a backward down to its first layer over every
            batch. None: one pass.

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
        return _stack(arch, method, 0, [_layer_scores(arch, i, method, {}) for i in range(len(arch.mlp))])
    chunks = layer_chunks([4 * _numel(_layer_params(arch, i)) for i in range(len(arch.mlp))], max_sums)
    if len(chunks) > 1 and isinstance(batches, Iterator):
        batches = list(batches)  # every pass reads the same batches
    counter = _Counter(progress, len(chunks) * len(batches) if isinstance(batches, Sized) else 0)
    per_layer: list[tuple[Tensor, Tensor, Tensor]] = []
    tokens = 0
    try:
        for chunk in chunks:
            params = [p for i in chunk for p in _layer_params(arch, i)]
            tokens, grads = _accumulate_grads(model, params, batches, counter)
            per_layer += [_layer_scores(arch, i, method, grads) for i in chunk]
            del grads  # this chunk's sums go before the next chunk's are made
            for p in params:
                p.grad = None
        return _stack(arch, method, tokens, per_layer)
    finally:
        for p in model.parameters():
            p.grad = None


class _Counter:
    """Progress over all passes: batches done so far, of all the passes' batches."""

    def __init__(self, progress: Progress, total: int):
        self.progress, self.total, self.done = progress, total, 0

    def step(self) -> None:
        self.done += 1
        self.progress(self.done, self.total)


def _layer_params(arch: DecoderArch, i: int) -> list[nn.Parameter]:
    """Layer `i`'s prunable projections' parameters (weights and biases)."""
    a, m = arch.attention[i], arch.mlp[i]
    linears = (a.q_proj, a.k_proj, a.v_proj, a.o_proj, m.gate_proj, m.up_proj, m.down_proj)
    return [p for lin in linears for p in lin.parameters()]


def _numel(params: Sequence[nn.Parameter]) -> int:
    return sum(p.numel() for p in params)


def _accumulate_grads(
    model: PreTrainedModel,
    prunable: Sequence[nn.Parameter],
    batches: Iterable[dict[str, Tensor]],
    counter: _Counter,
) -> tuple[int, dict[Tensor, Tensor]]:
    """The float32 gradient of the mean token loss over all batches per parameter of `prunable`, and
    the token count.

    Only `prunable` requires grad meanwhile (embeddings, norms and lm_head would cost
    memory for nothing); the previous flags and train/eval mode are restored afterwards. Parameters
    stored in a lower precision have their gradient moved into a float32 sum by a post-accumulate-grad
    hook, the moment backward produces it: the sum over many batches does not round at bf16
    precision, and only one parameter's low-precision gradient exists at a time.
    """
    flags = {p: p.requires_grad for p in model.parameters()}
    was_training = model.training
    device = next(model.parameters()).device
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
            for batch in batches:
                loss, n = _summed_lm_loss(model, {k: v.to(device) for k, v in batch.items()})
                if n:
                    torch.autograd.backward(loss)
                tokens += n
                counter.step()
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


@torch.no_grad()
def _layer_scores(
    arch: DecoderArch, i: int, method: Method, grads: Mapping[Tensor, Tensor]
) -> tuple[Tensor, Tensor, Tensor]:
    """Layer `i`'s group sums -> ([H], [KV], [I]) scores, on the CPU (the plan is made there)."""
    a: AttentionParts = arch.attention[i]
    m: MLPParts = arch.mlp[i]
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
        heads, groups, inter = heads.abs(), groups.abs(), inter.abs()
    return heads.cpu(), groups.cpu(), inter.cpu()


def _stack(
    arch: DecoderArch, method: Method, tokens: int, per_layer: Sequence[tuple[Tensor, Tensor, Tensor]]
) -> GroupScores:
    """Every layer's group scores, stacked [L, ...]."""
    assert len(per_layer) == len(arch.mlp), "every layer is scored once"
    heads, kv, channels = (torch.stack([s[i] for s in per_layer]) for i in range(3))
    return GroupScores(heads=heads, kv=kv, channels=channels, method=method, tokens=tokens)
