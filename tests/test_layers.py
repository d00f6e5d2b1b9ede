"""No import cycle between hstu's packages, also through imports inside functions.

Every module of hstu/ is parsed (not imported) and every ``import`` statement in it is
collected, wherever it stands: at the top, inside a function, a method or an ``if``. Each
module belongs to a unit, the first level below ``hstu`` (``hstu.data.sizes`` -> ``hstu.data``,
``hstu.config`` -> ``hstu.config``). The graph unit -> imported unit must be acyclic, and every
edge must go down the layer order below (docs/architecture.md, "Layers"). A function-level
import is not a way around the order: it only hides a cycle until the function runs.
"""

from __future__ import annotations

import ast
from itertools import pairwise
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "hstu"

# Lowest first: a unit may import units of its own layer's left or of lower layers only.
LAYERS: list[list[str]] = [
    # foundations: no hstu import beyond this layer
    ["hstu", "hstu.validation", "hstu.sync_audit", "hstu.columns", "hstu.console"],
    # cross-field checks (knows the argument classes by their fields); the extension points
    # by name (their implementations are imported by name, on first use)
    ["hstu.checks", "hstu.registry"],
    # the gin argument classes; reading gin sources (generic: the caller passes the classes)
    ["hstu.args", "hstu.gin_parsing"],
    # kernels; the data path (preprocessing, sizes from metadata, loaders); sharded tables
    ["hstu.ops", "hstu.data", "hstu.embeddings"],
    # the model (sparse + dense), over ops, data's Batch and the tables
    ["hstu.model"],
    # one run's configuration, assembled from the gin classes and the data's classes
    ["hstu.config"],
    # the trainer: process groups, pipeline, optimizer, checkpoints, the loop
    ["hstu.training"],
    # serving artifacts and the inference model
    ["hstu.serving"],
    # entry points and tools
    ["hstu.cli", "hstu.bench", "hstu.export", "hstu.recommend", "hstu.publish", "hstu.launch",
     "hstu.gpu_check", "hstu.docs_gen", "hstu.sid"],
]


def _module_name(path: Path, root: Path = ROOT) -> str:
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _unit(module: str) -> str:
    return ".".join(module.split(".")[:2])


def _is_module(name: str) -> bool:
    rel = Path(*name.split("."))
    return (ROOT.parent / rel).with_suffix(".py").is_file() or (ROOT.parent / rel).is_dir()


def _imports(path: Path, root: Path = ROOT) -> list[tuple[str, int]]:
    """(imported hstu module, line) of every import statement in the file, at any depth."""
    module = _module_name(path, root)
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    out: list[tuple[str, int]] = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out.extend((alias.name, node.lineno) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            # `from hstu import args` imports the module hstu.args
            subs = [f"{source}.{a.name}" for a in node.names if _is_module(f"{source}.{a.name}")]
            out.extend((name, node.lineno) for name in (subs or [source]))
    return [(name, line) for name, line in out if name == "hstu" or name.startswith("hstu.")]


def _graph() -> dict[str, dict[str, str]]:
    """unit -> {imported unit: "file:line" of one such import}."""
    graph: dict[str, dict[str, str]] = {}
    for path in sorted(ROOT.rglob("*.py")):
        src = _unit(_module_name(path))
        graph.setdefault(src, {})
        for name, line in _imports(path):
            dst = _unit(name)
            if dst != src:
                where = f"{path.relative_to(ROOT.parent)}:{line}"
                graph[src].setdefault(dst, where)
    return graph


def _find_cycle(graph: dict[str, dict[str, str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1 on the current path, 2 done
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, {})):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_the_scanner_sees_function_level_imports(tmp_path: Path) -> None:
    src = (
        "def f():\n    from hstu.data import sizes\n    import hstu.model.model\n"
        "class C:\n    def g(self):\n        if True:\n            from .. import config\n"
    )
    mod = tmp_path / "hstu" / "training" / "probe.py"
    mod.parent.mkdir(parents=True)
    mod.write_text(src)
    assert sorted(_imports(mod, tmp_path / "hstu")) == [
        ("hstu.config", 7), ("hstu.data.sizes", 2), ("hstu.model.model", 3),
    ]


def test_find_cycle_reports_the_cycle() -> None:
    graph = {"a": {"b": ""}, "b": {"c": ""}, "c": {"a": ""}, "d": {"a": ""}}
    assert _find_cycle(graph) == ["a", "b", "c", "a"]
    assert _find_cycle({"a": {"b": ""}, "b": {}}) is None


def test_no_import_cycle_between_units() -> None:
    graph = _graph()
    cycle = _find_cycle(graph)
    if cycle:
        steps = [f"{a} -> {b} ({graph[a][b]})" for a, b in pairwise(cycle)]
        pytest.fail("import cycle: " + "; ".join(steps))


def test_every_import_goes_down_the_layers() -> None:
    rank = {unit: i for i, layer in enumerate(LAYERS) for unit in layer}
    graph = _graph()
    unplaced = sorted(set(graph) - set(rank))
    assert not unplaced, f"units without a layer in LAYERS (add them): {unplaced}"
    upward = [
        f"{src} -> {dst} ({where})"
        for src, deps in sorted(graph.items())
        for dst, where in sorted(deps.items())
        if rank[dst] > rank[src]
    ]
    assert not upward, "imports against the layer order: " + "; ".join(upward)
