"""The house's plan, held against the code: no import circle, and no import from a lower
layer to a higher one (docs/architecture.md draws the layers). Every import counts: inside
functions, under TYPE_CHECKING, and a package's __init__ importing its children."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "vtadl"

# Lowest first; a module may import its own layer and the layers below it. The first
# matching prefix names a module's layer.
LAYERS = [
    ("foundation", ["vtadl", "vtadl.exceptions", "vtadl.presets", "vtadl.config", "vtadl.metrics",
                    "vtadl.devices", "vtadl.visualize"]),
    ("inference", ["vtadl.inference"]),
    ("model", ["vtadl.model"]),
    ("data", ["vtadl.data"]),
    ("training", ["vtadl.losses", "vtadl.checkpoints", "vtadl.run_folders", "vtadl.sampling",
                  "vtadl.training", "vtadl.ray_session", "vtadl.distributed"]),
    ("scoring", ["vtadl.scoring"]),
    ("evaluation", ["vtadl.evaluation", "vtadl.prediction", "vtadl.export"]),
    ("runs", ["vtadl.runs"]),
    ("search", ["vtadl.tune", "vtadl.report"]),
    ("service", ["vtadl.service", "vtadl.job_contract", "vtadl.queue", "vtadl.worker",
                 "vtadl.jobs", "vtadl.submission"]),
    ("cli", ["vtadl.cli", "vtadl.__main__"]),
]  # fmt: skip


def _modules() -> dict[str, Path]:
    found = {}
    for path in PACKAGE.rglob("*.py"):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        found[".".join(parts)] = path
    return found


def _imports(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The package's modules that `name` imports, anywhere in its file."""

    def resolve(target: str) -> str | None:
        while target and target not in modules:
            target = target.rpartition(".")[0]
        return target or None

    targets = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                here = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
                base = ".".join(here[: len(here) - node.level + 1] + ([base] if base else []))
            targets.add(base)
            targets.update(f"{base}.{a.name}" for a in node.names)
    return {r for t in targets if (r := resolve(t)) and r != name}


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: _imports(name, path, modules) for name, path in modules.items()}


def _layer(module: str) -> int:
    best = None
    for rank, (_, prefixes) in enumerate(LAYERS):
        for prefix in prefixes:
            if module == prefix or module.startswith(prefix + "."):
                if best is None or len(prefix) > best[1]:
                    best = (rank, len(prefix))
    if best is None:
        pytest.fail(f"{module} is in no layer of tests/test_layout.py: place it")
    return best[0]


def test_every_module_has_a_layer() -> None:
    for module in _graph():
        _layer(module)


def test_no_import_runs_from_a_lower_layer_to_a_higher_one() -> None:
    upward = [
        f"{m} ({LAYERS[_layer(m)][0]}) imports {t} ({LAYERS[_layer(t)][0]})"
        for m, targets in _graph().items()
        for t in sorted(targets)
        if _layer(t) > _layer(m)
    ]
    assert not upward, "\n".join(upward)


def _circles(graph: dict[str, set[str]]) -> list[str]:
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    circles = []

    def visit(module: str, path: list[str]) -> None:
        state[module] = 1
        for target in sorted(graph[module]):
            if state.get(target) == 1:
                circles.append(" -> ".join(path[path.index(target) :] + [target]))
            elif target not in state:
                visit(target, path + [target])
        state[module] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    return circles


def test_no_import_circle() -> None:
    circles = _circles(_graph())
    assert not circles, "\n".join(circles)


def test_the_layout_check_sees_a_circle_and_an_upward_import(tmp_path: Path) -> None:
    """The checks above could fail: an import inside a function that closes a circle is
    seen, and so is an import from the foundation up to the service layer."""
    pkg = tmp_path / "vtadl"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "config.py").write_text("def f():\n    from vtadl import queue\n")
    (pkg / "queue.py").write_text("from vtadl.config import f\n")
    modules = {"vtadl": pkg / "__init__.py", "vtadl.config": pkg / "config.py",
               "vtadl.queue": pkg / "queue.py"}  # fmt: skip
    graph = {name: _imports(name, path, modules) for name, path in modules.items()}
    assert graph["vtadl.config"] == {"vtadl", "vtadl.queue"}
    assert _circles(graph) == ["vtadl.config -> vtadl.queue -> vtadl.config"]
    assert _layer("vtadl.queue") > _layer("vtadl.config")


LONGEST_BODY = 80  # lines of a function's body, its signature and docstring not counted


def test_no_function_body_is_longer_than_a_screen_or_two() -> None:
    long = []
    for path in sorted(PACKAGE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                continue
            body = node.body
            if isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
                body = body[1:] or body
            lines = node.end_lineno - body[0].lineno + 1
            if lines > LONGEST_BODY:
                long.append(f"{path.relative_to(PACKAGE.parent)}:{node.lineno} {node.name} {lines}")
    assert not long, "\n".join(long)
