"""The package's shape, kept: layers without import circles, Oxen behind one door, each fact spelled once.

See ARCHITECTURE.md. These read the source (no imports run), so they take milliseconds.
"""

from __future__ import annotations

import ast
import re
from functools import cache
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "oxen_callbacks"
NAME = PACKAGE.name
MAX_FLOORS = 8
# Lower layers never import higher ones (a module may import its own layer and any below).
LAYERS = ["errors", "names", "_util", "_oxen", "model_repo", "lineage", "_data", "pin", "checkpoints",
          "_publish", "_mlflow", "_ops", "_lineage_html", "_run_checks", "_run_end", "run", "_preempt",
          "_lightning_io", "lightning", "huggingface", "ray", "cli"]


def _dotted(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


@cache
def _modules() -> dict[str, Path]:
    return {_dotted(p): p for p in PACKAGE.rglob("*.py")}


@cache
def _tree(module: str) -> ast.Module:
    return ast.parse(_modules()[module].read_text())


def _imports(module: str, *, at_import_only: bool = False) -> set[str]:
    """Every module this one imports: lazily in functions and for type checking too, unless
    ``at_import_only`` (then only what importing the module itself runs)."""
    is_package = _modules()[module].name == "__init__.py"
    found: set[str] = set()
    tree = _tree(module)
    for node in (tree.body if at_import_only else ast.walk(tree)):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = module.split(".")[: None if is_package else -1]
                parts = parts[: len(parts) - node.level + 1]
                base = ".".join(parts + ([base] if base else []))
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)
    return found


@cache
def _graph(at_import_only: bool = False) -> dict[str, set[str]]:
    modules = _modules()
    return {m: {d for d in _imports(m, at_import_only=at_import_only) if d in modules and d != m
                and not m.startswith(d + ".")} for m in modules}


def _layer(module: str) -> int:
    top = module.split(".")[1] if "." in module else ""
    return LAYERS.index(top) if top in LAYERS else -1


def test_no_import_circles() -> None:
    graph, state, circles = _graph(), {}, []

    def visit(module: str, stack: list[str]) -> None:
        state[module] = "open"
        for dep in sorted(graph[module]):
            if state.get(dep) == "open":
                circles.append(stack[stack.index(dep):] + [dep])
            elif dep not in state:
                visit(dep, stack + [dep])
        state[module] = "done"

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    assert not circles, f"import circles: {circles}"


def test_import_floors() -> None:
    """What importing a module loads stands at most MAX_FLOORS floors high. (Imports deferred into
    functions, which keep start-up light, reach further; the layer test above still holds them.)"""
    graph = _graph(at_import_only=True)

    @cache
    def floors(module: str) -> int:
        return 1 + max((floors(dep) for dep in graph[module]), default=0)

    deepest = max(graph, key=floors)
    assert floors(deepest) <= MAX_FLOORS, f"{deepest} sits on {floors(deepest)} floors of imports"


def test_every_module_has_a_layer() -> None:
    unplaced = [m for m in _modules() if m != NAME and _layer(m) < 0]
    assert not unplaced, f"add these to LAYERS (and ARCHITECTURE.md): {unplaced}"


def test_lower_layers_never_import_higher_ones() -> None:
    upward = [(m, d) for m, deps in _graph().items() for d in deps
              if m != NAME and _layer(d) > _layer(m) >= 0]
    assert not upward, f"imports that reach up a layer: {upward}"


def test_only_the_oxen_adapter_imports_oxenai() -> None:
    importers = [m for m in _modules() if any(d == "oxen" or d.startswith("oxen.") for d in _imports(m))]
    assert importers and all(m.startswith(f"{NAME}._oxen.") for m in importers), importers


def _string_literals(module: str) -> list[str]:
    tree = _tree(module)
    docstrings = {id(n.body[0].value) for n in ast.walk(tree)
                  if isinstance(n, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
                  and n.body and isinstance(n.body[0], ast.Expr) and isinstance(n.body[0].value, ast.Constant)}
    return [n.value for n in ast.walk(tree)
            if isinstance(n, ast.Constant) and isinstance(n.value, str) and id(n) not in docstrings]


def test_tags_and_run_paths_are_spelled_once() -> None:
    homes = {f"{NAME}.names", f"{NAME}.model_repo"}
    tag = re.compile(r"^oxen\.[a-z_]+")
    elsewhere = {m: hits for m in _modules() if m not in homes
                 if (hits := [s for s in _string_literals(m) if tag.match(s) or s.startswith("runs/")])}
    assert not elsewhere, f"tag names or runs/ paths outside names.py/model_repo.py: {elsewhere}"


def test_oxen_layout_is_known_only_to_the_oxen_adapter() -> None:
    elsewhere = {m: hits for m in _modules() if not m.startswith(f"{NAME}._oxen.")
                 if (hits := [s for s in _string_literals(m) if s == ".oxen" or s.startswith(".oxen/")])}
    assert not elsewhere, f"Oxen's private layout outside _oxen/: {elsewhere}"


def test_every_child_process_entry_point_is_a_main_function() -> None:
    from oxen_callbacks._util.processes import ENTRY_POINTS

    for name, module in ENTRY_POINTS.items():
        tree = _tree(module)
        functions = {n.name for n in tree.body if isinstance(n, ast.FunctionDef)}
        runs_main = any(isinstance(n, ast.If) and "__main__" in ast.unparse(n.test) for n in tree.body)
        assert "main" in functions and runs_main, f"{name}: {module} has no main() run under python -m"


def test_child_processes_are_started_only_through_the_entry_point_table() -> None:
    spawners = {m: [s for s in _string_literals(m) if s in ("-m", "-c")] for m in _modules()}
    assert {m for m, hits in spawners.items() if hits} == {f"{NAME}._util.processes"} or not any(
        hits for m, hits in spawners.items() if m != f"{NAME}._util.processes"), spawners
