"""Teacher-guided distillation data (paper §3.2.2, after SDFT, Yang et al. 2024).

The teacher (by default the unpruned base model) answers every curated record. When the record has a
reference answer, the teacher sees it and writes its own response (SDFT's rewrite); otherwise it just
answers. A reject filter catches empty, cut-off, too-short and scaffold-parroting responses, and
(for numeric domains) responses whose final number differs from the reference's: the reference answer
is kept instead when there is one, and the record is dropped when there is not. The generation budget
fits the domain (`max_new_tokens: auto`, from the references' lengths), and a long prompt is shortened
in its reference part, never in the request; a request that alone does not fit is `prompt_too_long`.

Plain-text records (only `text`) are used as the user message as they are: a chat teacher answers or
comments on the passage, a base model continues it. Either way the student learns the teacher's
reply to a domain text, and no invented instruction wraps the user's data.

Records are generated longest prompt first (batches of similar length, little padding). Output is
JSONL, one line per input record, appended and fsynced batch by batch: a killed run resumes where it
stopped and ends with the same file as an uninterrupted run (greedy decoding); once every record is
done the file is put back in the records' order.
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import os
import re
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from finescope_core.config import TeacherConfig
from finescope_core.data import Record
from finescope_core.distilled import (
    TeacherError,
    TeacherSummary,
    check_ids,
    pending_batches,
    read_done,
    summarise,
)
from finescope_core.progress import Progress

PLAIN_TEMPLATE = "### Instruction:\n{prompt}\n\n### Response:\n"
"""Prompt format for tokenizers without a chat template (Alpaca style)."""
REWRITE_INSTRUCTION = (
    "Using the reference answer as a guide, write your own response to the request above. "
    "Reply with the response only, and do not mention the reference answer."
)
REWRITE_TEMPLATE = "{prompt}\n\nReference answer:\n{reference}\n\n" + REWRITE_INSTRUCTION
REWRITE_PHRASES = (
    "reference answer",
    "your response",
    "your own response",
    "own words",
    "rewrite",
    "rewritten",
    "rephrase",
    "paraphrase",
    "original text",
    "original answer",
    "given answer",
    "provided answer",
    "this answer",
    REWRITE_INSTRUCTION.lower(),
)
"""Phrases of the rewrite scaffolding, looked for only in replies to a rewrite prompt. The last few
catch a small teacher's habit of grading the reference ("This answer is incorrect.") after answering."""
FORMAT_PHRASES = ("### instruction", "### response")
"""Markers of the plain prompt format, looked for in every reply."""
COPY_THRESHOLD = 0.8
"""A response whose word trigrams come from the prompt at least this often is a copy of it."""


def user_prompt(record: Record) -> str:
    """The user-facing request of a record (`Record.prompt`), or its text when it has no request.

    Raises:
        TeacherError: a record whose request is empty (blank instruction and input, or a blank prompt).
    """
    prompt = record.prompt
    if prompt is None:
        return record.text
    if not prompt:
        raise TeacherError(
            f"{record.origin}: record {record.id!r} has an empty instruction and input (or an empty prompt), so "
            "there is nothing to ask the teacher; fill in the request or remove the record"
        )
    return prompt


def teacher_message(record: Record) -> str:
    """What the teacher is asked: the SDFT rewrite prompt when a reference exists, else the request."""
    prompt = user_prompt(record)
    reference = record.reference
    if reference is None:
        return prompt
    return REWRITE_TEMPLATE.format(prompt=prompt, reference=reference)


def format_prompt(tokenizer: PreTrainedTokenizerBase, message: str) -> str:
    """One user turn ready for the assistant's reply: the chat template when there is one, else plain.

    Shared by generation and fine-tuning so the student is trained on exactly the inference format.
    """
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": message}], add_generation_prompt=True, tokenize=False
        )
        assert isinstance(text, str)
        return text
    return PLAIN_TEMPLATE.format(prompt=message)


