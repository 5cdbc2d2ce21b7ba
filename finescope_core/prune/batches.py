"""The pruning texts as right-padded causal-LM batches, for the importance pass."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from torch import Tensor
from transformers import PreTrainedTokenizerBase

from finescope_core.prune.errors import PruneError


@dataclass(frozen=True, eq=False)
class LMBatches:
    """Batches tokenised lazily, one at a time, with a length, so importance can report done of total.

    Iterating yields dicts with `input_ids`, `attention_mask`, `labels` ([B, T]); labels are the input
    ids with padding set to -100 so the loss ignores it.
    """

    tokenizer: PreTrainedTokenizerBase
    texts: tuple[str, ...]
    max_length: int
    batch_size: int

    def __len__(self) -> int:
        return -(-len(self.texts) // self.batch_size)

    def __iter__(self) -> Iterator[dict[str, Tensor]]:
        for start in range(0, len(self.texts), self.batch_size):
            enc = self.tokenizer(
                list(self.texts[start : start + self.batch_size]),
                padding=True,
                truncation=True,
                max_length=self.max_length,
                padding_side="right",
                return_tensors="pt",
            )
            ids, mask = enc["input_ids"], enc["attention_mask"]
            yield {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}


def lm_batches(
    tokenizer: PreTrainedTokenizerBase, texts: Sequence[str], *, max_length: int, batch_size: int
) -> LMBatches:
    """Tokenise texts into right-padded causal-LM batches.

    Args:
        tokenizer: must have a pad token.
        texts: pruning texts, in order (longer ones are truncated to `max_length` tokens).
        max_length: tokens per text.
        batch_size: texts per batch.

    Returns:
        The batches (see `LMBatches`), checked now and tokenised as they are iterated.

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
    return LMBatches(tokenizer, tuple(texts), max_length, batch_size)
