"""Content identities that cache keys are built from: files, model directories and hub revisions.

A key must change whenever what it stands for changes, so nothing here is keyed by a path alone:
a file's digest is cached per process by (path, size, mtime), and a large file's full sha256 is
also kept on disk between runs, trusted only while its size, mtime and first bytes (a safetensors
file's header) are unchanged, so a 16 GB checkpoint is read in full once, not on every run.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import threading
from pathlib import Path

LARGE_FILE = 64 * 2**20
"""Files of at least this many bytes keep their sha256 in the on-disk cache."""
HEAD_BYTES = 2**20
"""How much of a file that is not safetensors its cache entry checks."""
CACHE_ENV = "FINESCOPE_DIGEST_CACHE"
"""Environment variable naming the on-disk digest cache's directory."""

_DIGESTS: dict[tuple[str, int, int], str] = {}
_DIGESTS_LOCK = threading.Lock()


class HubRevisionError(ValueError):
    """A hub model id that cannot be resolved to a commit."""


def file_digest(path: Path) -> str:
    """sha256 of a file's content; cached per process by (path, size, mtime), never by path alone."""
    st = path.stat()
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    with _DIGESTS_LOCK:
        hit = _DIGESTS.get(key)
    if hit is not None:
        return hit
    digest = _large_file_digest(path, st) if st.st_size >= LARGE_FILE else _sha256(path)
    with _DIGESTS_LOCK:
        _DIGESTS[key] = digest
    return digest


def directory_digest(root: Path) -> str:
    """Hash of every file under `root` (relative path and content), tokenizer and template files included.

    Hidden files and directories (`.git`, the `.cache` that hub downloads leave behind) are left out:
    they hold bookkeeping that changes without the model changing.
    """
    files = sorted(p for p in root.rglob("*") if p.is_file() and not _hidden(p.relative_to(root)))
    h = hashlib.sha256()
    for p in files:
        h.update(f"{p.relative_to(root).as_posix()}\0{file_digest(p)}\n".encode())
    return h.hexdigest()


def _hidden(rel: Path) -> bool:
    return any(part.startswith(".") for part in rel.parts)


def _sha256(path: Path) -> str:
    with path.open("rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def digest_cache_dir() -> Path:
    """Where full digests of large files are kept between runs: `$FINESCOPE_DIGEST_CACHE`, else the
    user cache directory (`$XDG_CACHE_HOME/finescope/digests`)."""
    if env := os.environ.get(CACHE_ENV):
        return Path(env).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "finescope" / "digests"


def _large_file_digest(path: Path, st: os.stat_result) -> str:
    """The full sha256, from the on-disk cache when the entry still matches the file."""
    resolved = str(path.resolve())
    entry_path = digest_cache_dir() / (hashlib.sha256(resolved.encode()).hexdigest() + ".json")
    stamp = {"path": resolved, "size": st.st_size, "mtime_ns": st.st_mtime_ns, "head": _head_digest(path)}
    try:
        entry = json.loads(entry_path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        entry = None
    if (
        isinstance(entry, dict)
        and {k: entry.get(k) for k in stamp} == stamp
        and isinstance(entry.get("sha256"), str)
    ):
        return str(entry["sha256"])
    digest = _sha256(path)
    _write_entry(entry_path, {**stamp, "sha256": digest})
    return digest


def _head_digest(path: Path) -> str:
    """Hash of a file's header: a safetensors file's size prefix and JSON header (tensor names, dtypes,
    shapes, offsets), else its first `HEAD_BYTES`; a changed header means changed weights."""
    with path.open("rb") as f:
        prefix = f.read(8)
        n = int.from_bytes(prefix, "little") if path.suffix == ".safetensors" and len(prefix) == 8 else 0
        body = f.read(n if 0 < n <= 100 * 2**20 else HEAD_BYTES - len(prefix))
    return hashlib.sha256(prefix + body).hexdigest()


def _write_entry(entry_path: Path, entry: dict[str, object]) -> None:
    """Write a cache entry atomically; a cache that cannot be written (read-only home) is only slower."""
    tmp = entry_path.with_name(f"{entry_path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    try:
        entry_path.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(json.dumps(entry), encoding="utf-8")
        os.replace(tmp, entry_path)
    except OSError:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)


@functools.lru_cache(maxsize=32)
def hub_revision(repo_id: str) -> str:
    """The commit a hub model id's default branch points at, resolved once per process.

    Asks the hub unless offline (`HF_HUB_OFFLINE`), which is also what loading the model fetches;
    offline or when the hub cannot be reached, the local HF cache's `refs/main` answers, as it does
    for loading.

    Raises:
        HubRevisionError: neither the hub nor the local cache knows the id.
    """
    from huggingface_hub import HfApi, constants

    reason = "HF_HUB_OFFLINE is set"
    if not constants.is_offline_mode():
        try:
            sha = HfApi().model_info(repo_id).sha
            if sha:
                return sha
            reason = "the hub gave no commit"
        except Exception as e:  # unreachable hub, unknown id, gated repo: the cache may still know it
            reason = f"the hub could not be asked ({type(e).__name__}: {e})"
    cached = cached_revision(repo_id)
    if cached is not None:
        return cached
    raise HubRevisionError(
        f"model {repo_id!r}: a hub model is keyed by its commit, and this one could not be resolved: "
        f"{reason}, and the local HF cache ({constants.HF_HUB_CACHE}) has no refs/main for it. "
        "Download it once while online "
        f"(`hf download {repo_id}`), or give the path of a local model directory instead"
    )


def cached_revision(repo_id: str, ref: str = "main") -> str | None:
    """The commit the local HF cache records for `repo_id`'s `ref`, or None."""
    from huggingface_hub import constants
    from huggingface_hub.file_download import repo_folder_name

    path = Path(constants.HF_HUB_CACHE) / repo_folder_name(repo_id=repo_id, repo_type="model") / "refs" / ref
    try:
        return path.read_text(encoding="utf-8").strip() or None
    except OSError:
        return None
