"""The `distilled` stage: the teacher answers every curated request, written batch by batch, resumable.

A plain-text record under `teacher.text_records: text` is written as a text line first, without the
teacher (`learned_as_text`). The generation budget fits the domain (`max_new_tokens: auto`, from the
references' lengths).
Records are generated longest prompt first (batches of similar length, little padding). Output is
JSONL, one line per input record, appended and fsynced batch by batch: a killed run resumes where it
stopped and ends with the same file as an uninterrupted run (greedy decoding); once every record is
done the file is put back in the records' order.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

from transformers import PreTrainedTokenizerBase

from finescope_core.config import TeacherConfig
from finescope_core.data import Record
from finescope_core.distilled import (
    DISTILLED_FILE,
    TeacherError,
    TeacherSummary,
    check_ids,
    pending_batches,
    read_done,
    summarise,
    text_line,
)
from finescope_core.generate import Generation
from finescope_core.progress import Progress
from finescope_core.stage import StageContext
from finescope_core.teacher.backends import Teacher, teacher_generate
from finescope_core.teacher.filter import distilled_line, output_line
from finescope_core.teacher.prompts import fit_prompt, learned_as_text

"""The `distilled` artifact's one file: a JSONL line per curated record."""

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
        gens = teacher_generate(
            model,
            tokenizer,
            [p for _, p in todo],
            temperature=cfg.temperature,
            seed=seed,
            max_new_tokens=max_new_tokens,
        )
    by_id = {}
    for (record, _), gen in zip(todo, gens, strict=True):
        text = str(tokenizer.decode(gen.token_ids, skip_special_tokens=True))
        by_id[record.id] = distilled_line(
            record, text, gen.truncated, cfg.min_response_chars, check_answer=cfg.check_answer
        )
    lines = [by_id.get(r.id) or output_line(r, "", "prompt_too_long") for r in batch]
    return lines, sum(len(g.token_ids) for g in gens)


def _append(f: TextIO, lines: list[dict[str, Any]]) -> None:
    """Append complete lines and make them durable, so a kill leaves only whole lines behind."""
    f.write("".join(json.dumps(line, ensure_ascii=False) + "\n" for line in lines))
    f.flush()
    os.fsync(f.fileno())


def generate_distilled(
    model: Teacher | None,
    tokenizer: PreTrainedTokenizerBase,
    records: Sequence[Record],
    cfg: TeacherConfig,
    out_path: Path,
    *,
    progress: Progress | None = None,
    seed: int = 0,
) -> TeacherSummary:
    """Write the distilled dataset for `records` to `out_path` (JSONL), resuming an interrupted run.

    A request's line is `{"id", "prompt", "response", "source", "rejected"}`: `prompt` is the user's
    request without the rewrite scaffolding, `source` is `teacher` or `reference` (the teacher's
    response was rejected for the reason in `rejected`), and a dropped record has `response` and
    `source` null. A plain-text record under `cfg.text_records: text` gets a text line
    (`finescope_core.distilled.text_line`), written before any generation.

    Args:
        model: the teacher, in eval mode (or a `VLLMGenerator`); None when no record asks it
            (every record is learned as text).
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
    asked = [r for r in records if not learned_as_text(r, cfg.text_records)]
    if asked and model is None:
        raise TeacherError(
            f"{len(asked)} records are requests (e.g. {asked[0].origin}) and need the teacher model; "
            "pass the teacher"
        )
    generated = tokens = 0
    max_new_tokens = resolve_max_new_tokens(tokenizer, asked, cfg)
    start = time.perf_counter()
    with out_path.open("a", encoding="utf-8") as f:
        texts = [text_line(r) for r in records if r.id not in done and learned_as_text(r, cfg.text_records)]
        if texts:
            _append(f, texts)
            lines += texts
            if progress is not None:
                progress(len(lines), len(records))
        for batch_no, batch in pending_batches(
            by_prompt_length(tokenizer, asked, cfg.max_prompt_length), done, cfg.batch_size
        ):
            assert model is not None, "checked above: requests need the teacher"
            new, n_tokens = _distill_batch(
                model, tokenizer, batch, cfg, seed * 1_000_003 + batch_no, max_new_tokens
            )
            _append(f, new)
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


@dataclass(frozen=True)
class DistillInputs:
    """What the `distilled` stage reads: the loaded teacher and the curated records."""

    teacher: Teacher | None
    """The teacher, in eval mode (an HF model), or the vLLM engine (`VLLMGenerator`); None when every
    record is learned as text (`learned_as_text`), so nothing asks it."""
    tokenizer: PreTrainedTokenizerBase
    """The teacher's tokenizer (`finescope_core.model.load_tokenizer` / `prepare_tokenizer`)."""
    records: Sequence[Record]
    """The curated records, with unique ids, in output order."""


def run(
    inputs: DistillInputs, section: TeacherConfig, ctx: StageContext, work_dir: Path, progress: Progress
) -> dict[str, Any]:
    """The `distilled` stage: the teacher's responses to `inputs.records` (and the text lines of
    plain-text records) in `work_dir / DISTILLED_FILE`, resuming lines a killed run left there.

    Returns:
        The `TeacherSummary` as a dict (counts by source and reason, budget, tokens, seconds).
    """
    summary = generate_distilled(
        inputs.teacher,
        inputs.tokenizer,
        inputs.records,
        section,
        work_dir / DISTILLED_FILE,
        progress=progress,
        seed=ctx.seed,
    )
    return summary.to_dict()
