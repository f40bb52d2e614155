"""The package's modules import one way: no cycle, and nothing on the averaging path imports the
user-facing classes above it (README, "How it works")."""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "wavg_fused"
# the averaging path, bottom to top; none of them may import the facades
ENGINE_PATH = ["storage", "sharded", "slots", "watch", "plan", "shadow", "guard", "engine"]
FACADES = {"averager", "group", "swa_utils", "blog", "optim", "checkpoint", "swap_state", "integrations", "posthoc"}


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> set[str]:
    """Package-internal modules ``path`` imports, anywhere in the file (function-level too)."""
    here = _module_name(path).split(".") if _module_name(path) else []
    package = here if path.name == "__init__.py" else here[:-1]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level:
            base = package[: len(package) - node.level + 1]
            target = ".".join(base + ([node.module] if node.module else []))
            names = [target] if node.module else [".".join(base + [alias.name]) for alias in node.names]
            found.update(n for n in names if n and (PACKAGE / n.replace(".", "/")).with_suffix(".py").exists()
                         or (PACKAGE / n.replace(".", "/") / "__init__.py").exists())
    return found


def _graph() -> dict[str, set[str]]:
    return {_module_name(p): _imports(p) for p in PACKAGE.rglob("*.py")}


def test_no_import_cycle():
    graph = _graph()
    state: dict[str, int] = {}

    def visit(node: str, trail: list[str]) -> None:
        state[node] = 1
        for target in graph.get(node, ()):
            if state.get(target) == 1:
                raise AssertionError("import cycle: " + " -> ".join(trail[trail.index(target):] + [target]))
            if target not in state:
                visit(target, trail + [target])
        state[node] = 2

    for node in graph:
        if node not in state:
            visit(node, [node])


@pytest.mark.parametrize("module", ENGINE_PATH)
def test_the_averaging_path_does_not_import_the_classes_above_it(module):
    imported = {name.split(".")[0] for name in _imports(PACKAGE / f"{module}.py")}
    assert not imported & FACADES, f"{module} imports {sorted(imported & FACADES)}"
    below = set(ENGINE_PATH[: ENGINE_PATH.index(module)])
    upward = {m for m in imported & set(ENGINE_PATH) if m not in below}
    assert not upward, f"{module} imports {sorted(upward)}, which lie above it"


def test_the_graph_sees_function_level_imports():
    """The checker itself: storage.pack_module once imported sharded inside the function."""
    assert "storage" in _imports(PACKAGE / "sharded.py")
    assert "engine" in _imports(PACKAGE / "averager.py")


def test_post_hoc_ema_sits_on_top():
    """Only the package imports posthoc; its math and files are its own, and import no facade."""
    graph = _graph()
    importers = {module for module, targets in graph.items() if "posthoc" in targets}
    assert importers <= {""}, f"{sorted(importers)} import posthoc"
    for helper in ("posthoc_math", "posthoc_snapshots"):
        assert {m for m, targets in graph.items() if helper in targets} <= {"posthoc"}
        assert not {name.split(".")[0] for name in graph[helper]} & FACADES
