"""Domain perplexity: token-level over all held-out texts together."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch.nn.functional as F
from torch import Tensor, nn
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


def text_nll(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    texts: Sequence[str],
    *,
    max_length: int,
    batch_size: int = DEFAULT_BATCH_SIZE,
    progress: Progress = no_progress,
) -> tuple[list[float], list[int]]:
    """Per text: summed NLL of every token after the first, and the number of those tokens (raw text).

    `perplexity(texts)` is exp(sum of the first list / sum of the second).
    """
    device = model_device(model)
    nll, tokens, done = [0.0] * len(texts), [0] * len(texts), 0
    with eval_mode(model):
        for batch in iter_text_batches(tokenizer, texts, max_length=max_length, batch_size=batch_size):
            ids, mask = batch.input_ids.to(device), batch.attention_mask.to(device)
            logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
            targets = ids[:, 1:].masked_fill(~mask[:, 1:].bool(), -100)
            _fill(nll, tokens, batch.rows.tolist(), logits, targets)
            done += len(batch)
            progress(done, len(texts))
    return nll, tokens


def chat_nll(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    pairs: Sequence[tuple[str, str]],
    *,
    max_length: int,
    batch_size: int = DEFAULT_BATCH_SIZE,
    progress: Progress = no_progress,
) -> tuple[list[float], list[int]]:
    """Per (prompt, reference): summed NLL of the reference's tokens and EOS after the chat-formatted prompt.

    The tokens are exactly those LoRA tuning learns from (`finetune.build_examples`: the prompt through
    `prompts.encode_prompt`, loss on the response tokens + EOS, cut at `max_length`). A pair whose
    prompt alone fills `max_length` has no scored token (0, 0).
    """
    from finescope_core.finetune import IGNORE, build_examples, pad_batch

    device = model_device(model)
    built: list[dict[str, list[int]] | None] = []
    for prompt, reference in pairs:
        one = build_examples(tokenizer, [{"prompt": prompt, "response": reference}], max_length).examples
        built.append(one[0] if one else None)
    lengths = {i: len(e["input_ids"]) for i, e in enumerate(built) if e is not None}
    rows = sorted(lengths, key=lambda i: -lengths[i])  # longest first, ties in input order
    nll, tokens = [0.0] * len(pairs), [0] * len(pairs)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    with eval_mode(model):
        for start in range(0, len(rows), batch_size):
            part = rows[start : start + batch_size]
            batch = pad_batch([e for i in part if (e := built[i]) is not None], pad)
            logits = model(
                input_ids=batch["input_ids"].to(device),
                attention_mask=batch["attention_mask"].to(device),
                use_cache=False,
            ).logits
            targets = batch["labels"][:, 1:].to(device)
            assert IGNORE == -100, "cross_entropy's default ignore_index"
            _fill(nll, tokens, part, logits, targets)
            progress(min(start + batch_size, len(rows)), len(rows))
    return nll, tokens


def _fill(nll: list[float], tokens: list[int], rows: Sequence[int], logits: Tensor, targets: Tensor) -> None:
    """Add each batch row's summed NLL over its targets (-100: not scored) into `nll[rows[b]]`."""
    per_token = F.cross_entropy(
        logits[:, :-1].float().transpose(1, 2), targets, ignore_index=-100, reduction="none"
    )  # [B, T-1]
    scored = targets != -100
    for b, row in enumerate(rows):
        nll[row] = float(per_token[b][scored[b]].sum())
        tokens[row] = int(scored[b].sum())
