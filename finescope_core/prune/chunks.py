"""How many importance passes a model needs so its float32 gradient sums stay within a bound.

The Taylor scores need, per prunable weight, the gradient summed over every pruning batch before the
absolute value is taken, so an exact score needs one float32 sum per weight. Under bf16 those sums
alone are twice the model's bytes. Split the decoder layers into consecutive chunks instead and run
one pass (a forward and a backward down to the chunk's first layer, over all the pruning batches) per
chunk, with only that chunk's projections requiring grad: only one chunk's sums exist at a time, and
each weight's sum is exactly the one-pass sum (the same backward produces the same gradient).
"""

from __future__ import annotations

from collections.abc import Sequence

ACCUMULATOR_SHARE = 0.5
"""Of a lower-precision model's bytes, what one pass's float32 gradient sums may occupy. Under bf16 the
sums of all projections are about twice the model's bytes, so about four passes; a float32 model's
accumulator is its own `.grad` (one pass, as large as the projections)."""


def sums_limit(model_bytes: int, elem: int) -> int | None:
    """The bytes one pass's float32 sums may take for a model of `model_bytes` stored `elem` bytes per
    parameter: `ACCUMULATOR_SHARE` of it below float32, no bound (one pass) in float32."""
    return None if elem >= 4 else int(ACCUMULATOR_SHARE * model_bytes)


def layer_chunks(layer_bytes: Sequence[int], limit: int | None) -> list[range]:
    """Consecutive layer ranges, each as many layers as fit `limit` accumulator bytes (at least one).

    Args:
        layer_bytes: the float32 accumulator bytes of each decoder layer's projections, in order.
        limit: the most one chunk may take; None: all layers in one chunk.
    """
    if limit is None or not layer_bytes:
        return [range(len(layer_bytes))]
    chunks: list[range] = []
    start, held = 0, 0
    for i, size in enumerate(layer_bytes):
        if i > start and held + size > limit:
            chunks.append(range(start, i))
            start, held = i, 0
        held += size
    chunks.append(range(start, len(layer_bytes)))
    return chunks