def encode_prompt(tokenizer: PreTrainedTokenizerBase, message: str) -> list[int]:
    """Token ids of `format_prompt(tokenizer, message)`.

    A chat template writes its own special tokens, so none are added on top of it; the plain format
    gets the tokenizer's usual ones (e.g. BOS).
    """
    has_template = bool(getattr(tokenizer, "chat_template", None))
    text = format_prompt(tokenizer, message)
    return list(tokenizer(text, add_special_tokens=not has_template)["input_ids"])


def _words(text: str) -> list[str]:
    return re.findall(r"\w+", text.lower())


def _ngrams(words: list[str], n: int) -> set[tuple[str, ...]]:
    return {tuple(words[i : i + n]) for i in range(len(words) - n + 1)}


def copied_share(response: str, prompt_parts: Sequence[str], n: int = 3) -> float:
    """Share of the response's word n-grams that also occur in the prompt parts (0 for no words)."""
    words = _words(response)
    if not words:
        return 0.0
    n = min(n, len(words))
    source: set[tuple[str, ...]] = set()
    for part in prompt_parts:
        source |= _ngrams(_words(part), n)
    grams = [tuple(words[i : i + n]) for i in range(len(words) - n + 1)]
    return sum(g in source for g in grams) / len(grams)


def reject_reason(
    response: str,
    prompt_parts: Sequence[str],
    *,
    min_chars: int = 8,
    truncated: bool = False,
    rewrite: bool = True,
) -> str | None:
    """Why a teacher response is unusable, or None when it is kept.

    Args:
        response: the decoded response (special tokens removed).
        prompt_parts: the user's texts the teacher was shown (instruction, input, reference). A
            scaffold phrase these already contain is allowed (the user asked for a "rewrite").
        min_chars: shortest acceptable response, in characters after stripping.
        truncated: generation hit max_new_tokens without an end-of-sequence token.
        rewrite: the teacher saw the rewrite scaffolding (a reference answer). Without it, words like
            "rewrite" or "your response" are ordinary language and only format markers count.

    Returns:
        `empty`, `truncated`, `too_short`, `mentions_scaffolding`, `copies_prompt`, or None.
    """
    text = response.strip()
    if not text:
        return "empty"
    if truncated:
        return "truncated"
    if len(text) < min_chars:
        return "too_short"
    lowered = text.lower()
    user_text = "\n".join(prompt_parts).lower()
    phrases = FORMAT_PHRASES + (REWRITE_PHRASES if rewrite else ())
    if any(p in lowered and p not in user_text for p in phrases):
        return "mentions_scaffolding"
    if copied_share(text, prompt_parts) >= COPY_THRESHOLD:
        return "copies_prompt"
    return None


_NUMBER = r"-?\d[\d,]*(?:\.\d+)?|-?\.\d+"
_GSM8K_FINAL = re.compile(r"####\s*\$?\s*(" + _NUMBER + r")")
_BOXED = re.compile(r"\\boxed\{([^{}]*)\}")
_ANY_NUMBER = re.compile(_NUMBER)
_ENDS_WITH_NUMBER = re.compile(r"(" + _NUMBER + r")\s*[%$€£)*.!]*\s*$")


def _as_number(text: str) -> float | None:
    try:
        return float(text.replace(",", "").rstrip("."))
    except ValueError:
        return None


def final_number(text: str, *, strict: bool = False) -> float | None:
    """The final numeric answer of a text: GSM8K's `#### 42`, else the last `\\boxed{42}`, else a number.

    Args:
        strict: for references. Only a text that *ends* with a number (after `####` and `\\boxed` are
            ruled out) counts as having a numeric answer, so an essay with a year in it has none. Not
            strict (for responses): the last number anywhere.

    Returns:
        The number, or None when the text has no numeric final answer.
    """
    if m := _GSM8K_FINAL.search(text):
        return _as_number(m.group(1))
    boxed = [b for b in _BOXED.findall(text) if _ANY_NUMBER.search(b)]
    if boxed:
        return _as_number(_ANY_NUMBER.findall(boxed[-1])[-1])
    if strict:
        m = _ENDS_WITH_NUMBER.search(text)
        return _as_number(m.group(1)) if m else None
    numbers = _ANY_NUMBER.findall(text)
    return _as_number(numbers[-1]) if numbers else None


