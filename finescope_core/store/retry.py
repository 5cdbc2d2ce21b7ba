"""Retrying calls to a remote store: which errors are transient, and a bounded exponential backoff."""

from __future__ import annotations

import contextlib
import errno
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

log = logging.getLogger("finescope.store")


def _transient_types() -> tuple[type[BaseException], ...]:
    """Exception types that mean "the storage service did not answer", whatever the client library."""
    types: list[type[BaseException]] = [ConnectionError, TimeoutError]
    with contextlib.suppress(ImportError):
        from fsspec.exceptions import FSTimeoutError

        types.append(FSTimeoutError)
    with contextlib.suppress(ImportError):
        from botocore.exceptions import ConnectionError as BotoConnectionError
        from botocore.exceptions import HTTPClientError

        types += [BotoConnectionError, HTTPClientError]
    with contextlib.suppress(ImportError):
        from aiohttp import ClientConnectionError, ClientPayloadError

        types += [ClientConnectionError, ClientPayloadError]
    return tuple(types)


TRANSIENT_TYPES = _transient_types()
# s3fs maps 5xx answers to these errno values (InternalError: EREMOTEIO, ServiceUnavailable/SlowDown: EBUSY).
TRANSIENT_ERRNOS = {
    getattr(errno, "EREMOTEIO", errno.EIO),
    errno.EBUSY,
    errno.EAGAIN,
    errno.ETIMEDOUT,
    errno.ECONNRESET,
    errno.ECONNREFUSED,
    errno.ECONNABORTED,
}


def is_transient(error: BaseException) -> bool:
    """Whether retrying may help: connection trouble, timeouts and 5xx.

    Never bad credentials, permission or not-found: retrying cannot change those."""
    if isinstance(
        error, PermissionError | FileNotFoundError | FileExistsError | IsADirectoryError | NotADirectoryError
    ):
        return False
    if isinstance(error, TRANSIENT_TYPES):
        return True
    status = getattr(error, "response", None)
    if isinstance(status, dict):  # botocore ClientError not translated by the filesystem
        return int(status.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)) >= 500
    if isinstance(error, OSError) and error.errno in TRANSIENT_ERRNOS:
        return True
    cause = error.__cause__
    return cause is not None and cause is not error and is_transient(cause)


@dataclass(frozen=True)
class RetryPolicy:
    """Bounded exponential backoff for transient storage errors."""

    attempts: int = 6
    """Tries in all (1: no retry); the defaults ride out about half a minute of outage."""
    first_delay: float = 1.0
    """Seconds before the second try; doubled after each failure."""
    max_delay: float = 16.0
    """Cap on one wait."""

    def call(self, what: str, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """`fn(*args, **kwargs)`, retried while it fails with a transient error and tries are left.

        Args:
            what: the operation, for the log line of each retry.
        Returns:
            What `fn` returns; the last error is raised once the tries are spent.
        """
        delay = self.first_delay
        for attempt in range(1, self.attempts + 1):
            try:
                return fn(*args, **kwargs)
            except Exception as e:
                if attempt == self.attempts or not is_transient(e):
                    raise
                log.warning(
                    "%s failed (%s: %s); retry %d/%d in %.1fs",
                    what,
                    type(e).__name__,
                    e,
                    attempt,
                    self.attempts - 1,
                    delay,
                )
                time.sleep(delay)
                delay = min(delay * 2, self.max_delay)
        raise AssertionError("unreachable")
