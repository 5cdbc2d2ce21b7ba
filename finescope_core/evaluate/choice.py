"""Multiple-choice accuracy (MMLU style): the log-likelihood the model gives each choice after the prompt.

Scored as lm-evaluation-harness does: the sum of the choice's token log-probabilities, and that sum
per character (`acc_norm`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from transformers import PreTrainedTokenizerBase

from finescope_core.batching import right_pad
from finescope_core.evaluate.errors import EvalError
from finescope_core.evaluate.inference import DEFAULT_BATCH_SIZE, eval_mode, model_device
from finescope_core.progress import Progress, no_progress
from finescope_core.prompts import plain_prompt


def mc_prompt(question: str) -> str:
    """The prompt a multiple-choice question is scored after, always the plain format
    (`finescope_core.prompts.plain_prompt`); each choice follows as " <choice>"."""
    return plain_prompt(question)


def encode_continuation(
    tokenizer: PreTrainedTokenizerBase, context: str, continuation: str
) -> tuple[list[int], list[int]]:
    """Token ids of `context` and of `continuation` as the model reads them one after the other.

    The pair is tokenised together so that the continuation's tokens are the ones the tokenizer really
    produces after the context. If the tokenizer merges characters across the boundary (the context's
    tokens are then not a prefix of the whole), the continuation is tokenised on its own instead.

    Returns:
        (context ids incl. any special prefix such as BOS, continuation ids); the latter is never empty.

    Raises:
        EvalError: the continuation produces no tokens.
    """
    ctx = tokenizer(context)["input_ids"]
    whole = tokenizer(context + continuation)["input_ids"]
    if len(whole) > len(ctx) and whole[: len(ctx)] == ctx:
        return ctx, whole[len(ctx) :]
    cont = tokenizer(continuation, add_special_tokens=False)["input_ids"]
    if not cont:
        raise EvalError(f"the continuation {continuation!r} produces no tokens; give every choice some text")
    return ctx, cont


def _choice_request(
    tokenizer: PreTrainedTokenizerBase, question: str, choice: str, max_length: int, where: str
) -> tuple[list[int], int]:
    """(ids to run, number of trailing continuation ids to score), cut from the left to `max_length`."""
    ctx, cont = encode_continuation(tokenizer, mc_prompt(question), f" {choice}")
    if len(cont) >= max_length:
        raise EvalError(
            f"{where}: the choice {choice[:40]!r} is {len(cont)} tokens, which leaves no prompt within "
            f"max_length={max_length}; raise evaluate.max_length"
        )
    ids = (ctx + cont)[-max_length:]
    return ids, len(cont)


def choice_logprobs(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    items: Sequence[Mapping[str, Any]],
    *,
    max_length: int,
    batch_size: int = DEFAULT_BATCH_SIZE,
    progress: Progress = no_progress,
) -> list[list[float]]:
    """Sum of the log-probabilities of each choice's tokens given the question prompt.

    Args:
        items: dicts with `question`, `choices` (list of str) and `answer` (index), see `check_mc_item`.
        max_length: tokens per prompt + choice; longer prompts lose their start.

    Returns:
        scores[i][j]: log p(" " + choices[j] | mc_prompt(question)) for item i.
    """
    checked = [check_mc_item(item, f"item {i}") for i, item in enumerate(items)]
    requests, owners = [], []
    for i, item in enumerate(checked):
        for j, choice in enumerate(item["choices"]):
            requests.append(_choice_request(tokenizer, item["question"], choice, max_length, f"item {i}"))
            owners.append((i, j))
    flat = _score_requests(model, requests, _pad_id(tokenizer), batch_size, progress)
    scores: list[list[float]] = [[0.0] * len(item["choices"]) for item in checked]
    for (i, j), value in zip(owners, flat, strict=True):
        scores[i][j] = value
    return scores


def _pad_id(tokenizer: PreTrainedTokenizerBase) -> int:
    # Padded positions are masked out, so any id works when the tokenizer has no pad token.
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0


def _score_requests(
    model: nn.Module, requests: list[tuple[list[int], int]], pad_id: int, batch_size: int, progress: Progress
) -> list[float]:
    """Summed continuation log-probability of every request, run longest first so batches pad little."""
    device = model_device(model)
    order = sorted(range(len(requests)), key=lambda r: -len(requests[r][0]))
    out = [0.0] * len(requests)
    with eval_mode(model):
        for start in range(0, len(order), batch_size):
            rows = order[start : start + batch_size]
            ids, mask = (t.to(device) for t in right_pad([requests[r][0] for r in rows], pad_id))
            logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
            for b, r in enumerate(rows):
                out[r] = _continuation_logprob(logits[b], ids[b], len(requests[r][0]), requests[r][1])
            progress(min(start + batch_size, len(order)), len(order))
    return out


def _continuation_logprob(logits: Tensor, ids: Tensor, length: int, n_cont: int) -> float:
    """Sum of log p(ids[t] | ids[:t]) over the last `n_cont` real tokens; logits [T, V], ids [T]."""
    start = length - n_cont
    assert start >= 1, "a scored continuation needs at least one context token before it"
    logp = torch.log_softmax(logits[start - 1 : length - 1].float(), dim=-1)
    return float(logp.gather(-1, ids[start:length, None]).sum())


def mc_hits(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    items: Sequence[Mapping[str, Any]],
    *,
    max_length: int,
    batch_size: int = DEFAULT_BATCH_SIZE,
    progress: Progress = no_progress,
) -> tuple[list[int], list[int]]:
    """Per item, 1 when the highest-scoring choice is the answer: by summed log-probability, and by that
    sum per character (`acc_norm`). Ties go to the first choice.

    Raises:
        EvalError: no items, or an item without question / choices / a valid answer index.
    """
    if not items:
        raise EvalError("no multiple-choice items; pass at least one {question, choices, answer} item")
    checked = [check_mc_item(item, f"item {i}") for i, item in enumerate(items)]
    scores = choice_logprobs(
        model, tokenizer, checked, max_length=max_length, batch_size=batch_size, progress=progress
    )
    hits, hits_norm = [], []
    for item, row in zip(checked, scores, strict=True):
        normed = [s / len(f" {c}") for s, c in zip(row, item["choices"], strict=True)]
        hits.append(int(_argmax(row) == item["answer"]))
        hits_norm.append(int(_argmax(normed) == item["answer"]))
    return hits, hits_norm


def mc_accuracy(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    items: Sequence[Mapping[str, Any]],
    *,
    max_length: int,
    batch_size: int = DEFAULT_BATCH_SIZE,
    progress: Progress = no_progress,
) -> dict[str, float | int]:
    """Multiple-choice accuracy by log-likelihood (MMLU style).

    `accuracy` picks the choice with the highest summed log-probability; `accuracy_norm` divides each
    sum by the choice's length in characters (lm-evaluation-harness `acc_norm`), which removes the bias
    towards short choices. Ties go to the first choice (`mc_hits` gives the per-item hits).

    Returns:
        {"accuracy": float, "accuracy_norm": float, "n": int}.

    Raises:
        EvalError: no items, or an item without question / choices / a valid answer index.
    """
    hits, hits_norm = mc_hits(
        model, tokenizer, items, max_length=max_length, batch_size=batch_size, progress=progress
    )
    return {"accuracy": sum(hits) / len(items), "accuracy_norm": sum(hits_norm) / len(items), "n": len(items)}


def _argmax(values: Sequence[float]) -> int:
    return max(range(len(values)), key=lambda j: (values[j], -j))


def check_mc_item(item: Any, where: str) -> dict[str, Any]:
    """A validated multiple-choice item `{question: str, choices: [str, ...], answer: int}`.

    `answer` is a 0-based index, or a letter ("A" is the first choice) as some MMLU exports write it.

    Raises:
        EvalError: naming `where` and the missing or bad field.
    """
    if not isinstance(item, Mapping):
        raise EvalError(f"{where}: an item must be an object with question, choices, answer")
    question, choices, answer = item.get("question"), item.get("choices"), item.get("answer")
    if not isinstance(question, str) or not question.strip():
        raise EvalError(f"{where}: missing or empty field 'question' (a non-empty string)")
    if not isinstance(choices, list) or len(choices) < 2 or not all(isinstance(c, str) for c in choices):
        raise EvalError(f"{where}: field 'choices' must be a list of at least 2 strings, got {choices!r:.80}")
    index = _answer_index(answer)
    if index is None or not 0 <= index < len(choices):
        raise EvalError(
            f"{where}: field 'answer' must be a choice index 0..{len(choices) - 1} (or a letter), "
            f"got {answer!r}"
        )
    return {"question": question, "choices": list(choices), "answer": index}


def _answer_index(answer: Any) -> int | None:
    """0-based index of an int or letter answer; None for anything else (a bool is no index)."""
    if isinstance(answer, bool):
        return None
    if isinstance(answer, int):
        return answer
    if isinstance(answer, str) and len(answer.strip()) == 1 and answer.strip().isalpha():
        return ord(answer.strip().upper()) - ord("A")
    return None
