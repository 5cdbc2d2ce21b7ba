"""What each curation method retrieves with: per layer, the (corpus, seeds) embeddings of `sae` (SAE codes),
`activation` (z-scored pooled activations) or `sentence` (MiniLM), in memory or read shard by shard."""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

import numpy as np
import torch

from finescope_core import activations, sae
from finescope_core.curate.layers import CurationError
from finescope_core.data import RecordSet
from finescope_core.progress import Progress, no_progress
from finescope_core.retrieval.stream import Block, EmbeddingSource, gather_from_blocks

Embeddings = Mapping[int, np.ndarray] | EmbeddingSource
"""A corpus's embeddings per layer: in memory ({layer: [N, d]}) or read block by block (a source)."""


def sae_codes(
    corpus_acts: Path | Sequence[Path], seed_acts: Path | Sequence[Path], sae_dir: Path
) -> tuple[dict[int, np.ndarray], dict[int, np.ndarray]]:
    """SAE codes per layer for corpus and seeds: ({layer: [N,d_sae]}, {layer: [S,d_sae]})."""
    model, layers, _ = sae.load_saes(sae_dir)
    corpus = sae.encode(model, activations.load_activations(corpus_acts))
    seeds = sae.encode(model, activations.load_activations(seed_acts))
    return split_layers(corpus, layers), split_layers(seeds, layers)


def raw_activation_embeddings(
    corpus_acts: Path | Sequence[Path], seed_acts: Path | Sequence[Path], layers: list[int]
) -> tuple[dict[int, np.ndarray], dict[int, np.ndarray]]:
    """Pooled activations z-scored per coordinate with corpus statistics (the `activation` baseline)."""
    corpus = activations.load_activations(corpus_acts).float()
    seeds = activations.load_activations(seed_acts).float()
    mean, std = corpus.mean(0, keepdim=True), corpus.std(0, keepdim=True).clamp_min(1e-6)
    return split_layers((corpus - mean) / std, layers), split_layers((seeds - mean) / std, layers)


class ZScoredActivations:
    """The `activation` baseline's corpus side as an `EmbeddingSource`: each activation directory (one
    corpus shard) a block, z-scored per coordinate with the corpus mean and standard deviation (one
    pass over the shards when built, float64 sums)."""

    def __init__(self, dirs: Sequence[Path], layers: Sequence[int]):
        self.dirs, self._layers = [Path(d) for d in dirs], list(layers)
        if not self.dirs:
            raise CurationError("no corpus activation directories given; run the activations stage first")
        total: torch.Tensor | None = None
        squares: torch.Tensor | None = None
        self._sizes = []
        for d in self.dirs:
            x = activations.load_activations(d).double()
            total = x.sum(0) if total is None else total + x.sum(0)
            squares = (x * x).sum(0) if squares is None else squares + (x * x).sum(0)
            self._sizes.append(x.shape[0])
        assert total is not None and squares is not None
        n = sum(self._sizes)
        mean = total / n
        var = ((squares - n * mean * mean) / max(1, n - 1)).clamp_min(0)
        self.mean, self.std = mean.float()[None], var.sqrt().float().clamp_min(1e-6)[None]

    @property
    def layers(self) -> list[int]:
        return self._layers

    @property
    def num_rows(self) -> int:
        return sum(self._sizes)

    def scaled(self, x: torch.Tensor) -> dict[int, np.ndarray]:
        """Activations [n, L, k] z-scored with the corpus statistics, per layer."""
        return split_layers((x.float() - self.mean) / self.std, self._layers)

    def blocks(self) -> Iterator[Block]:
        start = 0
        for d, n in zip(self.dirs, self._sizes, strict=True):
            yield Block(start, self.scaled(activations.load_activations(d)))
            start += n

    def gather(self, rows: Sequence[int]) -> dict[int, np.ndarray]:
        return gather_from_blocks(self.blocks(), rows)


