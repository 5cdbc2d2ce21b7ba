"""The one error type of pruning, in its own module so that every step can raise it without cycles."""

from __future__ import annotations


class PruneError(ValueError):
    """A pruning request that cannot be met; the message says what would work."""
