"""The `recover` section: the logit-distillation phase over a domain-weighted sample of the training
pool (the `recovered` stage, between `pruned` and `tuned`)."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field

from finescope_core.config.base import Strict

RECOVER_TOKENS = 2_000_000
"""Default `recover.tokens`: about 200 times the ~10^4 tokens tuning on the curated set sees, still far
below the anchors (LLM-Pruner tunes on ~50k instructions; Minitron distils 10^10 tokens). Sized for a
GPU: on CPU cores set a budget of tens of thousands (`configs/demo.yaml`)."""


class RecoverConfig(Strict):
    """Recovery of the pruned model by logit distillation from the teacher over many corpus records
    (nearest to the seeds first, plus a share of general ones), before the teacher-guided tuning."""

    tokens: int = Field(RECOVER_TOKENS, ge=0)
    """Token budget of the phase: the tokens the student trains on (repeating the pool when it holds
    fewer). 0: no phase; `tuned` starts from the pruned model."""
    pool: Annotated[int, Field(ge=1)] | Literal["auto"] = "auto"
    """Training-pool records drawn, nearest to the seeds first (the curated stage's scores). `auto`:
    the whole training pool in that order, read until the budget is spent."""
    general_share: float = Field(0.2, ge=0, le=1)
    """Share of the drawn records taken at random from the rest of the training pool, spread evenly
    through the stream, so the student does not forget general text."""
    max_length: int = Field(512, ge=8)
    """Tokens per packed sequence: the pool's texts are tokenised, joined with EOS and cut into
    sequences of this length."""
    batch_size: int = Field(4, ge=1)
    """Sequences per micro-batch."""
    grad_accum: int = Field(4, ge=1)
    """Micro-batches per optimiser step."""
    lr: Annotated[float, Field(gt=0)] | Literal["auto"] = "auto"
    """AdamW learning rate. `auto`: 2e-4 for LoRA, 2e-5 for full tuning (`finetune.method`)."""
    warmup_ratio: float = Field(0.05, ge=0, lt=1)
    """Share of the optimiser steps with a linear warm-up (then cosine decay to 0)."""
    kd_temperature: float = Field(1.0, gt=0)
    """T of the loss `T^2 * KL(teacher || student)`: both next-token distributions softened by it."""
    ce_weight: float = Field(0.0, ge=0)
    """Weight of the cross entropy on the texts' own next tokens, added to the distillation loss."""

    def learning_rate(self, method: str) -> float:
        """`lr`, with `auto` resolved for the tuning method (`lora` or `full`)."""
        if self.lr != "auto":
            return self.lr
        return 2e-4 if method == "lora" else 2e-5
