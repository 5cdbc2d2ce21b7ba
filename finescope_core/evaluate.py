"""Evaluation of base / pruned / tuned models: domain perplexity, multiple-choice accuracy, numeric exact match.

Perplexity is token-level over all held-out texts. Multiple-choice questions (MMLU style) are scored by
the log-likelihood the model gives each choice after the prompt, as lm-evaluation-harness does; numeric
questions (GSM8K style) by greedy generation and comparison of the final number. `metrics_schema_errors`
checks the `metrics.json` the evaluate stage writes.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from decimal import Decimal, InvalidOperation
from typing import Any

import fsspec
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import PreTrainedTokenizerBase

from finescope_core.batching import iter_text_batches, right_pad
from finescope_core.config import EvalConfig

Progress = Callable[[int, int], None]
"""Called as progress(done, total) after each batch."""
EvalProgress = Callable[[str, int, int], None]
"""Called as progress(metric, done, total); metric is "perplexity", "mc" or "numeric"."""

REQUIRED_MODELS = ("base", "pruned", "tuned")
ACCURACY_KEYS = ("mc_accuracy", "mc_accuracy_norm", "numeric_exact_match")
DEFAULT_BATCH_SIZE = 8
# A model that keeps talking after its answer (plain prompt format) starts the next question.
STOP_STRINGS = ("\nQuestion:",)


class EvalError(ValueError):
    """Bad evaluation input (an eval file, an item or a setting); the message names it and the fix."""


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


@contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    """Disable dropout for the evaluation (a freshly tuned model may be in train mode), then restore."""
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            yield
    finally:
        model.train(was_training)


def count_parameters(model: nn.Module) -> int:
    """Total parameters, each tensor once: tied input/output embeddings are one Parameter."""
    return sum(p.numel() for p in model.parameters())


# ------------------------------------------------------------------------------------------ perplexity


def perplexity(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    texts: Sequence[str],
    *,
    max_length: int,
    batch_size: int = DEFAULT_BATCH_SIZE,
    progress: Progress | None = None,
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
    progress: Progress | None,
) -> tuple[float, int]:
    device = _device(model)
    total, tokens, done = 0.0, 0, 0
    with _eval_mode(model):
        for batch in iter_text_batches(tokenizer, texts, max_length=max_length, batch_size=batch_size):
            ids, mask = batch.input_ids.to(device), batch.attention_mask.to(device)
            logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
            # Right padding: a real target always has a real token before it.
            predicted = mask[:, 1:].bool()
            nll = F.cross_entropy(logits[:, :-1][predicted].float(), ids[:, 1:][predicted], reduction="sum")
            total += float(nll)
            tokens += int(predicted.sum())
            done += len(batch)
            if progress is not None:
                progress(done, len(texts))
    return total, tokens


# ------------------------------------------------------------------------------------- multiple choice


def mc_prompt(question: str) -> str:
    """The prompt a multiple-choice question is scored after; each choice follows as " <choice>"."""
    return f"Question: {question.strip()}\nAnswer:"


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
    progress: Progress | None = None,
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
    model: nn.Module, requests: list[tuple[list[int], int]], pad_id: int, batch_size: int, progress: Progress | None
) -> list[float]:
    device = _device(model)
    order = sorted(range(len(requests)), key=lambda r: -len(requests[r][0]))
    out = [0.0] * len(requests)
    with _eval_mode(model):
        for start in range(0, len(order), batch_size):
            rows = order[start : start + batch_size]
            ids, mask = (t.to(device) for t in right_pad([requests[r][0] for r in rows], pad_id))
            logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
            for b, r in enumerate(rows):
                out[r] = _continuation_logprob(logits[b], ids[b], len(requests[r][0]), requests[r][1])
            if progress is not None:
                progress(min(start + batch_size, len(order)), len(order))
    return out


def _continuation_logprob(logits: Tensor, ids: Tensor, length: int, n_cont: int) -> float:
    """Sum of log p(ids[t] | ids[:t]) over the last `n_cont` real tokens; logits [T, V], ids [T]."""
    start = length - n_cont
    assert start >= 1, "a scored continuation needs at least one context token before it"
    logp = torch.log_softmax(logits[start - 1 : length - 1].float(), dim=-1)
    return float(logp.gather(-1, ids[start:length, None]).sum())


def mc_accuracy(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    items: Sequence[Mapping[str, Any]],
    *,
    max_length: int,
    batch_size: int = DEFAULT_BATCH_SIZE,
    progress: Progress | None = None,
) -> dict[str, float | int]:
    """Multiple-choice accuracy by log-likelihood (MMLU style).

    `accuracy` picks the choice with the highest summed log-probability; `accuracy_norm` divides each
    sum by the choice's length in characters (lm-evaluation-harness `acc_norm`), which removes the bias
    towards short choices. Ties go to the first choice.

    Returns:
        {"accuracy": float, "accuracy_norm": float, "n": int}.

    Raises:
        EvalError: no items, or an item without question / choices / a valid answer index.
    """
    if not items:
        raise EvalError("no multiple-choice items; pass at least one {question, choices, answer} item")
    checked = [check_mc_item(item, f"item {i}") for i, item in enumerate(items)]
    scores = choice_logprobs(model, tokenizer, checked, max_length=max_length, batch_size=batch_size, progress=progress)
    hits = hits_norm = 0
    for item, row in zip(checked, scores, strict=True):
        normed = [s / len(f" {c}") for s, c in zip(row, item["choices"], strict=True)]
        hits += int(_argmax(row) == item["answer"])
        hits_norm += int(_argmax(normed) == item["answer"])
    return {"accuracy": hits / len(items), "accuracy_norm": hits_norm / len(items), "n": len(items)}


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
            f"{where}: field 'answer' must be a choice index 0..{len(choices) - 1} (or a letter), got {answer!r}"
        )
    return {"question": question, "choices": list(choices), "answer": index}


def _answer_index(answer: Any) -> int | None:
    if isinstance(answer, bool):
        return None
    if isinstance(answer, int):
        return answer
    if isinstance(answer, str) and len(answer.strip()) == 1 and answer.strip().isalpha():
        return ord(answer.strip().upper()) - ord("A")
    return None


# -------------------------------------------------------------------------------------- numeric answers

_NUMBER = re.compile(r"(?:(?<![\w.])[-−])?(?:\$[-−]?)?(?:\d+(?:,\d{3}(?!\d))*(?:\.\d+)?|\.\d+)")


def extract_number(text: str) -> Decimal | None:
    """The final numeric answer in a text, GSM8K convention.

    The first number after the last "####" if there is one, else the last number in the text. Commas
    between digit groups, "$" and a trailing "." are dropped; "-" is a sign only when it does not follow
    a word character ("3-4" reads as 3 and 4).

    Returns:
        The number as a Decimal (so "42.0" equals "42"), or None when the text holds no number.
    """
    if "####" in text:
        found = _NUMBER.search(text.rsplit("####", 1)[1])
        if found is not None:
            return _to_decimal(found.group())
    numbers = _NUMBER.findall(text)
    return _to_decimal(numbers[-1]) if numbers else None


def _to_decimal(token: str) -> Decimal:
    cleaned = token.replace("$", "").replace(",", "").replace("−", "-")
    try:
        return Decimal(cleaned)
    except InvalidOperation:  # "--5": two signs; the digits are still the answer
        return Decimal(cleaned.lstrip("-"))


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
    """The question as a user turn of the tokenizer's chat template, or "Question: ...\\nAnswer:" without one."""
    if getattr(tokenizer, "chat_template", None):
        messages = [{"role": "user", "content": question}]
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return mc_prompt(question)


