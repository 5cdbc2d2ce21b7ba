"""The `finetune` section: recovery of the pruned model by distillation (LoRA or full), and the
field names it used to have."""

from __future__ import annotations

import logging
from typing import Annotated, Any, ClassVar, Literal

from pydantic import Field, model_validator

from finescope_core.config.base import Strict

KD_WEIGHT = 0.5
"""Default `finetune.kd_weight` (bench/bench_recovery.py)."""
KD_TEMPERATURE = 1.0
"""Default `finetune.kd_temperature` (bench/bench_recovery.py)."""
LR_LORA = 2e-4
"""`finetune.lr: auto` under LoRA (paper §4)."""
LR_FULL = 1e-4
"""`finetune.lr: auto` under full tuning: every weight moves, so a lower rate (README, "Recovery settings":
1e-4 full vs 2e-4 LoRA measured on SmolLM2-135M)."""


class FinetuneConfig(Strict):
    """Recovery of the pruned model on the distilled data, full or LoRA (paper §4: LoRA rank 32, AdamW,
    cutoff 256)."""

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
    lr: Annotated[float, Field(gt=0)] | Literal["auto"] = "auto"
    """AdamW learning rate. `auto`: 2e-4 under LoRA, 1e-4 under full tuning (resolved with the method)."""
    batch_size: int = Field(4, ge=1)
    """Examples per micro-batch."""
    grad_accum: int = Field(2, ge=1)
    """Micro-batches per optimiser step."""
    max_length: int = Field(256, ge=8)
    """Tokens per example (prompt + response), truncated beyond."""
    eval_fraction: float = Field(0.1, ge=0, lt=1)
    """Share of the distilled data held out for the per-epoch eval loss (and best-epoch selection)."""
    method: Literal["auto", "lora", "full"] = "auto"
    """`lora`: peft adapters on `target_modules` (outputs the adapter and the merged model); `full`:
    every weight of the pruned model (outputs the full model, no adapter; float32 master weights under
    bf16/fp16); `auto`: `full` when the memory planner predicts full tuning fits the memory budget with
    a 20 % margin (`memory_budget`, else the CUDA device's free memory, else the available RAM), else
    `lora`. Resolved once before any work; the stage key holds the resolved method."""
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

    def learning_rate(self) -> float:
        """`lr`, or under `lr: auto` the rate of the (resolved) method.

        Raises:
            ValueError: `lr: auto` while `method` is still `auto` (resolve the method first).
        """
        if self.lr != "auto":
            return self.lr
        if self.method == "auto":
            raise ValueError(
                "finetune.lr: auto follows the method, and finetune.method is still auto: resolve it first "
                "(finescope_core.finetune_choice.resolve_finetune) or set finetune.method: lora | full"
            )
        return LR_FULL if self.method == "full" else LR_LORA

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
