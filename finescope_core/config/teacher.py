"""The `teacher` section: how the teacher rewrites the curated records into distillation data."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field

from finescope_core.config.base import NAME_OR_PATH, Strict


class TeacherConfig(Strict):
    """Teacher-guided distillation data (paper §3.2.2, SDFT-style rewrite)."""

    model: str = Field("base", json_schema_extra=NAME_OR_PATH)
    """`base`: the unpruned base model; or any HF directory / hub id."""
    backend: Literal["hf", "vllm"] = "hf"
    """`hf`: transformers `generate`, batched by prompt length (any device). `vllm`: the vLLM engine
    (`pip install 'finescope[vllm]'`, CUDA only; continuous batching, raise `batch_size` to e.g. 256):
    the same prompts, budget, EOS tokens, output file and reject filter. Greedy outputs may differ
    from `hf` in the last float bits, so the choice is part of the distilled stage's key."""
    device_map: Literal["single", "auto"] = "single"
    """`hf` backend: `single` puts the teacher on `device`; `auto` lets accelerate spread its layers
    over every visible GPU (then the CPU), for a teacher larger than one GPU. The same outputs."""
    max_new_tokens: Annotated[int, Field(ge=1)] | Literal["auto"] = "auto"
    """Longest teacher response, in tokens. `auto`: 1.25 x the 95th percentile of the reference
    answers' token lengths, clamped to [32, 1024] (128 when no record has a reference); the value
    used is in the stage info (`max_new_tokens_used`)."""
    max_prompt_length: int = Field(384, ge=8)
    """Most prompt tokens. A rewrite prompt that is too long has its reference answer shortened
    first; when the request alone does not fit, the record keeps its reference (reason `prompt_too_long`)."""
    batch_size: int = Field(8, ge=1)
    """Prompts per generate() call (left padded)."""
    temperature: float = Field(0.0, ge=0)
    """0: greedy decoding (reproducible); above 0: sampling at this temperature."""
    min_response_chars: int = Field(8, ge=0)
    """Responses shorter than this are rejected (the reference is kept instead, when there is one)."""
    text_records: Literal["text", "elaborate"] = "text"
    """What a plain-text record (only `text`: no request, no reference) becomes in the distilled data.
    `text`: a text row, learned as text (language modelling and KD over every token of it, no chat
    template), and never sent to the teacher, so the student learns the domain's own text; when every
    record is text the teacher model is not even loaded. `elaborate`: the text is the user message, the
    teacher writes a reply and the student learns the pair as chat (the behaviour before this setting)."""
    check_answer: bool = True
    """When a reference has a numeric final answer (GSM8K `#### 42`, `\\boxed{42}`, or a reference
    that ends with a number), reject a response whose final number differs (reason `wrong_answer`)."""
