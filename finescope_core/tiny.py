"""Named tiny presets: random Llama/Qwen decoders and an offline byte-level tokenizer.

Used by the tests and benchmarks (milliseconds to build, nothing downloaded), and by anyone who wants
to try the pipeline end to end without a real model.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal, cast

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import (
    AutoModelForCausalLM,
    LlamaConfig,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen3Config,
)

Arch = Literal["llama", "qwen2", "qwen3"]
SPECIALS = ["<pad>", "<s>", "</s>"]
CHAT_TEMPLATE = (
    "{% for m in messages %}<s>{{ m['role'] }}\n{{ m['content'] }}</s>\n{% endfor %}"
    "{% if add_generation_prompt %}<s>assistant\n{% endif %}"
)


def byte_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level tokenizer (256 byte tokens + pad/bos/eos), built in-process: any text round-trips."""
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {tok: i for i, tok in enumerate(SPECIALS + sorted(alphabet))}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    tok = PreTrainedTokenizerFast(  # type: ignore[no-untyped-call]  # untyped in transformers
        tokenizer_object=backend, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token=None
    )
    tok.chat_template = CHAT_TEMPLATE
    return tok


def tiny_config(
    arch: Arch = "llama",
    *,
    hidden: int = 48,
    layers: int = 2,
    heads: int = 6,
    kv_heads: int = 2,
    intermediate: int = 96,
    vocab: int = 259,
) -> PretrainedConfig:
    """Config of a tiny GQA decoder (head_dim = hidden / heads)."""
    common: dict[str, Any] = dict(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=256,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        tie_word_embeddings=False,
    )
    if arch == "llama":
        return LlamaConfig(**common)
    if arch == "qwen2":
        return Qwen2Config(**common)
    if arch == "qwen3":
        return Qwen3Config(head_dim=hidden // heads, **common)
    raise ValueError(f"unknown tiny arch {arch!r}; choose llama, qwen2 or qwen3")


def tiny_model(
    arch: Arch = "llama", *, seed: int = 0, attn_implementation: str = "eager", **kw: Any
) -> PreTrainedModel:
    """A randomly initialised tiny decoder in eval mode, fp32, on the CPU."""
    torch.manual_seed(seed)
    cfg = tiny_config(arch, **kw)
    model = cast(
        PreTrainedModel,
        AutoModelForCausalLM.from_config(  # type: ignore[no-untyped-call]  # untyped in transformers
            cfg, attn_implementation=attn_implementation, dtype=torch.float32
        ),
    )
    # Random init leaves biases and norms at trivial values; perturb the norms so the tests see them.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.add_(0.1 * torch.randn_like(p))
    model.train(False)
    return model


def save_tiny(out_dir: Path, arch: Arch = "llama", *, seed: int = 0, **kw: Any) -> Path:
    """Write a tiny model + tokenizer as a normal HF directory (safetensors)."""
    model = tiny_model(arch, seed=seed, **kw)
    model.save_pretrained(out_dir, safe_serialization=True)
    byte_tokenizer().save_pretrained(out_dir)
    return out_dir