def generate_answers(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    questions: Sequence[str],
    *,
    max_new_tokens: int,
    batch_size: int = DEFAULT_BATCH_SIZE,
    progress: Progress | None = None,
) -> list[str]:
    """Greedy answers to `questions`, generated in left-padded batches of similar prompt length.

    Returns:
        The decoded new text of each question, in input order, cut at "\\nQuestion:" (a model that goes
        on to invent the next question would otherwise have its numbers read as its answer).

    Raises:
        EvalError: the tokenizer has no pad token.
    """
    if tokenizer.pad_token_id is None:
        raise EvalError("the tokenizer has no pad token; pass it through finescope_core.model.prepare_tokenizer")
    prompts = [generation_prompt(tokenizer, q) for q in questions]
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    answers = [""] * len(prompts)
    with _eval_mode(model):
        for start in range(0, len(order), batch_size):
            rows = order[start : start + batch_size]
            texts = _generate_batch(model, tokenizer, [prompts[i] for i in rows], max_new_tokens)
            for i, text in zip(rows, texts, strict=True):
                answers[i] = _cut_at_stop(text)
            if progress is not None:
                progress(min(start + batch_size, len(order)), len(order))
    return answers


def _generate_batch(
    model: nn.Module, tokenizer: PreTrainedTokenizerBase, prompts: list[str], max_new_tokens: int
) -> list[str]:
    # A chat template writes its own special tokens (BOS included, where the model uses one).
    templated = bool(getattr(tokenizer, "chat_template", None))
    enc = tokenizer(
        prompts, padding=True, padding_side="left", add_special_tokens=not templated, return_tensors="pt"
    ).to(_device(model))
    out = model.generate(
        input_ids=enc["input_ids"],
        attention_mask=enc["attention_mask"],
        max_new_tokens=max_new_tokens,
        do_sample=False,
        pad_token_id=tokenizer.pad_token_id,
    )
    return tokenizer.batch_decode(out[:, enc["input_ids"].shape[1] :], skip_special_tokens=True)


