"""The core library knows nothing of orchestration (docs/architecture.md, "Layers"), and nothing
imports in a cycle."""

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
            offenders += [
                f"{path.name}: {n}" for n in names if n.split(".")[0] in ("prefect", "tasks", "flows")
            ]
    assert offenders == []


def _imports(path: Path, modules: set[str]) -> set[str]:
    """Project modules `path` imports anywhere in it (module level or inside functions)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module, *(f"{node.module}.{a.name}" for a in node.names)]
        found |= {n for n in names if n in modules}
    return found


def test_no_import_cycles():
    """Not even through imports deferred into functions: a cycle means two modules that are one idea."""
    root = CORE.parent
    files = {
        ".".join(p.relative_to(root).with_suffix("").parts).removesuffix(".__init__"): p
        for pkg in ("finescope_core", "tasks", "flows")
        for p in (root / pkg).rglob("*.py")
    }
    graph = {name: _imports(path, set(files)) - {name} for name, path in files.items()}
    cycles = []

    def visit(node: str, stack: list[str]) -> None:
        for nxt in sorted(graph[node]):
            if nxt in stack:
                cycles.append(" -> ".join([*stack[stack.index(nxt) :], nxt]))
            elif nxt not in done:
                visit(nxt, [*stack, nxt])
        done.add(node)

    done: set[str] = set()
    for name in sorted(graph):
        if name not in done:
            visit(name, [name])
    assert cycles == []


def test_public_api_resolves_and_stays_lazy():
    """Every name `finescope_core` exports exists, and importing the package alone loads no torch."""
    import subprocess
    import sys

    import finescope_core

    for name in finescope_core.__all__:
        assert getattr(finescope_core, name) is not None, name
    code = "import sys, finescope_core; print('torch' in sys.modules, finescope_core.__version__)"
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout.split()
    assert out[0] == "False" and out[1] == finescope_core.__version__
