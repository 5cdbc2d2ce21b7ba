"""A hash of the source code that implements a stage, for its cache key.

A stage names the modules it is implemented by (its roots); the hash covers those and every module
of this package they import, found by reading their imports (nothing is imported to find them). It
is built from module names and file contents with line endings normalised, never from paths or
mtimes, so one version of the code hashes the same on every machine and install. Each file's hash
is cached per process by (path, size, mtime), so a key costs a few `stat` calls once warm.
"""

from __future__ import annotations

import ast
import hashlib
import importlib.util
import threading
from collections.abc import Iterable
from pathlib import Path

PACKAGE = "finescope_core"
EXCLUDED = {
    PACKAGE: "the package's lazy public API and version string: no stage behaviour",
    f"{PACKAGE}.config": "config values reach keys through each key model's fields; its code only validates",
    f"{PACKAGE}.progress": "the progress callback's protocol: reporting, never results",
    f"{PACKAGE}.store": "where artifacts are kept and how they are committed, never what a stage computes",
}
"""Modules of the package that never count towards a stage's code, and why."""

_FILES: dict[tuple[str, int, int], tuple[str, frozenset[str]]] = {}
_LOCK = threading.Lock()


def code_digest(roots: Iterable[str]) -> str:
    """Hash of the source of modules `roots` and of every package module they import (transitively)."""
    h = hashlib.sha256()
    for name in sorted(module_closure(roots)):
        h.update(f"{name}\0{_source(name)[0]}\n".encode())
    return h.hexdigest()


def module_closure(roots: Iterable[str]) -> set[str]:
    """`roots` and every package module they import, directly or not (`EXCLUDED` left out)."""
    seen: set[str] = set()
    todo = [r for r in roots if r not in EXCLUDED]
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        todo += [m for m in _source(name)[1] if m not in seen and m not in EXCLUDED]
    return seen


def _source(module: str) -> tuple[str, frozenset[str]]:
    """(sha256 of the module's normalised source, the package modules it imports)."""
    path = module_file(module)
    st = path.stat()
    key = (str(path), st.st_size, st.st_mtime_ns)
    with _LOCK:
        hit = _FILES.get(key)
    if hit is None:
        text = path.read_bytes().decode("utf-8").replace("\r\n", "\n")
        is_package = path.name == "__init__.py"
        hit = (hashlib.sha256(text.encode()).hexdigest(), frozenset(_imports(module, text, is_package)))
        with _LOCK:
            _FILES[key] = hit
    return hit


def module_file(module: str) -> Path:
    """The source file of a module (a package's `__init__.py`), found without importing it.

    Raises:
        ModuleNotFoundError: no such module, or one without Python source.
    """
    spec = importlib.util.find_spec(module)
    if spec is None or spec.origin is None or not spec.origin.endswith(".py"):
        raise ModuleNotFoundError(f"{module}: no Python source to hash for a stage's code identity")
    return Path(spec.origin)


def _imports(module: str, text: str, is_package: bool) -> set[str]:
    """Package modules a source imports, at any depth of the file (deferred imports included)."""
    package = module if is_package else module.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(text)):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = _absolute(package, node.module, node.level)
            found.add(base)
            # `from pkg import mod` imports a module; `from mod import name` only the module itself.
            found |= {f"{base}.{a.name}" for a in node.names if _is_module(f"{base}.{a.name}")}
    return {m for m in found if m == PACKAGE or m.startswith(PACKAGE + ".")}


def _absolute(package: str, name: str | None, level: int) -> str:
    if level == 0:
        return name or ""
    parts = package.split(".")
    base = ".".join(parts[: len(parts) - level + 1])
    return f"{base}.{name}" if name else base


def _is_module(name: str) -> bool:
    if not (name == PACKAGE or name.startswith(PACKAGE + ".")):
        return False
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False
