"""The exact per-sample Jacobian saliency of eq. 6: the reference the Hutchinson estimator of
`finescope_core.saliency` (eq. 7-9) is checked against, practical for tiny models only."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor
from transformers import PreTrainedModel

from finescope_core.batching import TextBatch, masked_mean, pooling_mask
from finescope_core.hooks import capture_layers
from finescope_core.model import resolve_arch


def exact_saliency(
    model: PreTrainedModel, batch: TextBatch, layers: Sequence[int], skip_first: int
) -> Tensor:
    """Reference for eq. 6: exact per-sample Jacobian row norms ||d a(l)_j(x) / d e(x)||_F.

    Builds the Jacobian with reverse mode (vectorised over the L*d output coordinates), so it is only
    practical for tiny models; tests use it to check the Hutchinson estimator.

    Args:
        model: a Llama/Qwen-style causal LM.
        batch: B texts.
        layers: decoder layers (negative counts from the end).
        skip_first: leading tokens left out of pooling.

    Returns:
        [B, L, d] float32 on the CPU.
    """
    arch = resolve_arch(model)
    batch = batch.to(next(model.parameters()).device)
    mask = batch.attention_mask
    pmask = pooling_mask(mask, skip_first)
    with torch.no_grad():
        embeds = arch.embed(batch.input_ids)
    with torch.enable_grad(), capture_layers(arch, layers) as cap:

        def pooled_sum(e: Tensor) -> Tensor:
            outs = cap.run(
                lambda: arch.backbone(inputs_embeds=e, attention_mask=mask, use_cache=False),
                reduce=lambda h: masked_mean(h, pmask),
            )
            # Samples do not interact, so d(sum_b a[b])/d e[b] is sample b's own Jacobian: B times fewer rows.
            return torch.stack(outs, dim=1).sum(dim=0)  # [L, d]

        # torch.autograd.functional ships without annotations (torch 2.13).
        jac: Tensor = torch.autograd.functional.jacobian(  # type: ignore[no-untyped-call]
            pooled_sum, embeds, vectorize=True
        )  # [L, d, B, T, D]
    return jac.float().square().sum(dim=(-2, -1)).permute(2, 0, 1).sqrt().cpu()
