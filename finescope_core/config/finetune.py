"""The `finetune` section: recovery of the pruned model by distillation (LoRA or full), and the
field names it used to have."""

from __future__ import annotations

import logging
from typing import Any, ClassVar, Literal

from pydantic import Field, model_validator

from finescope_core.config.base import Strict

KD_WEIGHT = 0.5
"""Default `finetune.kd_weight` (bench/bench_recovery.py)."""
KD_TEMPERATURE = 1.0
"""Default `finetune.kd_temperature` (bench/bench_recovery.py)."""


class FinetuneConfig(Strict):
    """LoRA recovery of the pruned model on the distilled data (paper §4: rank 32, AdamW, cutoff 256)."""

    RENAMED: ClassVar[dict[str, str]] = {"cutoff": "max_length", "temperature": "kd_temperature"}
    """Old field name -> its new name: the old one still loads, with a warning naming the new one."""

    rank: int = Field(32, ge=1)
    """LoRA rank r."""
    alpha: int = Field(64, ge=1)
    """LoRA alpha (scale = alpha / rank)."""
    dropout: float = Field(0.05, ge=0, lt=1)
    """LoRA dropout."""
    target_modules: list[str] = Field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    )
    """Linear layers that get adapters."""
    epochs: int = Field(2, ge=1)
    """Passes over the distilled data."""
    lr: float = Field(2e-4, gt=0)
    """AdamW learning rate."""
    batch_size: int = Field(4, ge=1)
    """Examples per micro-batch."""
    grad_accum: int = Field(2, ge=1)
    """Micro-batches per optimiser step."""
    max_length: int = Field(256, ge=8)
    """Tokens per example (prompt + response), truncated beyond."""
    eval_fraction: float = Field(0.1, ge=0, lt=1)
    """Share of the distilled data held out for the per-epoch eval loss (and best-epoch selection)."""
    method: Literal["lora", "full"] = "lora"
    """`lora`: peft adapters on `target_modules` (outputs the adapter and the merged model); `full`:
    every weight of the pruned model (outputs the full model, no adapter)."""
    kd_weight: float = Field(KD_WEIGHT, ge=0, le=1)
    """w in `(1 - w) * CE + w * T^2 * KL(teacher || student)`: logit distillation from the teacher
    (`teacher.model`, the unpruned base model by default) on the response tokens; 0: cross entropy only."""
    kd_temperature: float = Field(KD_TEMPERATURE, gt=0)
    """T of the distillation term: both next-token distributions are softened by it."""
    kd_tokens: Literal["response", "all"] = "response"
    """Positions of the distillation term. `response`: the response tokens, like the cross entropy;
    `all`: every token of the formatted example, prompt included, so the pruned student also relearns
    the teacher's distributions over the domain's own text (each term is averaged over its own
    positions). Costs one log-softmax per position more; the teacher pass is the same."""
    warmup_ratio: float = Field(0.1, ge=0, lt=1)
    """Share of the optimiser steps with a linear learning-rate warm-up (then cosine decay to 0)."""
    max_grad_norm: float = Field(1.0, gt=0)
    """Gradient clipping (global L2 norm)."""
    gradient_checkpointing: bool = False
    """Recompute each decoder layer's activations in the backward pass instead of keeping them:
    activation memory of one layer instead of all, for about a third more compute. The same updates
    (tested): for long `max_length`, large batches or full tuning of a big model on one GPU."""

    @model_validator(mode="before")
    @classmethod
    def _renamed(cls, value: Any) -> Any:
        if isinstance(value, dict):
            for old, new in cls.RENAMED.items():
                if old in value:
                    if new in value:
                        raise ValueError(
                            f"finetune.{old} and finetune.{new} are one setting: keep finetune.{new}"
                        )
                    logging.getLogger("finescope").warning(
                        "finetune.%s is now finetune.%s: rename it in the config", old, new
                    )
                    value = {**{k: v for k, v in value.items() if k != old}, new: value[old]}
        return value
