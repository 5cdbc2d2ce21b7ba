"""Guards on raw configuration input, applied before any field is resolved or validated.

* **YAML aliases are refused.** An alias (`*name`) makes the parser share one node many times; nested
  aliases grow exponentially ("billion laughs": 355 bytes expanding to gigabytes when a path field is
  walked). No finescope config needs them, so the loader refuses the first alias with its line instead
  of bounding the expansion.
* **Credentials inside a URI are refused** (`s3://KEY:SECRET@bucket`, `http://user:pw@host/...`): a
  config is saved in run.json, shell history and the Prefect database. `redact_uri` blanks the
  user-info part of any URI that reaches a message.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

import yaml

CREDENTIALS_FIX = (
    "credentials are never read from a URI (the config is saved in run.json, shell history and the Prefect "
    "database); remove the user:password@ part and export AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY (or "
    'the service\'s own variables), or save a Prefect Secret block with {"key": ..., "secret": ...} and '
    "name it in storage.secret_block"
)
"""What a user with credentials in a URI should do instead."""

# scheme://userinfo@rest. The user-info part holds no '/', '?' or '#' (RFC 3986), except that a secret
# with an unescaped '/' still reads as credentials when a ':' precedes it (`s3://KEY:SE/CRET@bucket`).
_URI = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*://)(?P<userinfo>[^\s@/?#]*:[^\s@]*|[^\s@/?#:]+)@")


class AliasError(yaml.YAMLError):
    """A YAML alias in a config (refused: see the module docstring)."""


class _NoAliasLoader(yaml.SafeLoader):
    """`yaml.SafeLoader` that refuses aliases while composing, before any node is constructed."""

    def compose_node(self, parent: Any, index: Any) -> Any:
        if self.check_event(yaml.AliasEvent):  # type: ignore[no-untyped-call]
            event = self.peek_event()  # type: ignore[no-untyped-call]
            mark = event.start_mark
            raise AliasError(
                f"line {mark.line + 1}, column {mark.column + 1}: YAML alias *{event.anchor} is not accepted "
                "(aliases can expand without bound); write the value out instead"
            )
        return super().compose_node(parent, index)


def safe_load(text: str) -> Any:
    """`yaml.safe_load` without aliases.

    Raises:
        AliasError: the text uses an alias (naming its line); other `yaml.YAMLError`s as `safe_load`.
    """
    loader = _NoAliasLoader(text)
    try:
        return loader.get_single_data()
    finally:
        loader.dispose()  # type: ignore[no-untyped-call]


def has_credentials(value: str) -> bool:
    """Whether `value` is (or contains) a URI with a user-info part (`scheme://user[:password]@host`)."""
    return _URI.search(value) is not None


def redact_uri(value: str) -> str:
    """`value` (a URI, or a message holding URIs) with every URI's user-info part replaced by `***`."""
    return _URI.sub(lambda m: f"{m.group('scheme')}***@", value)


def _strings(value: Any, where: str) -> Iterator[tuple[str, str]]:
    if isinstance(value, str):
        yield where, value
    elif isinstance(value, dict):
        for key, item in value.items():
            yield from _strings(item, f"{where}.{key}" if where else str(key))
    elif isinstance(value, list | tuple):
        for i, item in enumerate(value):
            yield from _strings(item, f"{where}[{i}]")


def check_no_credentials(raw: Any) -> None:
    """Refuse a raw config (any depth) holding a URI with credentials, naming the field, the value redacted.

    Raises:
        ValueError: the first such field.
    """
    for where, value in _strings(raw, ""):
        if has_credentials(value):
            raise ValueError(f"{where or 'value'} = {redact_uri(value)!r}: {CREDENTIALS_FIX}")
