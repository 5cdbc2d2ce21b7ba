"""Pooled layer activations a~(l)(x) (paper eq. 11) for many texts, from one forward pass per batch,
sharded on disk.

All requested layers are captured from the same pass, which stops right after the deepest of them
(no later layer, final norm or lm_head runs). Shards hold at most `shard_size` texts, so a corpus
larger than memory can be embedded; `activations.json` is written last and marks a complete directory.
Files are written in place, not through temporary names: the curate stage writes into a store work
dir, which the store commits whole (`ArtifactStore.commit`).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from finescope_core.batching import TextBatch, iter_text_batches, masked_mean, pooling_mask
from finescope_core.hooks import capture_layers, resolve_layers
from finescope_core.model import DecoderArch, resolve_arch
from finescope_core.progress import Progress, no_progress

MANIFEST = "activations.json"
FORMAT = "finescope-activations/1"


class ActivationError(ValueError):
    """Bad activation input, or an activation directory that is missing or incomplete."""


@dataclass(frozen=True)
class ShardInfo:
    """One shard file (relative to the activation directory) and its number of texts."""

    file: str
    num_rows: int


@dataclass(frozen=True)
class ActivationManifest:
    """Contents of `activations.json`: what the shards hold.

    Attributes:
        layers: decoder layer indices (non-negative), the L axis of every `acts` tensor.
        k: coordinates per layer (K_act, or the hidden size when no indices were given).
        num_rows: texts in all shards together; `rows` values are 0..num_rows-1.
        dtype: torch dtype name of `acts`, e.g. "float32".
        shards: shard files in write order.
        indices: [L][k] coordinates kept per layer, or None for all of them.
        skip_first: leading tokens left out of pooling.
        max_length: tokens per text.
    """

    layers: list[int]
    k: int
    num_rows: int
    dtype: str
    shards: list[ShardInfo]
    indices: list[list[int]] | None = None
    skip_first: int = 0
    max_length: int = 0
    format: str = field(default=FORMAT)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> ActivationManifest:
        shards = [ShardInfo(**s) for s in raw["shards"]]
        return cls(**{**raw, "shards": shards})

    @classmethod
    def read(cls, out_dir: Path) -> ActivationManifest:
        """Load `out_dir/activations.json`.

        Raises:
            ActivationError: no manifest (never written, or the writing run was interrupted).
        """
        path = out_dir / MANIFEST
        if not path.is_file():
            raise ActivationError(
                f"{path} does not exist: {out_dir} is not a complete activation directory "
                "(an interrupted run leaves no manifest); run write_activation_shards again"
            )
        return cls.from_dict(json.loads(path.read_text(encoding="utf-8")))


def _check_indices(indices: Tensor, num_layers: int, width: int) -> Tensor:
    if indices.ndim != 2 or indices.shape[0] != num_layers:
        raise ActivationError(
            f"indices must be [L, k] with one row per requested layer (L={num_layers}), "
            f"got {tuple(indices.shape)}"
        )
    if indices.numel() and (int(indices.min()) < 0 or int(indices.max()) >= width):
        raise ActivationError(f"indices must lie in 0..{width - 1} (the hidden size), got values outside")
    return indices.long()


def _pool_batch(
    arch: DecoderArch, layers: list[int], batch: TextBatch, skip_first: int, indices: Tensor | None
) -> Tensor:
    """[B, L, k] pooled activations of one batch (already on the model's device), one early-stopped pass."""
    pmask = pooling_mask(batch.attention_mask, skip_first)
    with torch.inference_mode(), capture_layers(arch, layers) as cap:
        pooled = cap.run(
            lambda: arch.backbone(
                input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False
            ),
            reduce=lambda h: masked_mean(h, pmask),
        )
        acts = torch.stack(pooled, dim=1)  # [B, L, d]
        if indices is not None:
            acts = torch.gather(acts, 2, indices.expand(acts.shape[0], -1, -1))
        acts = acts.float().cpu()
    # A normal tensor, not an inference tensor: callers may modify it in place.
    return acts.clone()


def extract_pooled(
    model: PreTrainedModel,
    batches: Iterable[TextBatch],
    layers: Sequence[int],
    *,
    skip_first: int,
    indices: Tensor | None = None,
    progress: Progress = no_progress,
) -> Iterator[tuple[Tensor, Tensor]]:
    """Pooled activations a(l)(x), or a~(l)(x) = a(l)(x)[I(l)] (eq. 11), for every batch.

    Hooks and inference mode are entered per batch and left before each yield, so the caller's code
    between batches runs with neither in place.

    Args:
        model: a Llama/Qwen-style causal LM.
        batches: texts (e.g. from `batching.iter_text_batches`).
        layers: decoder layers (negative counts from the end).
        skip_first: leading tokens left out of pooling.
        indices: [L, k] coordinates to keep per layer (rows in the order of `layers`), or None for all d.
        progress: called as progress(texts_done, texts_total) after each batch (total 0 if unknown).

    Yields:
        (rows [B] long, acts [B, L, k or d] float32 on the CPU), in batch order.
    """
    arch = resolve_arch(model)
    resolved = resolve_layers(layers, arch.num_layers)
    device = next(model.parameters()).device
    if indices is not None:
        indices = _check_indices(indices, len(resolved), arch.hidden_size).to(device)
    total = sum(len(b) for b in batches) if isinstance(batches, Sequence) else 0
    # The checks above run at call time; the batches are only embedded as the caller iterates.
    return _iter_pooled(arch, resolved, batches, skip_first, indices, device, progress, total)


def _iter_pooled(
    arch: DecoderArch,
    layers: list[int],
    batches: Iterable[TextBatch],
    skip_first: int,
    indices: Tensor | None,
    device: torch.device,
    progress: Progress,
    total: int,
) -> Iterator[tuple[Tensor, Tensor]]:
    done = 0
    for batch in batches:
        acts = _pool_batch(arch, layers, batch.to(device), skip_first, indices)
        done += len(batch)
        progress(done, total)
        yield batch.rows, acts


class _ShardWriter:
    """Buffers (rows, acts) and writes exactly `shard_size` rows per shard file."""

    def __init__(self, out_dir: Path, shard_size: int, dtype: torch.dtype) -> None:
        self.out_dir, self.shard_size, self.dtype = out_dir, shard_size, dtype
        self.rows: list[Tensor] = []
        self.acts: list[Tensor] = []
        self.buffered = 0
        self.shards: list[ShardInfo] = []

    def add(self, rows: Tensor, acts: Tensor) -> None:
        self.rows.append(rows)
        self.acts.append(acts.to(self.dtype))
        self.buffered += len(rows)
        while self.buffered >= self.shard_size:
            self._write(self.shard_size)

    def close(self) -> list[ShardInfo]:
        if self.buffered:
            self._write(self.buffered)
        return self.shards

    def _write(self, n: int) -> None:
        rows, acts = torch.cat(self.rows), torch.cat(self.acts)
        name = f"shard-{len(self.shards):05d}.safetensors"
        save_file({"acts": acts[:n].contiguous(), "rows": rows[:n].contiguous()}, str(self.out_dir / name))
        self.shards.append(ShardInfo(name, n))
        self.rows, self.acts = [rows[n:]], [acts[n:]]
        self.buffered -= n


def write_activation_shards(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    texts: Sequence[str],
    layers: Sequence[int],
    out_dir: Path,
    *,
    indices: Tensor | None,
    max_length: int,
    batch_size: int,
    skip_first: int,
    shard_size: int,
    dtype: torch.dtype = torch.float32,
    progress: Progress = no_progress,
) -> ActivationManifest:
    """Embed `texts` and write `shard-NNNNN.safetensors` files (`acts` [n, L, k], `rows` [n]) plus
    `activations.json`.

    At most `shard_size` texts are held in memory. The manifest is written last; a previous manifest in
    `out_dir` is removed first, so an interrupted run never leaves a directory that looks complete.

    Args:
        texts: the corpus; `rows` in the shards index this sequence.
        indices: [L, k] coordinates per layer (e.g. `LayerSaliency.indices`), or None for all d.
        dtype: storage dtype of `acts`.
        (model, layers, skip_first, progress as in `extract_pooled`; max_length, batch_size as in
        `batching.iter_text_batches`)

    Returns:
        The manifest that was written.

    Raises:
        ActivationError: no texts, or shard_size < 1.
    """
    if not texts:
        raise ActivationError("no texts to embed; the corpus is empty")
    if shard_size < 1:
        raise ActivationError(f"shard_size={shard_size} must be >= 1")
    resolved = resolve_layers(layers, resolve_arch(model).num_layers)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / MANIFEST).unlink(missing_ok=True)
    batches = iter_text_batches(tokenizer, texts, max_length=max_length, batch_size=batch_size)
    writer = _ShardWriter(out_dir, shard_size, dtype)
    width = 0
    for rows, acts in extract_pooled(model, batches, resolved, skip_first=skip_first, indices=indices):
        writer.add(rows, acts)
        width = acts.shape[-1]
        progress(writer.buffered + sum(s.num_rows for s in writer.shards), len(texts))
    shards = writer.close()
    _remove_stale_shards(out_dir, {s.file for s in shards})
    manifest = ActivationManifest(
        layers=resolved,
        k=width,
        num_rows=len(texts),
        dtype=str(dtype).removeprefix("torch."),
        shards=shards,
        indices=None if indices is None else indices.tolist(),
        skip_first=skip_first,
        max_length=max_length,
    )
    (out_dir / MANIFEST).write_text(json.dumps(manifest.to_dict(), indent=1), encoding="utf-8")
    return manifest


