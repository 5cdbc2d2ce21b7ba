"""Training examples: (prompt, response) rows tokenised for response-only loss, text rows tokenised for
loss on every token, padded micro-batches, and the seeded held-out split."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from transformers import PreTrainedTokenizerBase

from finescope_core.distilled import is_text_row
from finescope_core.finetune.errors import FinetuneError
from finescope_core.prompts import encode_prompt

IGNORE = -100
"""Label of positions without loss (prompt and padding), as torch's cross entropy expects."""

Example = dict[str, list[int]]


@dataclass
class Examples:
    """Tokenised training examples and what building them cost."""

    examples: list[Example]
    """`input_ids` and `labels` per example (IGNORE on prompt positions), unpadded."""
    dropped: int = 0
    """Rows whose prompt alone fills the cutoff, or text rows of one token (nothing left to learn from)."""
    truncated: int = 0
    """Rows whose response (or text) was cut to fit the cutoff (their EOS is lost)."""


def build_examples(
    tokenizer: PreTrainedTokenizerBase, rows: Sequence[dict[str, Any]], cutoff: int
) -> Examples:
    """Tokenise (prompt, response) rows for response-only loss, and text rows for loss on every token.

    The prompt is formatted as at inference (`teacher.encode_prompt`); the response follows with EOS.
    Prompt and response are tokenised separately because at inference the response tokens are
    generated after the prompt's tokens, never merged across the boundary. A text row
    (`finescope_core.distilled.is_text_row`) is one sequence, as in language-model training
    (`text_example`).

    Args:
        rows: dicts with `prompt` (the user's request) and `response` strings, or text rows.
        cutoff: most tokens per example; the response (or text) tail is cut first.

    Returns:
        Examples with labels IGNORE on every prompt token, plus the dropped / truncated counts.
    """
    if tokenizer.eos_token_id is None:
        raise FinetuneError("the tokenizer has no eos_token; set one so responses can be terminated")
    built = Examples(examples=[])
    for row in rows:
        if is_text_row(row):
            _add_text(built, text_example(tokenizer, row["text"]), cutoff)
            continue
        prompt = encode_prompt(tokenizer, row["prompt"])
        if len(prompt) >= cutoff:
            built.dropped += 1
            continue
        response = list(tokenizer(row["response"], add_special_tokens=False)["input_ids"]) + [
            tokenizer.eos_token_id
        ]
        if len(prompt) + len(response) > cutoff:
            response = response[: cutoff - len(prompt)]
            built.truncated += 1
        built.examples.append({"input_ids": prompt + response, "labels": [IGNORE] * len(prompt) + response})
    return built


def text_example(tokenizer: PreTrainedTokenizerBase, text: str) -> list[int]:
    """A text's token ids as in language-model training: the tokenizer's own special tokens (a BOS
    where it adds one, as raw-text perplexity tokenises), no chat template, then EOS, so the student
    also learns where a domain text ends."""
    ids = list(tokenizer(text)["input_ids"])
    if not ids or ids[-1] != tokenizer.eos_token_id:  # a tokenizer that appends EOS itself gets no second
        ids.append(tokenizer.eos_token_id)
    return ids


def _add_text(built: Examples, ids: list[int], cutoff: int) -> None:
    """A text example whose every real token is a label (the first predicts nothing, as ever), cut at
    the cutoff; one of a single token has nothing to learn from."""
    if len(ids) > cutoff:
        ids = ids[:cutoff]
        built.truncated += 1
    if len(ids) < 2:
        built.dropped += 1
        return
    built.examples.append({"input_ids": ids, "labels": list(ids)})


def pad_batch(examples: Sequence[Example], pad_id: int) -> dict[str, Tensor]:
    """Right-pad a micro-batch to its longest example.

    Returns:
        input_ids, attention_mask and labels, each [batch, longest]; labels are IGNORE on padding.
    """
    width = max(len(e["input_ids"]) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for i, e in enumerate(examples):
        n = len(e["input_ids"])
        ids[i, :n] = torch.tensor(e["input_ids"])
        labels[i, :n] = torch.tensor(e["labels"])
        mask[i, :n] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def split_indices(n: int, fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Seeded (train, held-out) index split; at least one example on each side when fraction > 0 and n > 1."""
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    n_eval = round(fraction * n)
    if fraction > 0 and n > 1:
        n_eval = min(max(n_eval, 1), n - 1)
    return sorted(order[n_eval:]), sorted(order[:n_eval])