def wrong_answer(response: str, reference: str | None) -> bool:
    """True when the reference has a numeric final answer and the response's final number differs (or is missing)."""
    if reference is None:
        return False
    expected = final_number(reference, strict=True)
    if expected is None:
        return False
    got = final_number(response)
    return got is None or not math.isclose(got, expected, rel_tol=1e-6, abs_tol=1e-9)


def distilled_line(
    record: Record, response: str, truncated: bool, min_chars: int, *, check_answer: bool = True
) -> dict[str, Any]:
    """The output line of one record: the teacher's response, the reference, or a drop (response None).

    With `check_answer`, a response whose final number differs from the reference's numeric final
    answer is rejected as `wrong_answer` (the reference is kept).
    """
    parts = [p for p in (user_prompt(record), record.reference) if p]
    rewrite = record.reference is not None
    reason = reject_reason(response, parts, min_chars=min_chars, truncated=truncated, rewrite=rewrite)
    if reason is None and check_answer and wrong_answer(response, record.reference):
        reason = "wrong_answer"
    return _line(record, response, reason)


def _line(record: Record, response: str, reason: str | None) -> dict[str, Any]:
    line: dict[str, Any] = {"id": record.id, "prompt": user_prompt(record)}
    if reason is None:
        return line | {"response": response.strip(), "source": "teacher", "rejected": None}
    if record.reference is not None:
        return line | {"response": record.reference, "source": "reference", "rejected": reason}
    return line | {"response": None, "source": None, "rejected": reason}


@dataclass(frozen=True)
class Generation:
    """One generated continuation."""

    token_ids: list[int]
    """New tokens, up to (excluding) the first end-of-sequence token."""
    truncated: bool
    """True when generation stopped at max_new_tokens without an end-of-sequence token."""