def split_layers(x: torch.Tensor, layers: Sequence[int]) -> dict[int, np.ndarray]:
    return {layer: x[:, i].contiguous().float().numpy() for i, layer in enumerate(layers)}


def method_embeddings(
    method: str,
    corpus: RecordSet,
    seeds: RecordSet,
    *,
    activations: tuple[Sequence[Path], Sequence[Path]] | None = None,
    layers: Sequence[int] = (),
    sae_dir: Path | None = None,
    sentence_corpus: np.ndarray | None = None,
    device: str = "cpu",
    progress: Progress = no_progress,
) -> tuple[dict[int, np.ndarray] | None, dict[int, np.ndarray] | None]:
    """What each method retrieves with, per layer: (corpus, seeds) embeddings (None, None for `random`).

    `sentence` embeds the texts (one pseudo-layer, -1), the corpus's only when `sentence_corpus`
    (its cached embeddings, `sentence.read_corpus_embeddings`) is not given; `activation` reads the
    pooled activations at the saliency-selected coordinates; `sae` encodes them with each layer's SAE.
    """
    if method == "random":
        return None, None
    if method == "sentence":
        from finescope_core.sentence import sentence_embeddings

        if sentence_corpus is not None and sentence_corpus.shape[0] != len(corpus):
            raise CurationError(
                f"the cached sentence embeddings have {sentence_corpus.shape[0]} rows "
                f"for a corpus of {len(corpus)}"
            )
        corpus_emb = (
            sentence_corpus
            if sentence_corpus is not None
            else sentence_embeddings(corpus.texts, device=device, progress=progress)
        )
        return {-1: corpus_emb}, {-1: sentence_embeddings(seeds.texts, device=device)}
    if activations is None:
        raise CurationError(
            f"curate.method {method!r} needs the corpus and seed activations; run their stages first"
        )
    corpus_dirs, seed_dirs = activations
    if method == "activation":
        return raw_activation_embeddings(corpus_dirs, seed_dirs, list(layers))
    if sae_dir is None:
        raise CurationError("curate.method 'sae' needs the trained SAEs; run the sae stage first")
    return sae_codes(corpus_dirs, seed_dirs, sae_dir)


def streamed_embeddings(
    method: str,
    corpus_acts: Sequence[Path],
    seed_acts: Sequence[Path],
    layers: Sequence[int],
    *,
    sae_dir: Path | None = None,
    code_dirs: Sequence[Path] | None = None,
) -> tuple[EmbeddingSource, dict[int, np.ndarray]]:
    """The corpus side of `sae` or `activation` as a source read shard by shard, and the seeds' embeddings.

    `sae` reads the corpus's stored sparse codes (`code_dirs`, the `sae-codes` stage) and encodes the
    seeds' activations with the SAEs of `sae_dir`; `activation` z-scores each corpus shard with the
    corpus statistics. Equal to `method_embeddings` (up to the stored codes' precision and `code_k`).
    """
    if method == "activation":
        source = ZScoredActivations(corpus_acts, layers)
        return source, source.scaled(activations.load_activations(seed_acts))
    if method != "sae":
        raise CurationError(f"curate.method {method!r} is not read from shards; use method_embeddings")
    if sae_dir is None or code_dirs is None:
        raise CurationError(
            "curate.method 'sae' needs the trained SAEs and the corpus codes; "
            "run the sae and sae-codes stages first"
        )
    from finescope_core.sae.codes import SparseCodeSource

    model, sae_layers, _ = sae.load_saes(sae_dir)
    codes = SparseCodeSource(code_dirs)
    if codes.layers != list(sae_layers):
        raise CurationError(
            f"the stored codes are of layers {codes.layers}, the SAEs of {sae_layers}; "
            "re-run the sae-codes stage"
        )
    return codes, split_layers(sae.encode(model, activations.load_activations(seed_acts)), sae_layers)
