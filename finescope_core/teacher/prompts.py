"""What the teacher is asked (SDFT rewrite messages), fitted to the prompt budget.

When a record has a reference answer, the teacher sees it and writes its own response (SDFT's
rewrite); otherwise it just answers the request. A prompt that is too long is shortened in its
reference part, never in the request.
"""

from __future__ import annotations

from transformers import PreTrainedTokenizerBase

from finescope_core.data import Record
from finescope_core.distilled import TeacherError
from finescope_core.prompts import encode_prompt

REWRITE_INSTRUCTION = (
    "Using the reference answer as a guide, write your own response to the request above. "
    "Reply with the response only, and do not mention the reference answer."
)
REWRITE_TEMPLATE = "{prompt}\n\nReference answer:\n{reference}\n\n" + REWRITE_INSTRUCTION


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
            f"{record.origin}: record {record.id!r} has an empty instruction and input (or an empty "
            "prompt), so there is nothing to ask the teacher; fill in the request or remove the record"
        )
    return prompt


def learned_as_text(record: Record, text_records: str) -> bool:
    """True when the record becomes a text line, never sent to the teacher: a plain-text record (no
    request) under `teacher.text_records: text`."""
    return text_records == "text" and record.prompt is None


def teacher_message(record: Record) -> str:
    """What the teacher is asked: the SDFT rewrite prompt when a reference exists, else the request."""
    prompt = user_prompt(record)
    reference = record.reference
    if reference is None:
        return prompt
    return REWRITE_TEMPLATE.format(prompt=prompt, reference=reference)


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
