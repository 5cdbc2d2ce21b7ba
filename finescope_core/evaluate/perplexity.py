"""Domain perplexity: token-level over all held-out texts together."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedTokenizerBase

from finescope_core.batching import iter_text_batches
from finescope_core.evaluate.errors import EvalError
from finescope_core.evaluate.inference import DEFAULT_BATCH_SIZE, eval_mode, model_device
from finescope_core.progress import Progress, no_progress


def perplexity(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    texts: Sequence[str],
    *,
    max_length: int,
    batch_size: int = DEFAULT_BATCH_SIZE,
    progress: Progress = no_progress,
) -> float:
    """Token-level perplexity exp(sum of NLL / predicted tokens) over all texts together.

    Every token after the first of each text is predicted; padding is excluded, so the result does not
    depend on the batch size. Texts are truncated to `max_length` tokens.

    Args:
        model: a causal LM returning `.logits` [B, T, V].
        tokenizer: with a pad token (`finescope_core.model.prepare_tokenizer`).
        texts: held-out domain texts.
        max_length: tokens per text (>= 2).
        batch_size: texts per forward pass (length-sorted batches).
        progress: called as progress(texts_done, texts_total).

    Raises:
        EvalError: no texts, max_length < 2, or no text longer than one token.
    """
    if not texts:
        raise EvalError("no texts to compute perplexity on; pass at least one held-out domain text")
    if max_length < 2:
        raise EvalError(f"max_length={max_length}: perplexity needs at least 2 tokens per text")
    nll, tokens = _summed_nll(model, tokenizer, texts, max_length, batch_size, progress)
    if tokens == 0:
        raise EvalError("every text is a single token, so no token is predicted; pass longer held-out texts")
    return math.exp(nll / tokens)


def _summed_nll(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    texts: Sequence[str],
    max_length: int,
    batch_size: int,
    progress: Progress,
) -> tuple[float, int]:
    """(summed NLL, predicted tokens) over all texts: summed, so batches weigh by their tokens."""
    device = model_device(model)
    total, tokens, done = 0.0, 0, 0
    with eval_mode(model):
        for batch in iter_text_batches(tokenizer, texts, max_length=max_length, batch_size=batch_size):
            ids, mask = batch.input_ids.to(device), batch.attention_mask.to(device)
            logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
            # Right padding: a real target always has a real token before it.
            predicted = mask[:, 1:].bool()
            nll = F.cross_entropy(logits[:, :-1][predicted].float(), ids[:, 1:][predicted], reduction="sum")
            total += float(nll)
            tokens += int(predicted.sum())
            done += len(batch)
            progress(done, len(texts))
    return total, tokens
