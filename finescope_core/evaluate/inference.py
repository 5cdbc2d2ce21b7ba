"""How every metric runs the model: on its own device, in eval mode, without autograd."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

DEFAULT_BATCH_SIZE = 8


def model_device(model: nn.Module) -> torch.device:
    """The device of the model's (first) parameters, where its inputs must go."""
    return next(model.parameters()).device


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """Disable dropout for the evaluation (a freshly tuned model may be in train mode), then restore."""
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            yield
    finally:
        model.train(was_training)
