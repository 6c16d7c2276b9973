"""The package's imports run one way: no loops, and the lesson modules (the model, the data) never import the
command line or the modules above it."""

from __future__ import annotations

import ast

from conftest import ROOT

PACKAGE = ROOT / "mnist_lit"
# The top of the house: what only the command line and its entries import.
ABOVE_THE_LESSON = {"cli", "commands", "runs", "options", "errors", "logfolder", "export", "serve"}


def imports(top_level: bool = False) -> dict[str, set[str]]:
    """module -> the mnist_lit modules it imports (only at its top: what importing it imports)."""
    graph = {}
    for path in PACKAGE.glob("*.py"):
        found = set()
        tree = ast.parse(path.read_text())
        for node in tree.body if top_level else ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("mnist_lit"):
                if node.module == "mnist_lit":  # from mnist_lit import runs, signals
                    found |= {a.name for a in node.names if (PACKAGE / f"{a.name}.py").exists()}
                else:
                    found.add(node.module.removeprefix("mnist_lit."))
            elif isinstance(node, ast.Import):
                found |= {a.name.removeprefix("mnist_lit.") for a in node.names if a.name.startswith("mnist_lit.")}
        graph[path.stem] = found - {path.stem}
    return graph


def test_the_imports_have_no_loops():
    # At the top of each module. Inside functions, one loop is by design: `sweep` is dispatched by the command line
    # (cli -> commands -> sweep) and runs each trial's fit through it (sweep -> cli.main).
    graph, done, path = imports(top_level=True), set(), []

    def visit(module: str) -> None:
        assert module not in path, f"import loop: {' -> '.join([*path[path.index(module) :], module])}"
        if module in done:
            return
        path.append(module)
        for imported in graph.get(module, ()):
            visit(imported)
        path.pop()
        done.add(module)

    for module in graph:
        visit(module)


def test_the_lesson_modules_import_nothing_above_them():
    graph = imports()
    for module in (
        "model",
        "data",
        "datasets",
        "idx",
        "batches",
        "images",
        "report",
        "figures",
        "checkpoint",
        "checkpoint_io",
        "storage",
        "digest",
        "runlock",
        "trust",
        "signals",
    ):
        assert not graph[module] & ABOVE_THE_LESSON, f"{module} imports {graph[module] & ABOVE_THE_LESSON}"