def _cut_at_stop(text: str) -> str:
    for stop in STOP_STRINGS:
        text = text.split(stop, 1)[0]
    return text


def numeric_exact_match(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    items: Sequence[Mapping[str, Any]],
    *,
    max_new_tokens: int,
    batch_size: int = DEFAULT_BATCH_SIZE,
    progress: Progress | None = None,
) -> dict[str, float | int]:
    """Share of questions whose generated final number equals the reference's final number.

    Returns:
        {"exact_match": float, "n": int}.

    Raises:
        EvalError: no items, or an item without question / a numeric answer.
    """
    if not items:
        raise EvalError("no numeric items; pass at least one {question, answer} item")
    checked = [check_numeric_item(item, f"item {i}") for i, item in enumerate(items)]
    answers = generate_answers(
        model, tokenizer, [c["question"] for c in checked], max_new_tokens=max_new_tokens,
        batch_size=batch_size, progress=progress,
    )
    hits = sum(
        extract_number(text) == reference_number(item["answer"], f"item {i}")
        for i, (item, text) in enumerate(zip(checked, answers, strict=True))
    )
    return {"exact_match": hits / len(checked), "n": len(checked)}


# ------------------------------------------------------------------------------------------ eval files


def _jsonl_objects(path: str, storage_options: dict[str, Any] | None) -> Iterator[tuple[Any, str]]:
    """(parsed object, "file:line") for every non-blank line of a JSONL file or URI."""
    try:
        with fsspec.open(path, "rb", **(storage_options or {})) as f:
            data = f.read()
    except FileNotFoundError:
        raise EvalError(f"eval file {path} does not exist; check evaluate.mc_file / evaluate.numeric_file") from None
    for lineno, raw in enumerate(data.split(b"\n"), start=1):
        if not raw.strip():
            continue
        origin = f"{path}:{lineno}"
        try:
            yield json.loads(raw.decode("utf-8")), origin
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise EvalError(f"{origin}: not a valid UTF-8 JSON line ({e}); fix or remove the line") from None


def _load_items(
    path: str, check: Callable[[Any, str], dict[str, Any]], storage_options: dict[str, Any] | None
) -> list[dict[str, Any]]:
    items = [check(obj, origin) for obj, origin in _jsonl_objects(path, storage_options)]
    if not items:
        raise EvalError(f"eval file {path} holds no items; add one JSON object per line")
    return items


