"""Imports run one way: ``services -> tokenizer_svc | scheduler -> executor -> kernels``,
all of them over ``common`` and ``proto``; no module imports itself back through a cycle;
the stages that run without a device never reach torch; and no code names a stage by a
bare top-level name (``import kernels``), which would find another package of that name.

The graph is read from the source (AST), so a test fails on an import that a run would
only meet on a rare path. Imports under ``if TYPE_CHECKING:`` are annotations, not edges.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# folder -> the layer of the import name tessera.<folder> ("api": the tessera/ package)
FOLDERS = {
    "proto": "proto",
    "common": "common",
    "kernels": "kernels",
    "executor": "executor",
    "scheduler": "scheduler",
    "tokenizer_svc": "tokenizer_svc",
    "services": "services",
    "tessera": "api",
}
BELOW = {
    "proto": set(),
    "common": {"proto"},
    "kernels": {"common", "proto"},
    # tokenizer_svc: a constrained request's grammar needs the vocabulary (executor/grammar.py)
    "executor": {"kernels", "tokenizer_svc", "common", "proto"},
    "scheduler": {"executor", "kernels", "common", "proto"},
    "tokenizer_svc": {"common", "proto"},
    "services": {"tokenizer_svc", "scheduler", "executor", "kernels", "common", "proto"},
    "api": {"services", "tokenizer_svc", "scheduler", "executor", "kernels", "common", "proto"},
}
TORCH_FREE = {"common", "proto", "scheduler", "tokenizer_svc", "services"}
BARE = {"kernels", "executor", "scheduler", "services", "proto", "tokenizer_svc", "common"}


def _module_name(folder: str, path: Path) -> str:
    parts = [p for p in path.relative_to(ROOT / folder).with_suffix("").parts if p != "__init__"]
    prefix = ["tessera"] if folder == "tessera" else ["tessera", folder]
    return ".".join(prefix + parts)


def _imports(tree: ast.AST) -> list[tuple[str, list[str]]]:
    """(module, [names imported from it]) for every import outside TYPE_CHECKING blocks."""
    found: list[tuple[str, list[str]]] = []

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            found.extend((alias.name, []) for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.append((node.module, [alias.name for alias in node.names]))
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return found


def _graph() -> tuple[dict[str, str], dict[str, set[str]]]:
    """layer of each project module, and its edges to project modules and to 'torch'."""
    layer: dict[str, str] = {}
    trees: dict[str, ast.AST] = {}
    for folder, name in FOLDERS.items():
        for path in sorted((ROOT / folder).rglob("*.py")):
            if path.name.endswith(("_pb2.py", "_pb2_grpc.py")):
                continue  # generated
            module = _module_name(folder, path)
            layer[module] = name
            trees[module] = ast.parse(path.read_text(), str(path))
    edges: dict[str, set[str]] = {m: set() for m in layer}
    for module, tree in trees.items():
        for target, names in _imports(tree):
            top = target.split(".")[0]
            if top in BARE:
                edges[module].add(f"bare:{target}")
            elif top == "torch":
                edges[module].add("torch")
            for candidate in [target, *(f"{target}.{n}" for n in names)]:
                # a stub module (generated) counts as its package, tessera.proto...
                while candidate and candidate not in layer and "." in candidate:
                    candidate = candidate.rpartition(".")[0]
                if candidate in layer and candidate != module:
                    edges[module].add(candidate)
    return layer, edges


def test_every_stage_is_imported_by_its_tessera_name_only():
    _, edges = _graph()
    bare = sorted(f"{m} -> {t[5:]}" for m, ts in edges.items() for t in ts if t.startswith("bare:"))
    assert bare == []


def test_imports_run_down_the_stages_only():
    layer, edges = _graph()
    upward = sorted(
        f"{m} ({layer[m]}) -> {t} ({layer[t]})"
        for m, targets in edges.items()
        for t in targets
        if t in layer and layer[t] != layer[m] and layer[t] not in BELOW[layer[m]]
    )
    assert upward == []


def test_no_import_cycles():
    layer, edges = _graph()
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    cycles: list[list[str]] = []

    def walk(module: str, path: list[str]) -> None:
        state[module] = 1
        for target in sorted(t for t in edges[module] if t in layer):
            if state.get(target) == 1:
                cycles.append(path[path.index(target):] + [target])
            elif target not in state:
                walk(target, [*path, target])
        state[module] = 2

    for module in sorted(layer):
        if module not in state:
            walk(module, [module])
    # a package's __init__ re-exporting its own modules is not a cycle a reader minds
    cycles = [c for c in cycles if not all(layer[x] == layer[c[0]] and (
        x == c[0] or x.startswith(c[0] + ".") or c[0].startswith(x + ".")) for x in c)]
    assert cycles == []


@pytest.mark.parametrize("stage", sorted(TORCH_FREE))
def test_stages_without_a_device_never_reach_torch(stage):
    layer, edges = _graph()
    reach: dict[str, list[str]] = {}
    for start in (m for m in layer if layer[m] == stage):
        seen, todo = {start: [start]}, [start]
        while todo:
            module = todo.pop()
            for target in edges[module]:
                if target == "torch":
                    reach[start] = [*seen[module], "torch"]
                elif target in layer and target not in seen:
                    seen[target] = [*seen[module], target]
                    todo.append(target)
    assert reach == {}


def test_ray_is_imported_only_by_the_ray_path_and_only_when_it_runs():
    """Ray is an optional extra (`tessera[ray]`): only tessera/ray_serve.py names it, and
    only inside functions, so `tessera serve` and every stage import without it."""
    named, at_import = [], []
    for folder in FOLDERS:
        for path in sorted((ROOT / folder).rglob("*.py")):
            if path.name.endswith(("_pb2.py", "_pb2_grpc.py")):
                continue
            tree = ast.parse(path.read_text(), str(path))
            module = _module_name(folder, path)
            if any(t.split(".")[0] == "ray" for t, _ in _imports(tree)):
                named.append(module)
            top = [n for n in tree.body if isinstance(n, ast.Import | ast.ImportFrom)]
            if any(t.split(".")[0] == "ray" for n in top for t, _ in _imports(n)):
                at_import.append(module)
    assert named == ["tessera.ray_serve"]
    assert at_import == []
