"""Sparse SAE codes on disk: each record's largest nonzero latents per layer, written and read shard by shard.

A code directory encodes one activation directory (one corpus shard). Its file `codes-00000.safetensors`
holds, for its n records (in row order) and L layers, the codes in CSR over (record, layer): `values`
and `indices` [nnz] (the stored latents of each code) and `indptr` [n * L + 1], plus `rows` [n]
(0..n-1). `codes.json`, written last, marks a complete directory and says how many codes had more
nonzeros than `code_k` (truncated: their smallest latents were dropped).

By default (`code_k=None`, config `curate.code_k: all`) every nonzero latent is kept, so the stored
codes are the codes and storage follows the SAEs' L0 (a TopK SAE: k latents; 8 layers x 32 x (2 + 2
bytes) = 1 KB a record, plus 8 bytes of `indptr` per layer). A number keeps each code's largest that
many, which bounds the storage of ReLU codes at some cost in retrieval. Values are float16 by default
(float32 on request).
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor

from finescope_core.activations import load_activations
from finescope_core.config import CurateConfig
from finescope_core.progress import Progress, no_progress
from finescope_core.retrieval.stream import Block, gather_from_blocks
from finescope_core.sae.io import load_saes
from finescope_core.sae.model import BatchedSAE, SAEInputError, encode
from finescope_core.stage import StageContext

MANIFEST = "codes.json"
FORMAT = "finescope-sae-codes/1"
CODES_FILE = "codes-00000.safetensors"
"""The one file of codes a code directory holds (the manifest lists it)."""
VALUE_DTYPES = {"float16": torch.float16, "float32": torch.float32}


class CodesError(ValueError):
    """A code directory that is missing, incomplete or does not match what reads it."""


@dataclass(frozen=True)
class CodesManifest:
    """Contents of `codes.json`.

    Attributes:
        layers: the model layer of each position of the L axis.
        d_sae: latents per layer (indices lie in 0..d_sae-1).
        code_k: most latents stored per record and layer (d_sae when every nonzero is kept).
        num_rows: records in all shards; `rows` values are 0..num_rows-1.
        value_dtype: "float16" or "float32".
        shards: (file, rows) per shard, in row order.
        truncated: (record, layer) codes that had more than code_k nonzeros.
        mean_l0: mean nonzeros per code before truncation.
    """

    layers: list[int]
    d_sae: int
    code_k: int
    num_rows: int
    value_dtype: str
    shards: list[tuple[str, int]]
    truncated: int = 0
    mean_l0: float = 0.0
    format: str = field(default=FORMAT)

    @classmethod
    def read(cls, out_dir: Path) -> CodesManifest:
        path = out_dir / MANIFEST
        if not path.is_file():
            raise CodesError(
                f"{path} does not exist: {out_dir} is not a complete code directory; "
                "re-run the sae-codes stage"
            )
        raw = json.loads(path.read_text(encoding="utf-8"))
        return cls(**{**raw, "shards": [tuple(s) for s in raw["shards"]]})


def top_nonzeros(codes: Tensor, k: int) -> tuple[Tensor, Tensor, Tensor]:
    """The k largest latents of each code: (values [..., k], indices [..., k] int, nonzeros [...] of
    each code).

    Codes are non-negative (ReLU / TopK); slots beyond a code's nonzeros hold value 0 at index 0.
    """
    k = min(k, codes.shape[-1])
    values, indices = torch.topk(codes, k, dim=-1, sorted=True)
    nonzero = (codes > 0).sum(dim=-1)
    empty = values <= 0
    return values.masked_fill(empty, 0.0), indices.masked_fill(empty, 0), nonzero


def write_codes(
    sae: BatchedSAE,
    acts_dir: Path,
    layers: Sequence[int],
    out_dir: Path,
    *,
    code_k: int | None,
    value_dtype: str = "float16",
    chunk: int = 1024,
    progress: Progress = no_progress,
) -> CodesManifest:
    """Encode the activations of one directory (a corpus shard) with `sae`; write its codes in row order.

    The activations of one directory (at most `curate.shard_size` records) are read at once and
    encoded `chunk` records at a time, so no dense [n, L, d_sae] matrix is held beyond one chunk. The
    manifest is written last.

    Args:
        code_k: latents kept per record and layer (each code's largest); None: every nonzero one (the
            codes are stored exactly).

    Raises:
        CodesError: an unknown value dtype, code_k < 1, or activations that do not fit the SAEs.
    """
    if value_dtype not in VALUE_DTYPES:
        raise CodesError(f"value dtype {value_dtype!r} is not one of {sorted(VALUE_DTYPES)}")
    if code_k is not None and code_k < 1:
        raise CodesError(f"code_k={code_k} must be >= 1 (or None for every nonzero latent)")
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / MANIFEST).unlink(missing_ok=True)
    acts = load_activations(acts_dir)
    index_dtype = torch.int16 if sae.d_sae <= 2**15 else torch.int32
    values, indices, counts = [], [], []
    truncated, l0_sum = 0, 0.0
    for start in range(0, acts.shape[0], chunk):
        try:
            codes = encode(sae, acts[start : start + chunk])
        except SAEInputError as e:
            raise CodesError(f"{acts_dir}: {e}") from None
        nonzero = (codes > 0).sum(dim=-1)  # [c, L]
        truncated += 0 if code_k is None else int((nonzero > code_k).sum())
        l0_sum += float(nonzero.sum())
        if code_k is None:  # every nonzero latent, in latent order
            kept, latent = codes, torch.arange(codes.shape[-1]).expand_as(codes)
        else:  # each code's largest code_k, largest first
            kept, latent = top_nonzeros(codes, code_k)[:2]
        mask = kept > 0  # row-major over (record, layer, slot): the CSR order
        values.append(kept[mask].to(VALUE_DTYPES[value_dtype]))
        indices.append(latent[mask].to(index_dtype))
        counts.append(mask.sum(dim=-1).flatten())
        progress(min(start + chunk, acts.shape[0]), acts.shape[0])
    n = acts.shape[0]
    indptr = torch.zeros(n * len(layers) + 1, dtype=torch.int64)
    torch.cumsum(torch.cat(counts), 0, out=indptr[1:])
    name = CODES_FILE
    save_file(
        {
            "values": torch.cat(values).contiguous(),
            "indices": torch.cat(indices).contiguous(),
            "indptr": indptr,
            "rows": torch.arange(n),
        },
        str(out_dir / name),
    )
    manifest = CodesManifest(
        layers=list(layers),
        d_sae=sae.d_sae,
        code_k=code_k or sae.d_sae,
        num_rows=n,
        value_dtype=value_dtype,
        shards=[(name, n)],
        truncated=truncated,
        mean_l0=l0_sum / max(1, n * len(layers)),
    )
    (out_dir / MANIFEST).write_text(json.dumps(asdict(manifest), indent=1), encoding="utf-8")
    return manifest


@dataclass(frozen=True)
class CodesInputs:
    """What one `sae-codes` shard reads: one corpus activation shard and the SAEs, as local directories."""

    shard_dir: Path
    """The corpus activation shard (an `activation-shards` artifact) to encode."""
    sae_dir: Path
    """The `sae` artifact: every hooked layer's SAE."""