def _remove_stale_shards(out_dir: Path, keep: set[str]) -> None:
    # Leftovers from an earlier, larger run in the same directory would otherwise sit next to ours.
    for path in out_dir.glob("shard-*.safetensors"):
        if path.name not in keep:
            path.unlink()


def iter_shards(out_dir: Path) -> Iterator[tuple[Tensor, Tensor]]:
    """(rows [n] long, acts [n, L, k]) of each shard of a complete activation directory, in write order."""
    manifest = ActivationManifest.read(out_dir)
    for shard in manifest.shards:
        path = out_dir / shard.file
        if not path.is_file():
            raise ActivationError(
                f"{path} is listed in {MANIFEST} but missing; re-run write_activation_shards"
            )
        tensors = load_file(str(path))
        yield tensors["rows"], tensors["acts"]


def load_activations(dirs: Path | Sequence[Path], positions: Sequence[int] | None = None) -> Tensor:
    """All activations of one directory, or of several concatenated in order (the shards of a corpus).

    Args:
        dirs: a complete activation directory, or a sequence of them embedding consecutive slices of
            one text list (same layers and width).
        positions: indices into the L axis to load (e.g. `[3]` for one layer's SAE); None: all. Only
            those slices are read from disk.

    Returns:
        [N, L', k] in the stored dtype; row i belongs to texts[i] of the concatenated text lists.

    Raises:
        ActivationError: missing manifest or shard, directories that disagree on layers or width, or
            shards that do not cover every text exactly once.
    """
    paths = [Path(dirs)] if isinstance(dirs, str | Path) else [Path(d) for d in dirs]
    if not paths:
        raise ActivationError("no activation directories given; embed the texts first")
    manifests = [ActivationManifest.read(p) for p in paths]
    first = manifests[0]
    for path, m in zip(paths[1:], manifests[1:], strict=True):
        if (m.layers, m.k, m.dtype) != (first.layers, first.k, first.dtype):
            raise ActivationError(
                f"{path} holds layers {m.layers} x {m.k} ({m.dtype}), "
                f"{paths[0]} holds {first.layers} x {first.k} "
                f"({first.dtype}); the shards of one corpus must come from the same settings, re-run them"
            )
    picked = list(range(len(first.layers))) if positions is None else list(positions)
    if any(not 0 <= i < len(first.layers) for i in picked):
        raise ActivationError(f"positions {picked} out of range for {len(first.layers)} layers")
    total = sum(m.num_rows for m in manifests)
    out = torch.empty(total, len(picked), first.k, dtype=getattr(torch, first.dtype))
    seen = torch.zeros(total, dtype=torch.long)
    offset = 0
    for path, manifest in zip(paths, manifests, strict=True):
        for rows, acts in _iter_shard_slices(path, manifest, None if positions is None else picked):
            out[rows + offset] = acts
            seen.index_add_(0, rows + offset, torch.ones_like(rows))
        offset += manifest.num_rows
    if not bool((seen == 1).all()):
        where = paths[0] if len(paths) == 1 else f"{len(paths)} directories from {paths[0]}"
        raise ActivationError(f"{where}: shards do not cover each of the {total} texts exactly once; re-run")
    return out


