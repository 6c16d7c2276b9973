"""The package's imports run one way, as the README's picture draws them: no loops (imports inside functions count),
no module importing a layer above its own, and a subpackage entered only through its door (its __init__)."""

from __future__ import annotations

import ast
import subprocess
import sys

import pytest
from helpers.cli import ROOT, cli_env

PACKAGE = ROOT / "mnist_lit"
# The README's layers, lowest first: a unit (a top-level module, or a subpackage as a whole) may import units of its
# own layer or of a layer below, never above.
LAYERS = [
    ("base", {"mnist_lit", "errors", "signals", "lean"}),
    ("lesson", {"model", "data", "datasets", "plain"}),
    ("hardening", {"trust", "checkpoints", "figures", "nodes", "slurm"}),
    ("runs", {"runs", "report", "export", "serve"}),
    ("command line", {"cli"}),
    ("sweep", {"sweep", "sweep_trial"}),
    ("entry", {"__main__"}),
]
RANK = {unit: rank for rank, (_, units) in enumerate(LAYERS) for unit in units}


def unit_of(module: str) -> str:
    """mnist_lit.checkpoints.files -> checkpoints; mnist_lit -> mnist_lit (the package's own __init__)."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else parts[0]


def modules() -> dict[str, ast.Module]:
    found = {}
    for path in PACKAGE.rglob("*.py"):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        found[".".join(parts)] = ast.parse(path.read_text())
    return found


def imports(tree: ast.Module, module: str) -> set[str]:
    """The mnist_lit modules a module imports, at its top or inside a function."""
    package = module if module in PACKAGES else module.rpartition(".")[0]
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # a relative import
                base = ".".join([*package.split(".")[: len(package.split(".")) - node.level + 1], base]).strip(".")
            if not base.startswith("mnist_lit"):
                continue
            for alias in node.names:  # `from mnist_lit.cli import commands` imports the module cli.commands
                found.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in MODULES else base)
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("mnist_lit")}
    return found - {module}


MODULES = modules()
PACKAGES = {name for name in MODULES if (ROOT / name.replace(".", "/") / "__init__.py").exists()}


def test_every_unit_has_a_layer():
    units = {unit_of(name) for name in MODULES}
    assert units == set(RANK), f"not in LAYERS: {units - set(RANK)}; gone: {set(RANK) - units}"


def test_the_imports_have_no_loops_counting_those_inside_functions():
    graph = {unit: set() for unit in RANK}
    for name, tree in MODULES.items():
        graph[unit_of(name)] |= {unit_of(target) for target in imports(tree, name)} - {unit_of(name)}
    done: set[str] = set()
    path: list[str] = []

    def visit(unit: str) -> None:
        assert unit not in path, f"import loop: {' -> '.join([*path[path.index(unit) :], unit])}"
        if unit in done:
            return
        path.append(unit)
        for imported in sorted(graph[unit]):
            visit(imported)
        path.pop()
        done.add(unit)

    for unit in sorted(graph):
        visit(unit)


def test_no_module_imports_a_layer_above_its_own():
    upward = set()
    for name, tree in MODULES.items():
        for target in imports(tree, name):
            if RANK[unit_of(target)] > RANK[unit_of(name)]:
                upward.add((unit_of(name), unit_of(target)))
    assert upward == set(), f"imports up across the layers: {sorted(upward)}"


def test_checkpoints_and_trust_know_no_model_and_no_data():
    """The lower hardening stands beside the lesson, not on it: it reads and writes files whatever the model is."""
    for name, tree in MODULES.items():
        if unit_of(name) in ("checkpoints", "trust"):
            lesson = {unit_of(t) for t in imports(tree, name)} & {"model", "data", "datasets", "plain"}
            assert not lesson, f"{name} imports {sorted(lesson)}"


def test_a_subpackage_is_entered_through_its_door():
    """Outside a subpackage, only its __init__ is imported: the names it lists are what others may use."""
    for name, tree in MODULES.items():
        for target in imports(tree, name):
            inner = target.count(".") >= 2 and unit_of(target) in {unit_of(p) for p in PACKAGES if p != "mnist_lit"}
            assert not inner or unit_of(target) == unit_of(name), f"{name} imports {target}, behind its door"


@pytest.mark.parametrize("lesson", ["model", "data"])
def test_the_lesson_loads_no_hardening(lesson):
    """What importing a lesson module loads: nothing of checkpoints, trust, signals, the runs, the sweep."""
    code = f"import sys, mnist_lit.{lesson}; print(' '.join(m for m in sys.modules if m.startswith('mnist_lit')))"
    loaded = set(subprocess.run([sys.executable, "-c", code], env=cli_env(), capture_output=True, text=True,
                                check=True).stdout.split())  # fmt: skip
    hardening = {"checkpoints", "trust", "signals", "runs", "sweep", "serve", "cli", "report", "nodes", "slurm",
                 "digest"}  # fmt: skip
    assert not {unit_of(m) for m in loaded} & hardening, sorted(loaded)


def test_the_lessons_module_stays_a_lesson():
    """LitMNIST reads like Lightning's own examples: at most 120 lines; no module of the package over 400."""
    source = (PACKAGE / "model.py").read_text()
    lit = next(n for n in ast.parse(source).body if isinstance(n, ast.ClassDef) and n.name == "LitMNIST")
    assert lit.end_lineno - lit.lineno + 1 <= 120
    long = {str(p.relative_to(ROOT)): n for p in PACKAGE.rglob("*.py") if (n := len(p.read_text().splitlines())) > 400}
    assert not long, long