def run(
    inputs: CodesInputs,
    section: CurateConfig,
    ctx: StageContext,
    work_dir: Path,
    progress: Progress = no_progress,
) -> dict[str, Any]:
    """One `sae-codes` shard's entry: the shard's codes under every layer's SAE (`write_codes`), with
    `section.code_k` latents kept per code (every nonzero one for `all`) as `section.code_dtype`."""
    model, layers, _ = load_saes(inputs.sae_dir)
    model.to(ctx.device)  # encoding runs where the SAEs are; the codes come back to the CPU
    code_k = None if section.code_k == "all" else section.code_k
    manifest = write_codes(
        model,
        inputs.shard_dir,
        layers,
        work_dir,
        code_k=code_k,
        value_dtype=section.code_dtype,
        progress=progress,
    )
    return {"rows": manifest.num_rows, "truncated": manifest.truncated, "mean_l0": round(manifest.mean_l0, 2)}


@dataclass(frozen=True)
class CodeShard:
    """One code shard as read: record rows [n] and its codes in CSR over (record, layer): the entries
    of record r in layer position p are `values/indices[indptr[r * L + p] : indptr[r * L + p + 1]]`."""

    rows: np.ndarray
    values: np.ndarray
    indices: np.ndarray
    indptr: np.ndarray

    def dense(self, position: int, d_sae: int) -> np.ndarray:
        """[n, d_sae] float32 codes of one layer position (zeros where nothing is stored)."""
        n = self.rows.shape[0]
        layers = (len(self.indptr) - 1) // max(1, n)
        counts = np.diff(self.indptr).reshape(n, layers)
        starts = self.indptr[:-1].reshape(n, layers)[:, position]
        take = counts[:, position]
        rows = np.repeat(np.arange(n), take)
        # Each record's entries of this layer: its start plus 0..count-1.
        entry = np.repeat(starts - np.cumsum(take) + take, take) + np.arange(int(take.sum()))
        out = np.zeros((n, d_sae), dtype=np.float32)
        out[rows, self.indices[entry].astype(np.int64)] = self.values[entry].astype(np.float32)
        return out


