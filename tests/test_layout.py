"""The package's import structure: no import circles, and arrows point down (tools and training sit on top of
the runtime; nothing below imports them). Lazy imports inside functions count; `if TYPE_CHECKING:` blocks do not."""

from __future__ import annotations

import ast
import os

PACKAGE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "mcore_transformers")
TOP = ("tools", "training")  # wings that may import everything below them, and that nothing below imports
MODALITIES = ("multimodal",)  # beside the text model: built on the runtime, which never imports them
BELOW = ("model", "conversion", "runtime", "architectures", "peft")


def _modules() -> dict[str, str]:
    modules = {}
    for folder, _, files in os.walk(PACKAGE):
        for name in files:
            if name.endswith(".py"):
                path = os.path.join(folder, name)
                dotted = os.path.relpath(path, os.path.dirname(PACKAGE))[:-3].replace(os.sep, ".")
                modules[dotted.removesuffix(".__init__")] = path
    return modules


def _imports(module: str, path: str, modules: dict[str, str]) -> set[str]:
    tree = ast.parse(open(path).read())
    skipped = {id(node) for node in ast.walk(tree) if isinstance(node, ast.If)
               and isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING"
               for node in ast.walk(node)}
    package = module.split(".") if path.endswith("__init__.py") else module.split(".")[:-1]
    found = set()
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.ImportFrom):
            base = ".".join(package[: len(package) - node.level + 1] + ([node.module] if node.module else [])) \
                if node.level else node.module
            for alias in node.names:
                target = f"{base}.{alias.name}"
                found.add(target if target in modules else base)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
    return {target for target in found if target in modules and target != module}


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {module: _imports(module, path, modules) for module, path in modules.items()}


def _wing(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 2 or (len(parts) == 2 and parts[1] in TOP + MODALITIES + BELOW) else ""


def test_no_import_circles():
    graph = _graph()
    index, low, stack, on_stack, circles = {}, {}, [], set(), []

    def visit(node):  # Tarjan's strongly connected components
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in graph[node]:
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                circles.append(sorted(component))

    for node in graph:
        if node not in index:
            visit(node)
    assert circles == [], f"import circles: {circles}"


def test_runtime_does_not_import_tools_or_training():
    wrong = [(module, target) for module, targets in _graph().items() for target in targets
             if _wing(module) in BELOW and _wing(target) in TOP]
    assert wrong == [], f"the runtime imports a wing on top of it: {wrong}"


def test_the_runtime_does_not_import_a_modality_and_modalities_do_not_import_tools():
    graph = _graph()
    wrong = [(module, target) for module, targets in graph.items() for target in targets
             if (_wing(module) in BELOW and _wing(target) in MODALITIES)
             or (_wing(module) in MODALITIES and _wing(target) in TOP)]
    assert wrong == [], f"imports against the direction runtime ← modality ← tools: {wrong}"
