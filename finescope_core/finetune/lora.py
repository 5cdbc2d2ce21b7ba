"""LoRA adapters on the student's linear layers (peft)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from torch import nn
from transformers import PreTrainedModel

from finescope_core.config import FinetuneConfig
from finescope_core.finetune.errors import FinetuneError


def check_targets(model: nn.Module, targets: Sequence[str]) -> None:
    """Raise when a LoRA target names no nn.Linear of the model (a typo would silently train less)."""
    linears = {name.rsplit(".", 1)[-1] for name, m in model.named_modules() if isinstance(m, nn.Linear)}
    missing = sorted(set(targets) - linears)
    if missing:
        raise FinetuneError(
            f"finetune.target_modules {missing} match no linear layer of the model; "
            f"its linear layers are named {sorted(linears)}"
        )


def attach_lora(model: PreTrainedModel, cfg: FinetuneConfig, seed: int = 0) -> PeftModel:
    """Wrap `model` (in place) with LoRA adapters on `cfg.target_modules`, seeded init."""
    check_targets(model, cfg.target_modules)
    lora = LoraConfig(
        r=cfg.rank,
        lora_alpha=cfg.alpha,
        lora_dropout=cfg.dropout,
        target_modules=list(cfg.target_modules),
        task_type="CAUSAL_LM",
    )
    torch.manual_seed(seed)
    peft_model = get_peft_model(model, lora)
    assert isinstance(peft_model, PeftModel)
    return peft_model
