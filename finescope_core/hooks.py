"""Capture decoder-layer outputs with forward hooks, optionally stopping the forward pass early.

The captured tensor is what a decoder layer returns: the residual stream after that layer. We do not
use `output_hidden_states`, whose last entry is taken after the final norm in HF Llama/Qwen and so is
not comparable with the others.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from torch import Tensor, nn

from finescope_core.model import DecoderArch

Reduce = Callable[[Tensor], Tensor]


class LayerSelectionError(ValueError):
    """The requested layer indices do not fit the model; the message names them."""


class _StopForward(Exception):
    """Raised by the deepest hook to abandon the rest of the forward pass (later layers, norm, lm_head)."""


def resolve_layers(layers: Sequence[int], num_layers: int, *, setting: str = "layers") -> list[int]:
    """Normalise decoder layer indices (negative counts from the end) and check them, keeping their order.

    The one place layer indices are checked. A repeated layer is refused, not dropped: a typo in a
    config (`[-1, 11]` on a 12-layer model) must not silently shrink the set of hooked layers.

    Args:
        layers: decoder layer indices.
        num_layers: decoder layers of the model.
        setting: what the caller's user calls `layers` (e.g. "curate.layers"), named in errors.

    Raises:
        LayerSelectionError: empty list, an index out of range, or the same layer twice.
    """
    if not layers:
        raise LayerSelectionError(f"no layers requested in {setting}; give at least one decoder layer index")
    out: list[int] = []
    for layer in layers:
        if not -num_layers <= layer < num_layers:
            raise LayerSelectionError(
                f"{setting} contains {layer}, which is out of range: the model has {num_layers} layers "
                f"(valid: 0..{num_layers - 1} or -{num_layers}..-1)"
            )
        idx = layer % num_layers
        if idx in out:
            first = layers[out.index(idx)]
            raise LayerSelectionError(
                f"{setting} {list(layers)} names decoder layer {idx} twice (as {first} and {layer}); "
                "list each layer once"
            )
        out.append(idx)
    return out


class LayerCapture:
    """Live capture of some decoder layers' outputs; obtained from `capture_layers`.

    Attributes:
        layers: normalised layer indices, in the order results are returned.
        stop_early: whether the pass is abandoned after the deepest requested layer.
    """

    def __init__(self, layers: list[int], stop_early: bool) -> None:
        self.layers = layers
        self.stop_early = stop_early
        self._deepest = max(layers)
        self._reduce: Reduce | None = None
        self._captured: dict[int, Tensor] = {}

    def hook(self, layer: int) -> Callable[[nn.Module, Any, Any], None]:
        """The forward hook to register on decoder layer `layer`."""

        def record(module: nn.Module, args: Any, output: Any) -> None:
            hidden = output[0] if isinstance(output, tuple) else output
            assert isinstance(hidden, Tensor), f"layer {layer} returned {type(hidden).__name__}"
            self._captured[layer] = hidden if self._reduce is None else self._reduce(hidden)
            if self.stop_early and layer == self._deepest:
                raise _StopForward

        return record

    def run(self, forward: Callable[[], Any], reduce: Reduce | None = None) -> list[Tensor]:
        """Call `forward()` (a model call) and return the captured outputs, one per layer in `self.layers`.

        Args:
            forward: runs the model once, e.g. `lambda: arch.backbone(inputs_embeds=e, attention_mask=m)`.
            reduce: applied to each layer's [B, T, d] output inside the hook (e.g. pooling), so only the
                reduced tensor is kept alive.

        Returns:
            Captured tensors ([B, T, d], or whatever `reduce` returns), ordered like `self.layers`.
        """
        self._captured = {}
        self._reduce = reduce
        try:
            forward()
        except _StopForward:
            pass
        finally:
            self._reduce = None
        captured, self._captured = self._captured, {}
        missing = [layer for layer in self.layers if layer not in captured]
        assert not missing, f"the forward pass never reached layers {missing}"
        return [captured[layer] for layer in self.layers]


@contextmanager
def capture_layers(
    arch: DecoderArch, layers: Sequence[int], *, stop_early: bool = True
) -> Iterator[LayerCapture]:
    """Register output hooks on `layers` of a decoder for the duration of the block.

    Example:
        with capture_layers(arch, [3, 7]) as cap:
            h3, h7 = cap.run(lambda: arch.backbone(input_ids=ids, attention_mask=mask))

    Args:
        arch: the resolved decoder (`model.resolve_arch`).
        layers: decoder layer indices (negative counts from the end).
        stop_early: abandon the pass after the deepest requested layer, so no later layer, final norm or
            lm_head runs. The model's return value is then unavailable: use the captured tensors.

    Yields:
        LayerCapture whose `run` performs one forward pass and returns the captured outputs.
    """
    capture = LayerCapture(resolve_layers(layers, arch.num_layers), stop_early)
    handles = []
    try:
        for layer in capture.layers:
            handles.append(arch.layers[layer].register_forward_hook(capture.hook(layer)))
        yield capture
    finally:
        for handle in handles:
            handle.remove()
