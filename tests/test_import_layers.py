"""The import graph of kd_lightning/ follows the layer order of docs/architecture.md: no cycle, and no module
imports a layer above its own (parsed from the source, so it cannot drift unnoticed)."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "kd_lightning"
#: Bottom to top, as docs/architecture.md writes it; a module may import its own layer and those below.
LAYERS = [
    "engine",
    "models",
    "losses",
    "data",
    "llm",
    "teacher_inputs",
    "teacher",
    "methods",
    "callbacks",
    "reporting",
    "recipes",
    "cli",
]


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports() -> dict[str, set[str]]:
    """``{module: the kd_lightning modules it imports}`` (relative imports resolved, ``TYPE_CHECKING`` included)."""
    graph: dict[str, set[str]] = {}
    for path in PACKAGE.rglob("*.py"):
        name = module_name(path)
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        targets = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parent = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join([*parent, base] if base else parent)
                targets.add(base)
            elif isinstance(node, ast.Import):
                targets |= {alias.name for alias in node.names}
        graph[name] = {t for t in targets if t.startswith("kd_lightning.") and t != name}
    return graph


def layer(module: str) -> int | None:
    parts = module.split(".")
    return LAYERS.index(parts[1]) if len(parts) > 1 and parts[1] in LAYERS else None


def test_no_module_imports_a_layer_above_its_own() -> None:
    upward = sorted(
        f"{module} -> {target}"
        for module, targets in imports().items()
        for target in targets
        if layer(module) is not None and layer(target) is not None and layer(target) > layer(module)
    )
    assert not upward, upward


def test_every_module_belongs_to_a_layer() -> None:
    assert not [m for m in imports() if m != "kd_lightning" and layer(m) is None]


def test_the_import_graph_has_no_cycle() -> None:
    graph = imports()
    modules = {m: {t for t in ts if t in graph or any(g.startswith(t + ".") for g in graph)} for m, ts in graph.items()}
    state: dict[str, int] = {}

    def visit(module: str, path: list[str]) -> None:
        state[module] = 1
        for target in sorted(modules.get(module, ())):
            if target.endswith("__init__") or target not in modules:
                continue
            if state.get(target) == 1:
                raise AssertionError(" -> ".join([*path, module, target]))
            if not state.get(target):
                visit(target, [*path, module])
        state[module] = 2

    for module in sorted(modules):
        if not state.get(module):
            visit(module, [])