def _read_shard(path: Path) -> CodeShard:
    if not path.is_file():
        raise CodesError(f"{path} is listed in {MANIFEST} but missing; re-run the sae-codes stage")
    with safe_open(str(path), framework="np") as f:
        return CodeShard(
            rows=f.get_tensor("rows"),
            values=f.get_tensor("values"),
            indices=f.get_tensor("indices"),
            indptr=f.get_tensor("indptr"),
        )


class SparseCodeSource:
    """The codes of consecutive code directories (one per corpus activation shard) as an `EmbeddingSource`.

    Blocks are the code shards, decoded to dense [n, d_sae] one shard at a time.
    """

    def __init__(self, dirs: Sequence[Path]):
        if not dirs:
            raise CodesError("no code directories given; run the sae-codes stage first")
        self.dirs = [Path(d) for d in dirs]
        self.manifests = [CodesManifest.read(d) for d in self.dirs]
        first = self.manifests[0]
        for d, m in zip(self.dirs, self.manifests, strict=True):
            if (m.layers, m.d_sae) != (first.layers, first.d_sae):
                raise CodesError(
                    f"{d} holds codes of layers {m.layers} x {m.d_sae}, {self.dirs[0]} of "
                    f"{first.layers} x {first.d_sae}; the shards of one corpus must share their SAEs"
                )
        self._offsets = np.cumsum([0] + [m.num_rows for m in self.manifests])

    @property
    def layers(self) -> list[int]:
        return list(self.manifests[0].layers)

    @property
    def num_rows(self) -> int:
        return int(self._offsets[-1])

    @property
    def d_sae(self) -> int:
        return self.manifests[0].d_sae

    def shards(self) -> Iterator[tuple[int, CodeShard]]:
        """(first corpus row, shard) of every shard, in row order; rows are checked to be consecutive."""
        start = 0
        for d, m in zip(self.dirs, self.manifests, strict=True):
            local = 0
            for file, n in m.shards:
                shard = _read_shard(d / file)
                if shard.rows.shape != (n,) or not np.array_equal(shard.rows, np.arange(local, local + n)):
                    raise CodesError(
                        f"{d / file}: rows are not the consecutive rows its manifest says; "
                        "re-run the sae-codes stage"
                    )
                yield start, shard
                start, local = start + n, local + n

    def blocks(self) -> Iterator[Block]:
        for start, shard in self.shards():
            yield Block(start, {layer: shard.dense(i, self.d_sae) for i, layer in enumerate(self.layers)})

    def gather(self, rows: Sequence[int]) -> dict[int, np.ndarray]:
        return gather_from_blocks(self.blocks(), rows)

    def info(self) -> dict[str, Any]:
        """What the curation summary records about the codes."""
        cells = self.num_rows * len(self.layers)
        truncated = sum(m.truncated for m in self.manifests)
        l0 = sum(m.mean_l0 * m.num_rows for m in self.manifests) / max(1, self.num_rows)
        return {
            "code_k": self.manifests[0].code_k,
            "value_dtype": self.manifests[0].value_dtype,
            "mean_l0": round(l0, 2),
            "truncated_fraction": round(truncated / max(1, cells), 4),
        }


def dense_layer(dirs: Sequence[Path], position: int) -> np.ndarray:
    """[N, d_sae] codes of one layer position over all `dirs` (seeds, and the dense baseline of the
    benchmark)."""
    source = SparseCodeSource(dirs)
    return np.concatenate([shard.dense(position, source.d_sae) for _, shard in source.shards()])