def load_mc_items(path: str, *, storage_options: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """Multiple-choice items from a JSONL file/URI: one `{question, choices, answer}` object per line.

    Raises:
        EvalError: unreadable file, bad JSON, or a bad item, naming file:line and the field.
    """
    return _load_items(path, check_mc_item, storage_options)


def load_numeric_items(path: str, *, storage_options: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """Numeric-answer items from a JSONL file/URI: one `{question, answer}` object per line.

    Raises:
        EvalError: unreadable file, bad JSON, or a bad item, naming file:line and the field.
    """
    return _load_items(path, check_numeric_item, storage_options)


# --------------------------------------------------------------------------------------- whole model


def _stage(progress: EvalProgress | None, metric: str) -> Progress | None:
    if progress is None:
        return None
    return lambda done, total: progress(metric, done, total)


def evaluate_model(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    *,
    domain_texts: Sequence[str],
    mc_items: Sequence[Mapping[str, Any]] | None = None,
    numeric_items: Sequence[Mapping[str, Any]] | None = None,
    cfg: EvalConfig,
    batch_size: int = DEFAULT_BATCH_SIZE,
    progress: EvalProgress | None = None,
) -> dict[str, Any]:
    """All metrics of one model, each eval set cut to its first `cfg.max_examples` examples.

    Returns:
        {"perplexity": float, "parameters": int, "mc_accuracy"?: float, "mc_accuracy_norm"?: float,
        "numeric_exact_match"?: float, "n": {"perplexity": int, "mc"?: int, "numeric"?: int}}.
    """
    texts = list(domain_texts)[: cfg.max_examples]
    result: dict[str, Any] = {
        "perplexity": perplexity(
            model, tokenizer, texts, max_length=cfg.max_length, batch_size=batch_size,
            progress=_stage(progress, "perplexity"),
        ),
        "parameters": count_parameters(model),
        "n": {"perplexity": len(texts)},
    }
    if mc_items:
        mc = mc_accuracy(
            model, tokenizer, list(mc_items)[: cfg.max_examples], max_length=cfg.max_length,
            batch_size=batch_size, progress=_stage(progress, "mc"),
        )
        result.update(mc_accuracy=mc["accuracy"], mc_accuracy_norm=mc["accuracy_norm"])
        result["n"]["mc"] = mc["n"]
    if numeric_items:
        num = numeric_exact_match(
            model, tokenizer, list(numeric_items)[: cfg.max_examples], max_new_tokens=cfg.max_new_tokens,
            batch_size=batch_size, progress=_stage(progress, "numeric"),
        )
        result["numeric_exact_match"] = num["exact_match"]
        result["n"]["numeric"] = num["n"]
    return result


# ------------------------------------------------------------------------------------- metrics.json


def metrics_schema_errors(metrics: Any) -> list[str]:
    """Problems with the shape of `metrics.json`: `{"models": {"base": {...}, "pruned": {...}, "tuned": {...}}}`.

    Each model needs `perplexity` (a finite number > 0) and `parameters` (an int > 0); accuracies, when
    present, are numbers in [0, 1]. More models (baselines such as "pruned-random") are allowed.

    Returns:
        One message per problem, naming the dotted path; empty when the metrics are well formed.
    """
    if not isinstance(metrics, Mapping) or not isinstance(metrics.get("models"), Mapping):
        return ["metrics: must be an object with a 'models' object"]
    models = metrics["models"]
    errors = [f"models.{name}: missing" for name in REQUIRED_MODELS if name not in models]
    for name, entry in models.items():
        errors.extend(_model_errors(f"models.{name}", entry))
    return errors


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _model_errors(where: str, entry: Any) -> list[str]:
    if not isinstance(entry, Mapping):
        return [f"{where}: must be an object of metrics"]
    errors = []
    ppl = entry.get("perplexity")
    if not (_is_number(ppl) and ppl > 0):
        errors.append(f"{where}.perplexity: must be a finite number > 0, got {ppl!r}")
    params = entry.get("parameters")
    if not (isinstance(params, int) and not isinstance(params, bool) and params > 0):
        errors.append(f"{where}.parameters: must be an integer > 0, got {params!r}")
    for key in ACCURACY_KEYS:
        if key in entry and not (_is_number(entry[key]) and 0 <= entry[key] <= 1):
            errors.append(f"{where}.{key}: must be a number in [0, 1], got {entry[key]!r}")
    return errors
