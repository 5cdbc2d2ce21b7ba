"""The `prune` section: structured pruning guided by the curated data."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from finescope_core.config.base import NAME_OR_PATH, Strict


class PruneConfig(Strict):
    """Structured pruning guided by the curated data (paper §3.2.1)."""

    ratio: float = Field(0.3, ge=0, lt=1)
    """Removed parameters / all parameters of the original model. The `prune` and `run` flows refuse 0:
    it would export the unpruned model as `pruned-model/`."""
    importance: Literal["taylor", "vector", "magnitude"] = "taylor"
    """Group importance: element-wise first-order Taylor |w*dL/dw| summed over the group (LLM-Pruner
    `element`), the `vector` variant |sum(w*dL/dw)|, or weight magnitude (no data)."""
    data: str = Field("curated", json_schema_extra=NAME_OR_PATH)
    """Pruning data: `curated` (D_s), `random` (a corpus sample of the same size), or a file/URI."""
    attention: Literal["heads", "kv_groups"] = "heads"
    """Attention unit: query heads (the same number per KV group) or whole KV groups."""
    widths: Literal["importance", "proportional"] = "importance"
    """How the common widths are chosen: among those within 2 points of the ratio, the one whose removed
    groups carry the least importance; or attention and MLP cut by the same fraction (LLM-Pruner)."""
    max_length: int = Field(128, ge=4)
    """Tokens per pruning sample."""
    batch_size: int = Field(4, ge=1)
    """Samples per backward pass."""
