"""The package's shape, checked on its source: the runtime stands alone, modules keep their private names to
themselves, and no two modules import each other (not even lazily, inside a function)."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "tpcompile"


def _modules() -> dict[str, Path]:
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = path
    return out


MODULES = _modules()


def _imports(name: str, path: Path) -> list[tuple[str, list[str], int]]:
    """(module imported, names taken from it, line) for every import in the file, at any depth."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found += [(alias.name, [], node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            names = [alias.name for alias in node.names]
            # ``from pkg import module`` imports the module itself
            subs = [f"{base}.{n}" for n in names if f"{base}.{n}" in MODULES]
            found += [(s, [], node.lineno) for s in subs]
            found.append((base, [n for n in names if f"{base}.{n}" not in MODULES], node.lineno))
    return [f for f in found if f[0] == "tpcompile" or f[0].startswith("tpcompile.")]


def test_runtime_imports_nothing_from_the_compiler() -> None:
    offenders = [
        f"{name}:{line} imports {target}"
        for name, path in MODULES.items()
        if name.startswith("tpcompile.runtime")
        for target, _, line in _imports(name, path)
        if not target.startswith("tpcompile.runtime")
    ]
    assert offenders == []


def test_no_private_name_is_imported_from_another_module() -> None:
    offenders = [
        f"{name}:{line} imports {n} from {target}"
        for name, path in MODULES.items()
        for target, names, line in _imports(name, path)
        for n in names
        if n.startswith("_") and not n.startswith("__") and target != name
    ]
    assert offenders == []


def test_no_import_circles() -> None:
    graph = {
        name: {t for t, _, _ in _imports(name, path) if t in MODULES and t != name}
        for name, path in MODULES.items()
    }
    # a package's __init__ importing its own submodules (to register or re-export them) is not a circle
    for name in graph:
        graph[name] = {
            t for t in graph[name] if not (t.startswith(name + ".") and MODULES[name].name == "__init__.py")
        }
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    circles: list[list[str]] = []

    def visit(v: str) -> None:  # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                circles.append(sorted(component))

    for v in graph:
        if v not in index:
            visit(v)
    assert circles == []
