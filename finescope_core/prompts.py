"""The prompt formats: how one user message is put before the model's reply, everywhere.

Tuning (`finetune`), the teacher (`teacher`) and evaluation (`evaluate.numeric`, `evaluate.choice`,
the demo's lm-eval tasks) format a request the same way, so the student is trained, taught and scored
in one format: the tokenizer's chat template when it has one (one user turn, ready for the assistant),
else the plain `PLAIN_TEMPLATE`, "Question: ...\\nAnswer:" (lm-evaluation-harness's convention).
Multiple-choice scoring always uses the plain format, as lm-eval's log-likelihood tasks do.
"""

from __future__ import annotations

from transformers import PreTrainedTokenizerBase

PLAIN_TEMPLATE = "Question: {prompt}\nAnswer:"
"""The prompt format for tokenizers without a chat template (and for multiple-choice scoring)."""
PLAIN_STOP = "\nQuestion:"
"""Where a model that keeps talking after its answer in the plain format starts the next question."""


def has_chat_template(tokenizer: PreTrainedTokenizerBase) -> bool:
    """True when the tokenizer brings a chat template (then prompts are formatted with it)."""
    return bool(getattr(tokenizer, "chat_template", None))


def plain_prompt(message: str) -> str:
    """The message in the plain format (`PLAIN_TEMPLATE`), its surrounding whitespace dropped."""
    return PLAIN_TEMPLATE.format(prompt=message.strip())


def format_prompt(tokenizer: PreTrainedTokenizerBase, message: str) -> str:
    """One user turn ready for the assistant's reply: the chat template when there is one, else plain.

    Shared by generation, evaluation and fine-tuning so the student is trained on exactly the
    inference format.
    """
    if has_chat_template(tokenizer):
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": message}], add_generation_prompt=True, tokenize=False
        )
        assert isinstance(text, str), "tokenize=False renders the template as text"
        return text
    return plain_prompt(message)


def encode_prompt(tokenizer: PreTrainedTokenizerBase, message: str) -> list[int]:
    """Token ids of `format_prompt(tokenizer, message)`.

    A chat template writes its own special tokens, so none are added on top of it; the plain format
    gets the tokenizer's usual ones (e.g. BOS).
    """
    text = format_prompt(tokenizer, message)
    return list(tokenizer(text, add_special_tokens=not has_chat_template(tokenizer))["input_ids"])
