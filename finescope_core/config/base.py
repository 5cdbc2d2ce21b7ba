"""What every config section shares: the strict base model (unknown fields are errors) and the
markers of path fields, which the loader resolves against the config file's directory."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict

PATH: dict[str, Any] = {"path": "always"}
"""Field marker: a file/directory path; relative ones in a config file are resolved against its directory."""
NAME_OR_PATH: dict[str, Any] = {"path": "if-exists"}
"""Field marker: a keyword or hub id, or a local path (resolved against the config file's directory when
that path exists there)."""


def one_or_many(cls: type, value: Any) -> Any:
    """A list-of-files field given one file as a plain string: that file alone."""
    return [value] if isinstance(value, str) else value


class Strict(BaseModel):
    """Base: unknown fields are errors (a typo must not silently fall back to a default)."""

    # hide_input_in_errors: a refused value (a URI with credentials) must not be echoed into an error
    # message, which Prefect stores with the failed run.
    model_config = ConfigDict(
        extra="forbid", use_attribute_docstrings=True, validate_assignment=True, hide_input_in_errors=True
    )