def eos_ids(model: Any, tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """Every token id that ends a response: the generation config's and the tokenizer's EOS.

    Args:
        model: anything with a `generation_config` (a model, or a `VLLMGenerator`).
    """
    ids: list[int] = []
    configured = model.generation_config.eos_token_id
    for value in [*(configured if isinstance(configured, list) else [configured]), tokenizer.eos_token_id]:
        if isinstance(value, int) and value not in ids:
            ids.append(value)
    if not ids:
        raise TeacherError(
            "neither the model's generation config nor the tokenizer defines an EOS token; set eos_token_id"
        )
    return ids


def _generation_config(
    model: PreTrainedModel, pad_id: int, eos: list[int], max_new_tokens: int, temperature: float
) -> Any:
    gen = copy.deepcopy(model.generation_config)
    gen.max_new_tokens, gen.max_length = max_new_tokens, None
    gen.pad_token_id, gen.eos_token_id = pad_id, eos
    gen.do_sample = temperature > 0
    if gen.do_sample:
        gen.temperature = temperature
    else:
        # An instruct model's config may carry sampling defaults; greedy decoding must not see them.
        gen.temperature = gen.top_p = gen.top_k = None
    return gen


@torch.no_grad()
def generate_batch(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[list[int]],
    *,
    max_new_tokens: int,
    temperature: float = 0.0,
) -> list[Generation]:
    """Generate for a batch of tokenised prompts, left padded so every row continues from its last token.

    Args:
        prompts: token ids per prompt (already truncated), any lengths.
        max_new_tokens: generation budget per prompt.
        temperature: 0 for greedy decoding; above 0 samples from the global torch RNG.

    Returns:
        One `Generation` per prompt, in order.
    """
    eos = eos_ids(model, tokenizer)
    side = tokenizer.padding_side
    try:
        tokenizer.padding_side = "left"
        padded = tokenizer.pad({"input_ids": [list(p) for p in prompts]}, padding=True, return_tensors="pt")
    finally:
        tokenizer.padding_side = side
    enc: dict[str, torch.Tensor] = {k: v.to(model.device) for k, v in padded.items()}
    gen = _generation_config(model, tokenizer.pad_token_id, eos, max_new_tokens, temperature)
    out = model.generate(**enc, generation_config=gen)  # type: ignore[operator]  # transformers types generate as a Tensor attribute
    new = out[:, enc["input_ids"].shape[1] :].tolist()
    return [_cut_at_eos(row, eos) for row in new]


def _cut_at_eos(row: list[int], eos: list[int]) -> Generation:
    for i, tok in enumerate(row):
        if tok in eos:
            return Generation(row[:i], truncated=False)
    return Generation(row, truncated=True)


@contextlib.contextmanager
def _seeded(seed: int, device: torch.device) -> Iterator[None]:
    """Seed torch's RNG for one batch without disturbing the caller's RNG state."""
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


AUTO_FACTOR = 1.25
"""`max_new_tokens: auto` = this x the 95th percentile of the references' token lengths ..."""
AUTO_RANGE = (32, 1024)
"""... clamped to this range."""
AUTO_FALLBACK = 128
"""`auto` when no record has a reference answer."""


def auto_max_new_tokens(tokenizer: PreTrainedTokenizerBase, records: Sequence[Record]) -> int:
    """A generation budget that fits the domain: 1.25 x the 95th percentile of the reference answers'
    token lengths (with EOS), clamped to [32, 1024]; 128 when no record has a reference."""
    lengths = sorted(
        len(tokenizer(r.reference, add_special_tokens=False)["input_ids"]) + 1
        for r in records
        if r.reference is not None
    )
    if not lengths:
        return AUTO_FALLBACK
    p95 = lengths[min(len(lengths) - 1, math.ceil(0.95 * len(lengths)) - 1)]
    return int(min(max(math.ceil(AUTO_FACTOR * p95), AUTO_RANGE[0]), AUTO_RANGE[1]))


def resolve_max_new_tokens(
    tokenizer: PreTrainedTokenizerBase, records: Sequence[Record], cfg: TeacherConfig
) -> int:
    """`cfg.max_new_tokens`, with `auto` derived from the records' references (`auto_max_new_tokens`)."""
    return (
        auto_max_new_tokens(tokenizer, records) if cfg.max_new_tokens == "auto" else int(cfg.max_new_tokens)
    )


def fit_prompt(tokenizer: PreTrainedTokenizerBase, record: Record, max_length: int) -> list[int] | None:
    """The teacher prompt's token ids within `max_length`, never cutting the request.

    A rewrite prompt that is too long gets its reference answer shortened (its tail cut, marked with
    `...`); the request and the instruction stay whole.

    Returns:
        The ids, or None when the request (with the rewrite scaffolding, if any) alone does not fit.
    """
    ids = encode_prompt(tokenizer, teacher_message(record))
    if len(ids) <= max_length:
        return ids
    reference = record.reference
    if reference is None:
        return None
    prompt = user_prompt(record)
    ref_ids = list(tokenizer(reference, add_special_tokens=False)["input_ids"])

    def encoded(keep: int) -> list[int]:
        cut = str(tokenizer.decode(ref_ids[:keep], skip_special_tokens=True)).rstrip() + " ..."
        return encode_prompt(tokenizer, REWRITE_TEMPLATE.format(prompt=prompt, reference=cut))

    keep = max(len(ref_ids) - (len(ids) - max_length), 0)
    while keep > 0:
        ids = encoded(keep)
        if len(ids) <= max_length:
            return ids
        keep -= max(len(ids) - max_length, 1)  # re-tokenising at the cut can move a token or two
    return None


class VLLMGenerator:
    """Teacher generation through vLLM (`teacher.backend: vllm`, CUDA only): the same prompts (token ids),
    EOS ids, budget and sampling as the HF path, so the same JSONL and reject filter follow.

    vLLM batches continuously inside each call, so a larger `teacher.batch_size` (e.g. 256) keeps the
    GPU busy; the batch is still the unit the output is written and resumed in.
    """

    def __init__(self, path: str, dtype: str, seed: int, **engine: Any):
        try:
            import vllm
        except ImportError:
            raise TeacherError(
                "teacher.backend: vllm needs the vllm package: pip install 'finescope[vllm]' (CUDA only); "
                "or use teacher.backend: hf"
            ) from None
        from transformers import GenerationConfig

        self._vllm = vllm
        self.llm = vllm.LLM(model=path, tokenizer=path, dtype=dtype, seed=seed, **engine)
        try:
            self.generation_config = GenerationConfig.from_pretrained(path)
        except OSError:  # no generation_config.json: the tokenizer's EOS alone
            self.generation_config = GenerationConfig()  # type: ignore[no-untyped-call]  # untyped in transformers

    def generate(
        self,
        tokenizer: PreTrainedTokenizerBase,
        prompts: Sequence[list[int]],
        *,
        max_new_tokens: int,
        temperature: float,
        seed: int,
    ) -> list[Generation]:
        """One `Generation` per prompt, in order (`Generation.truncated`: stopped by the budget)."""
        eos = eos_ids(self, tokenizer)
        params = self._vllm.SamplingParams(
            max_tokens=max_new_tokens,
            temperature=temperature,
            seed=seed,
            stop_token_ids=eos,
            detokenize=False,
        )
        outputs = self.llm.generate(
            [{"prompt_token_ids": list(p)} for p in prompts], sampling_params=params, use_tqdm=False
        )
        return [
            vllm_generation(list(o.outputs[0].token_ids), o.outputs[0].finish_reason, eos) for o in outputs
        ]


def vllm_generation(token_ids: list[int], finish_reason: str | None, eos: list[int]) -> Generation:
    """A vLLM completion as a `Generation`: cut before the first EOS (vLLM keeps a stop token in the
    output), truncated when vLLM stopped for length."""
    cut = _cut_at_eos(token_ids, eos)
    return Generation(cut.token_ids, truncated=cut.truncated and finish_reason == "length")


Teacher = PreTrainedModel | VLLMGenerator
"""A model the HF path generates with, or the vLLM engine."""


def _generate(
    teacher: Teacher,
    tokenizer: PreTrainedTokenizerBase,
    prompts: list[list[int]],
    cfg: TeacherConfig,
    seed: int,
    max_new_tokens: int,
) -> list[Generation]:
    if isinstance(teacher, VLLMGenerator):
        return teacher.generate(
            tokenizer, prompts, max_new_tokens=max_new_tokens, temperature=cfg.temperature, seed=seed
        )
    with _seeded(seed, teacher.device):
        return generate_batch(
            teacher, tokenizer, prompts, max_new_tokens=max_new_tokens, temperature=cfg.temperature
        )


def _distill_batch(
    model: Teacher,
    tokenizer: PreTrainedTokenizerBase,
    batch: list[Record],
    cfg: TeacherConfig,
    seed: int,
    max_new_tokens: int,
) -> tuple[list[dict[str, Any]], int]:
    """Output lines for one batch, and the number of new tokens generated."""
    fitted = [fit_prompt(tokenizer, r, cfg.max_prompt_length) for r in batch]
    todo = [(r, p) for r, p in zip(batch, fitted, strict=True) if p is not None]
    gens: list[Generation] = []
    if todo:
        gens = _generate(model, tokenizer, [p for _, p in todo], cfg, seed, max_new_tokens)
    by_id = {}
    for (record, _), gen in zip(todo, gens, strict=True):
        text = str(tokenizer.decode(gen.token_ids, skip_special_tokens=True))
        by_id[record.id] = distilled_line(
            record, text, gen.truncated, cfg.min_response_chars, check_answer=cfg.check_answer
        )
    lines = [by_id.get(r.id) or _line(r, "", "prompt_too_long") for r in batch]
    return lines, sum(len(g.token_ids) for g in gens)


def generate_distilled(
    model: Teacher,
    tokenizer: PreTrainedTokenizerBase,
    records: Sequence[Record],
    cfg: TeacherConfig,
    out_path: Path,
    *,
    progress: Progress | None = None,
    seed: int = 0,
) -> TeacherSummary:
    """Write the distilled dataset for `records` to `out_path` (JSONL), resuming an interrupted run.

    Each line is `{"id", "prompt", "response", "source", "rejected"}`: `prompt` is the user's request
    without the rewrite scaffolding, `source` is `teacher` or `reference` (the teacher's response was
    rejected for the reason in `rejected`), and a dropped record has `response` and `source` null.

    Args:
        model: the teacher, in eval mode (or a `VLLMGenerator`).
        records: the curated records, with unique ids, in output order.
        cfg: generation settings (batch size, budgets, temperature, reject threshold).
        out_path: the JSONL file; lines already there (from a killed run) are kept and skipped.
        progress: called as `progress(records_done, records_total)` after each written batch.
        seed: sampling seed (each batch is seeded from it and its batch number).

    Returns:
        Counts over the whole file, plus this call's generated records, new tokens and seconds.
    """
    check_ids(records)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    lines = read_done(out_path, {r.id for r in records})
    resumed, done = len(lines), {line["id"] for line in lines}
    generated = tokens = 0
    max_new_tokens = resolve_max_new_tokens(tokenizer, records, cfg)
    start = time.perf_counter()
    with out_path.open("a", encoding="utf-8") as f:
        for batch_no, batch in pending_batches(
            by_prompt_length(tokenizer, records, cfg.max_prompt_length), done, cfg.batch_size
        ):
            new, n_tokens = _distill_batch(
                model, tokenizer, batch, cfg, seed * 1_000_003 + batch_no, max_new_tokens
            )
            f.write("".join(json.dumps(line, ensure_ascii=False) + "\n" for line in new))
            f.flush()
            os.fsync(f.fileno())
            lines += new
            generated, tokens = generated + len(new), tokens + n_tokens
            if progress is not None:
                progress(len(lines), len(records))
    position = {r.id: i for i, r in enumerate(records)}
    ordered = sorted(lines, key=lambda line: position[line["id"]])
    if ordered != lines:  # generated by prompt length; the file goes back to the records' order, atomically
        lines = ordered
        tmp = out_path.with_name(f".{out_path.name}.tmp")
        tmp.write_text(
            "".join(json.dumps(line, ensure_ascii=False) + "\n" for line in lines), encoding="utf-8"
        )
        os.replace(tmp, out_path)
    summary = summarise(lines, generated, resumed, tokens, time.perf_counter() - start)
    summary.max_new_tokens_used = max_new_tokens
    return summary


def by_prompt_length(
    tokenizer: PreTrainedTokenizerBase, records: Sequence[Record], max_length: int
) -> list[Record]:
    """The records in generation order: longest teacher prompt first, ties in input order.

    Batches of similar prompt lengths carry little left padding, and the first batch is the largest,
    so running out of memory shows at once. The order depends on the records alone, so the batches of
    a resumed run are the same as an uninterrupted run's.
    """
    lengths = [len(fit_prompt(tokenizer, r, max_length) or ()) for r in records]
    return [records[i] for i in sorted(range(len(records)), key=lambda i: (-lengths[i], i))]
