"""Teacher-guided distillation data (paper §3.2.2, after SDFT, Yang et al. 2024).

The teacher (by default the unpruned base model) answers every curated record. When the record has a
reference answer, the teacher sees it and writes its own response (SDFT's rewrite); otherwise it just
answers (`prompts`). A reject filter catches empty, cut-off, too-short and scaffold-parroting
responses, and (for numeric domains) responses whose final number differs from the reference's: the
reference answer is kept instead when there is one, and the record is dropped when there is not
(`filter`). The HF model or the vLLM engine generates (`backends`); `stage` writes the resumable
JSONL (`generate_distilled`) and is the stage's entry (`run`).

Plain-text records (only `text`) are learned as text by default (`teacher.text_records: text`): the
stage writes each as a text line (`finescope_core.distilled.text_line`) without asking the teacher,
and tuning learns every token of it, so the student learns the domain's own text. With
`teacher.text_records: elaborate` the text is the user message as it is: a chat teacher answers or
comments on the passage, a base model continues it, and the student learns that reply as chat.
"""

from finescope_core.distilled import DISTILLED_FILE, TeacherError
from finescope_core.generate import Generation, eos_ids, generate_batch
from finescope_core.prompts import PLAIN_TEMPLATE, encode_prompt, format_prompt
from finescope_core.teacher.backends import Teacher, VLLMGenerator, teacher_generate, vllm_generation
from finescope_core.teacher.filter import (
    COPY_THRESHOLD,
    FORMAT_PHRASES,
    REWRITE_PHRASES,
    copied_share,
    distilled_line,
    final_number,
    output_line,
    reject_reason,
    wrong_answer,
)
from finescope_core.teacher.prompts import (
    REWRITE_INSTRUCTION,
    REWRITE_TEMPLATE,
    fit_prompt,
    learned_as_text,
    teacher_message,
    user_prompt,
)
from finescope_core.teacher.stage import (
    AUTO_FACTOR,
    AUTO_FALLBACK,
    AUTO_RANGE,
    DistillInputs,
    auto_max_new_tokens,
    by_prompt_length,
    generate_distilled,
    resolve_max_new_tokens,
    run,
)

__all__ = [
    "AUTO_FACTOR",
    "AUTO_FALLBACK",
    "AUTO_RANGE",
    "COPY_THRESHOLD",
    "DISTILLED_FILE",
    "FORMAT_PHRASES",
    "PLAIN_TEMPLATE",
    "REWRITE_INSTRUCTION",
    "REWRITE_PHRASES",
    "REWRITE_TEMPLATE",
    "DistillInputs",
    "Generation",
    "Teacher",
    "TeacherError",
    "VLLMGenerator",
    "auto_max_new_tokens",
    "by_prompt_length",
    "copied_share",
    "distilled_line",
    "encode_prompt",
    "eos_ids",
    "fit_prompt",
    "final_number",
    "format_prompt",
    "generate_batch",
    "generate_distilled",
    "learned_as_text",
    "output_line",
    "reject_reason",
    "resolve_max_new_tokens",
    "run",
    "teacher_generate",
    "teacher_message",
    "user_prompt",
    "vllm_generation",
    "wrong_answer",
]
