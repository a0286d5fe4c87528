"""The house stays easy to change: model code imports no UI or training code, and no import cycles."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import levante

SRC = Path(levante.__file__).parent


def test_model_code_imports_no_cli_training_or_distributed_code():
    code = ("import sys, levante.model.transformer; "
            "print(' '.join(m for m in ('rich', 'typer', 'levante.train', 'levante.cli', 'levante.parallel', "
            "'torch.distributed.fsdp', 'transformers') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == ""


def module_name(path: Path) -> str:
    parts = path.relative_to(SRC.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_time_edges(modules: set[str]) -> dict[str, set[str]]:
    """Module -> modules it imports when it is imported: top-level imports (not those inside
    functions) and the packages above them (importing a.b.c runs a/__init__ and a/b/__init__), except
    packages above the importer itself, which are already being imported when it runs."""
    edges: dict[str, set[str]] = {}
    for path in SRC.rglob("*.py"):
        name = module_name(path)
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        targets = set()
        for node in ast.parse(path.read_text(encoding="utf-8")).body:  # top level only
            if isinstance(node, ast.Import):
                targets.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:  # relative: from the package, `level - 1` packages up
                    up = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(up + ([base] if base else []))
                targets.add(base)
                targets.update(f"{base}.{alias.name}" for alias in node.names)
        own = {".".join(name.split(".")[:i]) for i in range(1, len(name.split(".")) + 1)}
        resolved = set()
        for target in targets:
            parts = target.split(".")
            for i in range(1, len(parts) + 1):  # a.b.c imports a, a.b and a.b.c
                if ".".join(parts[:i]) in modules:
                    resolved.add(".".join(parts[:i]))
        edges[name] = resolved - own
    return edges


def test_no_import_cycle_in_the_package():
    modules = {module_name(p) for p in SRC.rglob("*.py")}
    edges = import_time_edges(modules)
    assert "levante.cli.model" in edges and "levante.model.moe" in edges["levante.model.block"]

    state: dict[str, int] = {}  # 1 = on the current path, 2 = done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        state[node] = 2
        path.pop()
        return None

    for module in sorted(edges):
        if module not in state and (cycle := visit(module)):
            raise AssertionError("import cycle: " + " -> ".join(cycle))
