"""The one error type of evaluation, in its own module so that every metric and loader can raise it."""

from __future__ import annotations


class EvalError(ValueError):
    """Bad evaluation input (an eval file, an item or a setting); the message names it and the fix."""
