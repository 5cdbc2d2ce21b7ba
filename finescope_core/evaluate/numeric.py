"""Numeric exact match (GSM8K style): greedy generation, then the final number against the reference's."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from decimal import Decimal
from typing import Any

from torch import nn
from transformers import PreTrainedTokenizerBase

from finescope_core.answers import final_answer
from finescope_core.evaluate.errors import EvalError
from finescope_core.evaluate.inference import DEFAULT_BATCH_SIZE, eval_mode
from finescope_core.generate import GenerationError, generate_batch
from finescope_core.progress import Progress, no_progress
from finescope_core.prompts import PLAIN_STOP, encode_prompt, format_prompt

# A model that keeps talking after its answer (plain prompt format) starts the next question.
STOP_STRINGS = (PLAIN_STOP,)


def extract_number(text: str) -> Decimal | None:
    """The final numeric answer in a text (`finescope_core.answers.final_answer`, not strict).

    After the last "####" its first number, else the last number of the last `\\boxed{}`, else the
    last number in the text. Commas between digit groups, "$" and a trailing "." are dropped; "-" is
    a sign only when it does not follow a word character ("3-4" reads as 3 and 4).

    Returns:
        The number as a Decimal (so "42.0" equals "42"), or None when the text holds no number.
    """
    return final_answer(text)


def reference_number(answer: Any, where: str) -> Decimal:
    """The reference's final number: a JSON number, or a text such as a GSM8K solution ending in "#### 42".

    Raises:
        EvalError: the answer is neither a number nor a text containing one.
    """
    if isinstance(answer, (int, float)) and not isinstance(answer, bool) and math.isfinite(answer):
        return Decimal(str(answer))
    if isinstance(answer, str):
        value = extract_number(answer)
        if value is not None:
            return value
    raise EvalError(f"{where}: field 'answer' must be a number or a text ending in one, got {answer!r:.80}")


def check_numeric_item(item: Any, where: str) -> dict[str, Any]:
    """A validated numeric item `{question: str, answer: number | str}` (answer kept as given).

    Raises:
        EvalError: naming `where` and the missing or bad field.
    """
    if not isinstance(item, Mapping):
        raise EvalError(f"{where}: an item must be an object with question, answer")
    question = item.get("question")
    if not isinstance(question, str) or not question.strip():
        raise EvalError(f"{where}: missing or empty field 'question' (a non-empty string)")
    if "answer" not in item:
        raise EvalError(f"{where}: missing field 'answer' (the reference number or solution text)")
    reference_number(item["answer"], where)
    return {"question": question, "answer": item["answer"]}


def generation_prompt(tokenizer: PreTrainedTokenizerBase, question: str) -> str:
    """The question as the model is prompted everywhere (`finescope_core.prompts.format_prompt`): a
    user turn of the tokenizer's chat template, or "Question: ...\\nAnswer:" without one."""
    return format_prompt(tokenizer, question)


def generate_answers(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    questions: Sequence[str],
    *,
    max_new_tokens: int,
    batch_size: int = DEFAULT_BATCH_SIZE,
    progress: Progress = no_progress,
) -> list[str]:
    """Greedy answers to `questions`, generated in left-padded batches of similar prompt length
    (`finescope_core.generate.generate_batch`, the teacher's loop), decoded up to the first EOS.

    Returns:
        The decoded new text of each question, in input order, cut at "\\nQuestion:" (a model that goes
        on to invent the next question would otherwise have its numbers read as its answer).

    Raises:
        EvalError: the tokenizer has no pad token.
    """
    if tokenizer.pad_token_id is None:
        raise EvalError(
            "the tokenizer has no pad token; pass it through finescope_core.model.prepare_tokenizer"
        )
    texts = [generation_prompt(tokenizer, q) for q in questions]
    order = sorted(range(len(texts)), key=lambda i: -len(texts[i]))
    prompts = [encode_prompt(tokenizer, q) for q in questions]
    answers = [""] * len(prompts)
    with eval_mode(model):
        for start in range(0, len(order), batch_size):
            rows = order[start : start + batch_size]
            try:
                gens = generate_batch(
                    model, tokenizer, [prompts[i] for i in rows], max_new_tokens=max_new_tokens
                )
            except GenerationError as e:  # a module without generate(): an evaluation input error
                raise EvalError(f"numeric exact match: {e}") from None
            for i, gen in zip(rows, gens, strict=True):
                answers[i] = _cut_at_stop(str(tokenizer.decode(gen.token_ids, skip_special_tokens=True)))
            progress(min(start + batch_size, len(order)), len(order))
    return answers


def _cut_at_stop(text: str) -> str:
    for stop in STOP_STRINGS:
        text = text.split(stop, 1)[0]
    return text


def numeric_hits(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    items: Sequence[Mapping[str, Any]],
    *,
    max_new_tokens: int,
    batch_size: int = DEFAULT_BATCH_SIZE,
    progress: Progress = no_progress,
) -> list[int]:
    """Per question, 1 when the generated final number equals the reference's final number.

    Raises:
        EvalError: no items, or an item without question / a numeric answer.
    """
    if not items:
        raise EvalError("no numeric items; pass at least one {question, answer} item")
    checked = [check_numeric_item(item, f"item {i}") for i, item in enumerate(items)]
    answers = generate_answers(
        model,
        tokenizer,
        [c["question"] for c in checked],
        max_new_tokens=max_new_tokens,
        batch_size=batch_size,
        progress=progress,
    )
    return [
        int(extract_number(text) == reference_number(item["answer"], f"item {i}"))
        for i, (item, text) in enumerate(zip(checked, answers, strict=True))
    ]


def numeric_exact_match(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    items: Sequence[Mapping[str, Any]],
    *,
    max_new_tokens: int,
    batch_size: int = DEFAULT_BATCH_SIZE,
    progress: Progress = no_progress,
) -> dict[str, float | int]:
    """Share of questions whose generated final number equals the reference's final number.

    Returns:
        {"exact_match": float, "n": int}.

    Raises:
        EvalError: no items, or an item without question / a numeric answer.
    """
    hits = numeric_hits(
        model, tokenizer, items, max_new_tokens=max_new_tokens, batch_size=batch_size, progress=progress
    )
    return {"exact_match": sum(hits) / len(hits), "n": len(hits)}
