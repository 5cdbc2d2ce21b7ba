"""The core library knows nothing of orchestration (CONVENTIONS.md habit 1)."""

import ast
from pathlib import Path

CORE = Path(__file__).resolve().parents[1] / "finescope_core"


def test_core_never_imports_prefect():
    offenders = []
    for path in CORE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            if isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            offenders += [f"{path.name}: {n}" for n in names if n.split(".")[0] in ("prefect", "tasks", "flows")]
    assert offenders == []
