"""What a tuning run did: the summary written to `finetune.json`, filled while training."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass
class FinetuneSummary:
    """What a tuning run did; written to `finetune.json`."""

    train_examples: int
    eval_examples: int
    dropped: int
    truncated: int
    epochs: int
    method: str = "lora"
    kd_weight: float = 0.0
    temperature: float = 1.0
    kd_tokens: str = "response"
    """Positions of the KD term (`finetune.kd_tokens`)."""
    lr: float = 0.0
    """The peak learning rate used (`finetune.lr`, resolved)."""
    method_choice: dict[str, Any] | None = None
    """How `finetune.method` was chosen (`finescope_core.finetune_choice.MethodChoice`: requested, method,
    lr, predicted full-tuning need, budget, reason); None when the caller did not say."""
    steps: int = 0
    train_loss: list[float] = field(default_factory=list)
    """Mean mixed loss per response token at every optimiser step."""
    train_kd: list[float] = field(default_factory=list)
    """Mean KD term per KD position at every optimiser step (empty without KD)."""
    eval_loss_before: float | None = None
    """Held-out loss (cross entropy per response token) of the untuned model (None without a held-out
    split)."""
    eval_loss: list[float] = field(default_factory=list)
    """Held-out loss after every epoch."""
    best_epoch: int = 0
    """1-based epoch whose weights were saved: the lowest held-out loss (the last epoch without a
    held-out split)."""
    trainable_params: int = 0
    tokens: int = 0
    """Non-padding tokens processed in training."""
    seconds: float = 0.0
    adapter_dir: str | None = ""
    """The peft adapter; None for `method: full` (no adapter)."""
    merged_dir: str = ""
    """The tuned model as a plain transformers directory."""

    def to_dict(self) -> dict[str, Any]:
        rate = self.tokens / self.seconds if self.seconds > 0 else 0.0
        return asdict(self) | {"tokens_per_second": rate}
