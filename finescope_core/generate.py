"""Batched generation: one left-padded `generate` call per batch of tokenised prompts.

The one generation loop of the project: the teacher (`teacher.backends`) and numeric exact match
(`evaluate.numeric`) both generate through `generate_batch`, greedy (temperature 0) or sampling.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, cast

import torch
from torch import Tensor, nn
from transformers import PreTrainedTokenizerBase


class GenerationError(ValueError):
    """The model or tokenizer cannot generate; the message says what is missing."""


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
        model: anything with a `generation_config` (a model, or a `VLLMGenerator`); without one,
            the tokenizer's EOS alone.

    Raises:
        GenerationError: neither defines an EOS token.
    """
    ids: list[int] = []
    config = getattr(model, "generation_config", None)
    configured = config.eos_token_id if config is not None else None
    for value in [*(configured if isinstance(configured, list) else [configured]), tokenizer.eos_token_id]:
        if isinstance(value, int) and value not in ids:
            ids.append(value)
    if not ids:
        raise GenerationError(
            "neither the model's generation config nor the tokenizer defines an EOS token; set eos_token_id"
        )
    return ids


def cut_at_eos(row: list[int], eos: list[int]) -> Generation:
    """The tokens before the first EOS; truncated when the row holds none."""
    for i, tok in enumerate(row):
        if tok in eos:
            return Generation(row[:i], truncated=False)
    return Generation(row, truncated=True)


def _generation_kwargs(
    model: nn.Module, pad_id: int, eos: list[int], max_new_tokens: int, temperature: float
) -> dict[str, Any]:
    """The settings of one `generate` call: the model's own generation config with ours on top."""
    settings: dict[str, Any] = {
        "max_new_tokens": max_new_tokens,
        "pad_token_id": pad_id,
        "eos_token_id": eos,
        "do_sample": temperature > 0,
    }
    config = getattr(model, "generation_config", None)
    if config is None:  # a module with a generate() of its own
        return settings
    gen = copy.deepcopy(config)
    gen.max_new_tokens, gen.max_length = max_new_tokens, None
    gen.pad_token_id, gen.eos_token_id = pad_id, eos
    gen.do_sample = temperature > 0
    if gen.do_sample:
        gen.temperature = temperature
    else:
        # An instruct model's config may carry sampling defaults; greedy decoding must not see them.
        gen.temperature = gen.top_p = gen.top_k = None
    return {"generation_config": gen, "max_new_tokens": max_new_tokens}


def _generate_fn(model: nn.Module) -> Callable[..., Tensor]:
    """The model's `generate` (transformers' GenerationMixin, or any module with one)."""
    generate = getattr(model, "generate", None)
    if not callable(generate):
        raise GenerationError(
            f"{type(model).__name__} has no generate(); generation needs a causal LM "
            "(an AutoModelForCausalLM)"
        )
    return cast("Callable[..., Tensor]", generate)  # GenerationMixin.generate returns the token ids


def _device(model: nn.Module) -> torch.device:
    device = getattr(model, "device", None)
    if isinstance(device, torch.device):
        return device
    return next(model.parameters()).device


@torch.no_grad()
def generate_batch(
    model: nn.Module,
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

    Raises:
        GenerationError: the tokenizer has no pad token, or the model no `generate`.
    """
    if tokenizer.pad_token_id is None:
        raise GenerationError(
            "the tokenizer has no pad token; pass it through finescope_core.model.prepare_tokenizer"
        )
    generate = _generate_fn(model)
    eos = eos_ids(model, tokenizer)
    side = tokenizer.padding_side
    try:
        tokenizer.padding_side = "left"
        padded = tokenizer.pad({"input_ids": [list(p) for p in prompts]}, padding=True, return_tensors="pt")
    finally:
        tokenizer.padding_side = side
    device = _device(model)
    enc: dict[str, Tensor] = {k: v.to(device) for k, v in padded.items()}
    settings = _generation_kwargs(model, tokenizer.pad_token_id, eos, max_new_tokens, temperature)
    out = generate(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"], **settings)
    new = out[:, enc["input_ids"].shape[1] :].tolist()
    return [cut_at_eos(row, eos) for row in new]
