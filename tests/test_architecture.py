"""The package's shape, as docs/architecture.md states it: modules import only modules below them
(function-level imports included, so no cycle), nothing imports the package root, and no function
grows past 100 lines."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "dictionary_learning"
MAX_FUNCTION_LINES = 100


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in PACKAGE.rglob("*.py")}


def imported_modules(name: str) -> set[str]:
    """The package's modules that `name` imports anywhere in its file (also inside functions);
    imports under `if TYPE_CHECKING:` never run and do not count."""
    path = MODULES[name]
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    tree = ast.parse(path.read_text())
    type_only = {
        id(node)
        for branch in ast.walk(tree)
        if isinstance(branch, ast.If) and "TYPE_CHECKING" in ast.unparse(branch.test)
        for node in ast.walk(branch)
    }
    found = set()
    for node in ast.walk(tree):
        if id(node) in type_only:
            continue
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            for alias in node.names:
                candidate = f"{target}.{alias.name}"
                found.add(candidate if candidate in MODULES else target)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
    return {m for m in found if m in MODULES and m != name}


GRAPH = {name: imported_modules(name) for name in MODULES}


def test_the_import_graph_has_no_cycle():
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(name: str, path: list[str]) -> None:
        state[name] = 1
        for target in sorted(GRAPH[name]):
            if state.get(target) == 1:
                cycle = path[path.index(target) :] + [target]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if target not in state:
                visit(target, path + [target])
        state[name] = 2

    for name in sorted(MODULES):
        if name not in state:
            visit(name, [name])


def test_no_module_imports_the_package_root():
    importers = sorted(name for name, targets in GRAPH.items() if "dictionary_learning" in targets)
    assert importers == [], f"{importers} import the package root (import from its modules instead)"


def test_no_function_is_longer_than_100_lines():
    long = []
    for name, path in MODULES.items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_FUNCTION_LINES:
                    long.append(f"{name}.{node.name} ({lines} lines)")
    assert long == [], f"split these where they have a seam: {long}"


def test_no_private_name_is_imported_from_another_module():
    private = []
    for name, path in MODULES.items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level:
                private += [
                    f"{name}: {a.name}" for a in node.names if a.name.startswith("_") and a.name != "__version__"
                ]
    assert private == [], f"private names used across modules (make them public or move the code): {private}"


def test_each_recipe_s_loss_is_the_first_method_of_its_own_file():
    """docs/architecture.md: a recipe's loss is its `loss()`, a plain method (no decorator) that
    returns a StepOutput, first in its class; BatchTopK and AbsTopK use TopK's loss unchanged (only
    their encoding differs)."""
    import inspect

    from dictionary_learning.trainers import TRAINER_REGISTRY
    from dictionary_learning.trainers.trainer import SAETrainer

    own_loss = {}
    for name, cls in TRAINER_REGISTRY.items():
        assert cls.loss is not SAETrainer.loss, f"{name} defines no loss"
        assert inspect.isfunction(cls.loss) and not hasattr(cls.loss, "__wrapped__"), f"{name}.loss is wrapped"
        assert inspect.signature(cls.loss).return_annotation == "StepOutput", f"{name}.loss: -> StepOutput"
        if "loss" in vars(cls):
            methods = [k for k, v in vars(cls).items() if inspect.isfunction(v) or isinstance(v, property)]
            assert methods[0] == "loss", f"{name}: the first method is {methods[0]}, not loss"
            own_loss[name] = inspect.getsourcefile(cls)
    recipe_files = {str(p) for p in (PACKAGE / "trainers").glob("*.py")} - {
        str(PACKAGE / "trainers" / f)
        for f in ("__init__.py", "trainer.py", "batch_top_k.py", "abs_top_k.py", "configs.py", "optim.py",
                  "schedules.py", "resampling.py", "layout.py")
    }  # fmt: skip
    assert recipe_files <= set(own_loss.values()), recipe_files - set(own_loss.values())
    assert "loss" not in vars(TRAINER_REGISTRY["BatchTopKTrainer"])
    assert "loss" not in vars(TRAINER_REGISTRY["AbsTopKTrainer"])
