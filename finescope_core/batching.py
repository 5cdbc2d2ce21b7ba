"""Tokenised, length-sorted text batches and the pooling mask shared by the saliency and activation stages."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import cast

import torch
from torch import Tensor
from transformers import PreTrainedTokenizerBase


class BatchingError(ValueError):
    """The texts or batching settings cannot be turned into model batches; the message says why."""


@dataclass
class TextBatch:
    """One right-padded batch of tokenised texts.

    Attributes:
        input_ids: [B, T] long token ids, padded with the tokenizer's pad id.
        attention_mask: [B, T] long, 1 at real tokens, 0 at padding.
        rows: [B] long, the position of each text in the list the batch was built from, so callers can
            restore the original order after length sorting.
    """

    input_ids: Tensor
    attention_mask: Tensor
    rows: Tensor

    def to(self, device: torch.device | str) -> TextBatch:
        """Copy of the batch with ids and mask on `device`.

        Rows stay where they are: they index host data."""
        return TextBatch(self.input_ids.to(device), self.attention_mask.to(device), self.rows)

    def __len__(self) -> int:
        return int(self.rows.numel())


def tokenize_texts(
    tokenizer: PreTrainedTokenizerBase, texts: Sequence[str], max_length: int
) -> list[list[int]]:
    """Token ids of every text, truncated to `max_length`, in one batched tokenizer call.

    Raises:
        BatchingError: `max_length` < 1, or a text that yields no tokens (it would pool to nothing).
    """
    if max_length < 1:
        raise BatchingError(f"max_length={max_length} must be >= 1")
    if not texts:
        return []
    encoded = tokenizer(list(texts), truncation=True, max_length=max_length, padding=False)["input_ids"]
    empty = [i for i, ids in enumerate(encoded) if not ids]
    if empty:
        raise BatchingError(
            f"texts {empty[:5]} (0-based) produce no tokens; drop empty records before embedding them"
        )
    return cast(list[list[int]], encoded)


def iter_text_batches(
    tokenizer: PreTrainedTokenizerBase,
    texts: Sequence[str],
    *,
    max_length: int,
    batch_size: int,
    sort_by_length: bool = True,
) -> Iterator[TextBatch]:
    """Tokenise `texts` once and yield right-padded batches.

    With `sort_by_length`, texts are grouped by token count, longest batch first: padding is minimal
    and peak memory is reached on the first batch, so an out-of-memory error shows up immediately.

    Args:
        tokenizer: a tokenizer with a pad token (`model.prepare_tokenizer` gives it one).
        texts: the texts; `TextBatch.rows` refers to positions in this sequence.
        max_length: tokens kept per text (longer texts are truncated).
        batch_size: texts per batch.
        sort_by_length: group texts of similar length (order restored via `rows`).

    Yields:
        TextBatch with input_ids/attention_mask [B, T] where T is the longest text in the batch.

    Raises:
        BatchingError: bad batch_size/max_length, a missing pad token, or a text without tokens.
    """
    if batch_size < 1:
        raise BatchingError(f"batch_size={batch_size} must be >= 1")
    if tokenizer.pad_token_id is None:
        raise BatchingError(
            "the tokenizer has no pad token; pass it through finescope_core.model.prepare_tokenizer"
        )
    encoded = tokenize_texts(tokenizer, texts, max_length)
    order = list(range(len(encoded)))
    if sort_by_length:
        # Stable sort: equal-length texts keep their input order, so batches are reproducible.
        order.sort(key=lambda i: -len(encoded[i]))
    for start in range(0, len(order), batch_size):
        rows = order[start : start + batch_size]
        yield _pad_right([encoded[i] for i in rows], rows, tokenizer.pad_token_id)


def right_pad(sequences: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids [B,T], attention_mask [B,T]) for token lists padded on the right to the longest."""
    width = max(len(s) for s in sequences)
    input_ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for b, seq in enumerate(sequences):
        input_ids[b, : len(seq)] = torch.tensor(seq, dtype=torch.long)
        attention_mask[b, : len(seq)] = 1
    return input_ids, attention_mask


def _pad_right(sequences: list[list[int]], rows: list[int], pad_id: int) -> TextBatch:
    input_ids, attention_mask = right_pad(sequences, pad_id)
    return TextBatch(input_ids, attention_mask, torch.tensor(rows, dtype=torch.long))


def pooling_mask(attention_mask: Tensor, skip_first: int) -> Tensor:
    """Positions that enter the sequence-level mean: real tokens except the first `skip_first` of each text.

    The first position is the attention sink, where a few "massive activation" coordinates live; left in,
    it dominates the mean (docs/architecture.md, "Pooling"). A text with <= `skip_first` tokens keeps its
    last real token so that no row is empty. The mask is derived from `attention_mask` alone (a running
    count of real tokens), so right and left padding both work.

    Args:
        attention_mask: [B, T], 1 at real tokens, 0 at padding.
        skip_first: leading real tokens to leave out (>= 0).

    Returns:
        [B, T] float mask.
    """
    if skip_first < 0:
        raise BatchingError(f"skip_first={skip_first} must be >= 0")
    real = attention_mask.bool()
    count = real.long().cumsum(dim=1)  # index of each real token among its row's real tokens, from 1
    keep = real & (count > skip_first)
    total = count[:, -1:]
    last_real = real & (count == total)
    short = (total <= skip_first) & (total > 0)
    keep = keep | (last_real & short)
    return keep.float()


def masked_mean(hidden: Tensor, mask: Tensor) -> Tensor:
    """Mean of `hidden` over the positions where `mask` is non-zero.

    Args:
        hidden: [B, T, d].
        mask: [B, T] (bool/int/float); rows must have at least one non-zero entry.

    Returns:
        [B, d] in hidden's dtype.
    """
    weights = mask.to(hidden.dtype)
    counts = weights.sum(dim=1, keepdim=True)
    assert bool((counts > 0).all()), "masked_mean got a row with an empty mask"
    return torch.einsum("btd,bt->bd", hidden, weights) / counts
