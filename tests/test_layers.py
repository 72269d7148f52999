"""The architecture, checked: imports point down the layers and no module imports itself back.

Reads every import of the three packages from the source (function-local imports included, so
a cycle cannot hide inside a function). docs/architecture.md draws the same layers.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("gateway", "router", "monitors")

# module prefix -> prefixes it must never import (a prefix matches itself and its submodules)
FORBIDDEN: dict[str, tuple[str, ...]] = {
    "monitors": ("gateway", "router", "starlette", "redis"),
    "router": ("gateway", "starlette", "uvicorn"),
    "router.policy": ("router.state", "redis", "asyncio", "socket", "time", "os"),
    "gateway.errors": ("gateway", "router", "starlette"),
    "gateway.settings": ("gateway", "router", "starlette"),
    "gateway.serving": (
        "gateway.http", "gateway.background", "gateway.app", "gateway.cli", "router",
        "starlette", "uvicorn",
    ),
    "gateway.background": ("gateway.http", "gateway.app", "gateway.cli", "starlette", "uvicorn"),
    "gateway.http": ("gateway.app", "gateway.cli"),
}  # fmt: skip


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for pkg in PACKAGES for p in sorted((ROOT / pkg).rglob("*.py"))}


def imports(path: Path) -> Iterator[str]:
    """Every module a file imports, anywhere in it; ``from a import b`` yields ``a.b`` when
    ``a.b`` is a module of ours, else ``a``."""
    ours = modules()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module is not None and node.level == 0:
            for alias in node.names:
                sub = f"{node.module}.{alias.name}"
                yield sub if sub in ours else node.module


def within(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


LAYER_CASES = [(m, p) for m, p in modules().items() if any(within(m, k) for k in FORBIDDEN)]


@pytest.mark.parametrize(("module", "path"), LAYER_CASES, ids=[m for m, _ in LAYER_CASES])
def test_no_import_goes_up_a_layer(module: str, path: Path) -> None:
    rules = [k for k in FORBIDDEN if within(module, k)]
    bad = sorted(
        f"{module} imports {name} (forbidden for {rule})"
        for name in set(imports(path))
        for rule in rules
        for banned in FORBIDDEN[rule]
        if within(name, banned) and not within(name, module)
    )
    assert not bad, "\n".join(bad)


def test_no_import_cycle_between_modules() -> None:
    ours = modules()
    graph = {
        m: sorted({n for n in imports(p) if n in ours and n != m and not within(m, n)})
        for m, p in ours.items()
    }
    # Tarjan's strongly connected components: any component of two or more is a cycle.
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for v in graph:
        if v not in index:
            visit(v)
    assert not cycles, f"import cycles: {cycles}"


def test_the_checker_sees_function_local_imports(tmp_path: Path) -> None:
    source = tmp_path / "m.py"
    source.write_text("def f():\n    from router.state.table import RouteTable\n")
    assert "router.state.table" in set(imports(source))
