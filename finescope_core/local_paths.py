"""Why a local path that does not resolve is missing: a plain absence, a broken symlink, or a symlink loop.

`Path.exists()` is False in all three cases; a user who made a symlink loop must be told so, not sent
looking for a file that is there.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path


def missing_reason(path: str | Path) -> str:
    """What to tell the user about a local `path` that does not resolve to an existing file or directory.

    Returns:
        "a symlink loop (...)", "a broken symlink (-> target)", or "no such file or directory".
    """
    try:
        os.stat(path)
    except OSError as e:
        if e.errno == errno.ELOOP:
            return f"a symlink loop ({e.strerror}); point the link at a real file or directory"
    if os.path.islink(path):
        return f"a broken symlink (-> {os.readlink(path)}); point the link at an existing file or directory"
    return "no such file or directory"