def _iter_shard_slices(
    out_dir: Path, manifest: ActivationManifest, positions: list[int] | None
) -> Iterator[tuple[Tensor, Tensor]]:
    """(rows, acts) of each shard, acts restricted to `positions` of the L axis (None: all) when read."""
    for shard in manifest.shards:
        path = out_dir / shard.file
        if not path.is_file():
            raise ActivationError(
                f"{path} is listed in {MANIFEST} but missing; re-run write_activation_shards"
            )
        with safe_open(str(path), framework="pt") as f:
            rows = f.get_tensor("rows")
            if positions is None:
                acts = f.get_tensor("acts")
            else:
                sliced = f.get_slice("acts")
                # One contiguous range per requested position: reads only those layers' bytes.
                acts = torch.stack([sliced[:, i : i + 1, :][:, 0] for i in positions], dim=1)
        yield rows, acts


def num_rows(dirs: Path | Sequence[Path]) -> int:
    """Texts in one activation directory, or in several together (from their manifests, nothing loaded)."""
    paths = [Path(dirs)] if isinstance(dirs, str | Path) else [Path(d) for d in dirs]
    return sum(ActivationManifest.read(p).num_rows for p in paths)


def load_activation_rows(
    dirs: Sequence[Path], rows: Sequence[int], positions: Sequence[int] | None = None
) -> Tensor:
    """The activations of some rows of consecutive directories ([len(rows), L', k], in the given order),
    reading one directory at a time: memory is the result plus one directory.

    Args:
        dirs: activation directories of consecutive slices of one text list, as in `load_activations`.
        rows: rows of the concatenated text list.
        positions: layer positions to read, as in `load_activations`.
    """
    want = torch.as_tensor(list(rows), dtype=torch.long)
    total = num_rows(dirs)
    if want.numel() == 0 or int(want.min()) < 0 or int(want.max()) >= total:
        raise ActivationError(
            f"rows must be a non-empty selection of 0..{total - 1} "
            f"(the texts of {len(dirs)} activation directories)"
        )
    out: Tensor | None = None
    start = 0
    for d in dirs:
        n = ActivationManifest.read(Path(d)).num_rows
        hit = torch.nonzero((want >= start) & (want < start + n)).flatten()
        if hit.numel():
            part = load_activations(d, positions)
            if out is None:
                out = torch.empty(len(want), *part.shape[1:], dtype=part.dtype)
            out[hit] = part[want[hit] - start]
        start += n
    assert out is not None
    return out
