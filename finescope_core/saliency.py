"""Per-coordinate Jacobian saliency of pooled layer activations and Top-K coordinate selection
(paper eq. 6-10).

s_j(x) = ||d a_j(x) / d e(x)||_F (eq. 6), where a(l)(x) is the masked mean of layer l's output over
positions and e(x) the input embeddings. It is estimated with R Rademacher probes r: u = J r is one
Jacobian-vector product, E[u_j^2] = ||J_j||^2 (eq. 7-8). The tangent flows through the whole network,
so ONE forward-mode pass gives u at every requested layer at once: R passes per batch, not L*R.
W_j = mean over D0 of sqrt(mean_p u_j^2) (eq. 9); I = TopK(W, K_act) (eq. 10).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
import torch.autograd.forward_ad as fwad
from safetensors.torch import load_file, save_file
from torch import Tensor
from transformers import PreTrainedModel

from finescope_core.activations import extract_pooled
from finescope_core.batching import TextBatch, masked_mean, pooling_mask
from finescope_core.hooks import LayerCapture, capture_layers, resolve_layers
from finescope_core.model import DecoderArch, resolve_arch
from finescope_core.progress import Progress, no_progress
from finescope_core.saliency_exact import exact_saliency as exact_saliency  # the estimator's reference

log = logging.getLogger(__name__)

Selector = Literal["jacobian", "magnitude", "variance"]
SALIENCY_JSON = "saliency.json"
SALIENCY_TENSORS = "saliency.safetensors"


class SaliencyError(ValueError):
    """Bad saliency input (probe count, K_act, selector, empty reference corpus); the message says the fix."""


@dataclass
class LayerSaliency:
    """Coordinate scores of the hooked layers and the Top-K_act index sets chosen from them.

    Attributes:
        layers: decoder layer indices (non-negative), one per row of `scores`/`indices`.
        scores: [L, d] float32, W(l)_j (eq. 9) or a statistic baseline.
        indices: [L, k] long, per layer the top-k coordinates by score, highest first (eq. 10).
        selector: which score produced them: "jacobian", "magnitude" or "variance".
    """

    layers: list[int]
    scores: Tensor
    indices: Tensor
    selector: str

    @classmethod
    def from_scores(cls, layers: Sequence[int], scores: Tensor, k_act: int, selector: str) -> LayerSaliency:
        """Select the top `k_act` coordinates of every layer from `scores` [L, d]."""
        return cls(list(layers), scores.float().cpu(), select_coordinates(scores, k_act).cpu(), selector)

    def to_dict(self) -> dict[str, Any]:
        """JSON-able metadata (the tensors go to safetensors)."""
        return {
            "layers": self.layers,
            "selector": self.selector,
            "d": int(self.scores.shape[1]),
            "k": int(self.indices.shape[1]),
        }

    def save(self, out_dir: Path) -> Path:
        """Write `saliency.safetensors` (scores, indices) then `saliency.json`, in place.

        No temporary names: the saliency stage saves into a store work dir, committed whole by the store.
        """
        out_dir.mkdir(parents=True, exist_ok=True)
        tensors = {"scores": self.scores.contiguous(), "indices": self.indices.contiguous()}
        save_file(tensors, str(out_dir / SALIENCY_TENSORS))
        (out_dir / SALIENCY_JSON).write_text(json.dumps(self.to_dict(), indent=1), encoding="utf-8")
        return out_dir

    @classmethod
    def load(cls, out_dir: Path) -> LayerSaliency:
        """Read a directory written by `save`.

        Raises:
            SaliencyError: the directory lacks the files, or they disagree.
        """
        meta_path, tensor_path = out_dir / SALIENCY_JSON, out_dir / SALIENCY_TENSORS
        if not (meta_path.is_file() and tensor_path.is_file()):
            raise SaliencyError(
                f"{out_dir} has no {SALIENCY_JSON} + {SALIENCY_TENSORS}; run the saliency stage first"
            )
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
        tensors = load_file(tensor_path)
        sal = cls(meta["layers"], tensors["scores"], tensors["indices"], meta["selector"])
        if tuple(sal.indices.shape) != (len(sal.layers), meta["k"]) or sal.scores.shape[0] != len(sal.layers):
            raise SaliencyError(
                f"{out_dir}: tensor shapes do not match {SALIENCY_JSON}; the artifact is corrupt"
            )
        return sal


def select_coordinates(scores: Tensor, k_act: int) -> Tensor:
    """Per layer, the `k_act` coordinates with the highest score (eq. 10), highest first.

    Ties are broken by the lower coordinate index, so the selection is deterministic.

    Args:
        scores: [L, d].
        k_act: coordinates to keep per layer, 1 <= k_act <= d.

    Returns:
        [L, k_act] long.

    Raises:
        SaliencyError: k_act outside 1..d.
    """
    d = scores.shape[-1]
    if not 1 <= k_act <= d:
        raise SaliencyError(f"k_act={k_act} must be between 1 and the hidden size d={d}; lower curate.k_act")
    return torch.argsort(scores, dim=-1, descending=True, stable=True)[..., :k_act]


def statistic_scores(pooled: Tensor, selector: Literal["magnitude", "variance"]) -> Tensor:
    """Table 6 baselines: mean |a| or the variance of each pooled coordinate over the reference corpus.

    Args:
        pooled: [N, L, d] pooled activations of D0.
        selector: "magnitude" (mean |a_j|) or "variance" (population variance of a_j).

    Returns:
        [L, d] float32.
    """
    if pooled.ndim != 3 or pooled.shape[0] == 0:
        raise SaliencyError(f"pooled activations must be [N, L, d] with N >= 1, got {tuple(pooled.shape)}")
    pooled = pooled.float()
    if selector == "magnitude":
        return pooled.abs().mean(dim=0)
    if selector == "variance":
        return pooled.var(dim=0, correction=0)
    raise SaliencyError(f"unknown statistic selector {selector!r}; choose 'magnitude' or 'variance'")


@contextmanager
def forward_ad_attention(model: PreTrainedModel) -> Iterator[None]:
    """Run the block with eager attention, restoring the model's own implementation afterwards.

    Fused attention kernels (sdpa's CPU flash kernel, flash-attention) have no forward-AD rule and raise
    NotImplementedError under a JVP; eager attention is plain matmuls + softmax, which all have one.
    """
    current = model.config._attn_implementation
    if current == "eager":
        yield
        return
    log.debug("saliency: switching attention from %s to eager for forward-mode AD", current)
    model.set_attn_implementation("eager")
    if model.config._attn_implementation != "eager":
        raise SaliencyError(
            f"cannot switch {type(model).__name__} from {current!r} to eager attention, and {current!r} "
            "has no forward-mode AD rule; load the model with attn_implementation='eager' for the "
            "saliency stage"
        )
    try:
        yield
    finally:
        model.set_attn_implementation(current)


def rademacher_probe(
    attention_mask: Tensor, width: int, generator: torch.Generator, dtype: torch.dtype
) -> Tensor:
    """One ±1 probe per sample, shaped like the input embeddings, zero at padding.

    Args:
        attention_mask: [B, T].
        width: d_model.
        generator: the random source (its device decides where the probe is drawn).

    Returns:
        [B, T, width] on the generator's device.
    """
    batch, length = attention_mask.shape
    signs = torch.randint(0, 2, (batch, length, width), generator=generator, device=generator.device)
    mask = attention_mask.to(generator.device)[..., None]
    return ((2 * signs - 1) * mask).to(dtype)


def _model_device(model: PreTrainedModel) -> torch.device:
    return next(model.parameters()).device


def _saliency_with_probes(
    arch: DecoderArch, capture: LayerCapture, batch: TextBatch, probes: Iterable[Tensor], skip_first: int
) -> Tensor:
    """Per-sample ŝ (eq. 8) from one JVP per probe; hooks and eager attention must already be in place.

    Returns:
        [B, L, d] float32 on the model's device.
    """
    mask = batch.attention_mask
    pmask = pooling_mask(mask, skip_first)
    embeds = arch.embed(batch.input_ids)
    sq_sum: Tensor | None = None
    count = 0
    for probe in probes:
        u_sq = _squared_tangents(arch, capture, embeds, probe, mask, pmask)
        sq_sum = u_sq if sq_sum is None else sq_sum + u_sq
        count += 1
    assert sq_sum is not None, "no probes given"
    return (sq_sum / count).sqrt()


def _squared_tangents(
    arch: DecoderArch, capture: LayerCapture, embeds: Tensor, probe: Tensor, mask: Tensor, pmask: Tensor
) -> Tensor:
    """u_j^2 with u = J r for one probe r: one forward-mode pass serves every hooked layer.
    [B, L, d] float32."""
    # torch.autograd.forward_ad ships without annotations (torch 2.13), hence the two ignores below.
    with fwad.dual_level():
        dual: Tensor = fwad.make_dual(embeds, probe.to(embeds.device, embeds.dtype))  # type: ignore[no-untyped-call]
        pooled = capture.run(
            lambda: arch.backbone(inputs_embeds=dual, attention_mask=mask, use_cache=False),
            reduce=lambda h: masked_mean(h, pmask),
        )
        tangents = [fwad.unpack_dual(p).tangent for p in pooled]  # type: ignore[no-untyped-call]
        assert all(t is not None for t in tangents), "a hooked layer output carried no tangent"
        return torch.stack(tangents, dim=1).float().square()


def batch_saliency(
    model: PreTrainedModel, batch: TextBatch, layers: Sequence[int], probes: Tensor, skip_first: int
) -> Tensor:
    """Per-sample Hutchinson saliency ŝ(l)(x) (eq. 8) of one batch with given probes, all layers in one
    pass each.

    Args:
        model: a Llama/Qwen-style causal LM.
        batch: the texts.
        layers: decoder layers to score (negative counts from the end).
        probes: [R, B, T, d_model] probes (e.g. from `rademacher_probe`), zero at padding.
        skip_first: leading tokens left out of pooling (`batching.pooling_mask`).

    Returns:
        [B, L, d] float32 on the CPU: sqrt(mean_p u_j^2) per sample, layer and coordinate.
    """
    arch = resolve_arch(model)
    with forward_ad_attention(model), torch.no_grad(), capture_layers(arch, layers) as cap:
        batch = batch.to(_model_device(model))
        return _saliency_with_probes(arch, cap, batch, iter(probes), skip_first).cpu()


def _known_rows(batches: Iterable[TextBatch]) -> int:
    return sum(len(b) for b in batches) if isinstance(batches, Sequence) else 0


def jacobian_saliency(
    model: PreTrainedModel,
    batches: Iterable[TextBatch],
    layers: Sequence[int],
    *,
    probes: int,
    skip_first: int,
    generator: torch.Generator,
    progress: Progress = no_progress,
) -> Tensor:
    """W(l)_j (eq. 9): the mean over the reference corpus of the per-sample saliency ŝ(l)_j (eq. 8).

    Every sample gets its own probes; each probe costs one forward-mode pass that serves all layers
    and stops after the deepest one. Attention runs eager during this call (see `forward_ad_attention`).

    Args:
        model: a Llama/Qwen-style causal LM.
        batches: the reference corpus D0 (e.g. from `batching.iter_text_batches`).
        layers: decoder layers to score (negative counts from the end).
        probes: R, Rademacher probes per sample.
        skip_first: leading tokens left out of pooling.
        generator: source of the probes (seed it for reproducible scores).
        progress: called as progress(samples_done, samples_total) after each batch; total is 0 when
            `batches` is a one-shot iterator of unknown length.

    Returns:
        [L, d] float32 on the CPU, rows in the order of `layers`.

    Raises:
        SaliencyError: probes < 1 or an empty reference corpus.
    """
    if probes < 1:
        raise SaliencyError(f"probes={probes} must be >= 1 (R of eq. 8)")
    arch = resolve_arch(model)
    total_rows, done = _known_rows(batches), 0
    total: Tensor | None = None
    device = _model_device(model)
    with forward_ad_attention(model), torch.no_grad(), capture_layers(arch, layers) as cap:
        for batch in batches:
            draws = (
                rademacher_probe(batch.attention_mask, arch.hidden_size, generator, arch.embed.weight.dtype)
                for _ in range(probes)
            )
            s_hat = _saliency_with_probes(arch, cap, batch.to(device), draws, skip_first)
            total = s_hat.sum(dim=0) if total is None else total + s_hat.sum(dim=0)
            done += len(batch)
            progress(done, total_rows)
    if total is None:
        raise SaliencyError(
            "the reference corpus D0 is empty; give at least one text (curate.reference_size)"
        )
    return (total / done).cpu()


def compute_saliency(
    model: PreTrainedModel,
    batches: Iterable[TextBatch],
    layers: Sequence[int],
    *,
    selector: Selector,
    k_act: int,
    probes: int,
    skip_first: int,
    generator: torch.Generator,
    progress: Progress = no_progress,
) -> LayerSaliency:
    """Score every coordinate of the hooked layers on D0 and pick the top `k_act` per layer.

    Args:
        selector: "jacobian" (eq. 6-9), or the Table 6 baselines "magnitude" / "variance".
        k_act: K_act of eq. 10. `probes` and `generator` are used by "jacobian" only.
        (others as in `jacobian_saliency`)

    Returns:
        LayerSaliency with non-negative layer indices.

    Raises:
        SaliencyError: unknown selector or k_act larger than the hidden size (before any model work).
    """
    arch = resolve_arch(model)
    resolved = resolve_layers(layers, arch.num_layers)
    if not 1 <= k_act <= arch.hidden_size:
        raise SaliencyError(
            f"k_act={k_act} must be between 1 and the hidden size d={arch.hidden_size}; lower curate.k_act"
        )
    if selector == "jacobian":
        scores = jacobian_saliency(
            model,
            batches,
            resolved,
            probes=probes,
            skip_first=skip_first,
            generator=generator,
            progress=progress,
        )
    elif selector in ("magnitude", "variance"):
        chunks = [
            acts
            for _, acts in extract_pooled(model, batches, resolved, skip_first=skip_first, progress=progress)
        ]
        if not chunks:
            raise SaliencyError(
                "the reference corpus D0 is empty; give at least one text (curate.reference_size)"
            )
        scores = statistic_scores(torch.cat(chunks), selector)
    else:
        raise SaliencyError(f"unknown selector {selector!r}; choose 'jacobian', 'magnitude' or 'variance'")
    return LayerSaliency.from_scores(resolved, scores, k_act, selector)
