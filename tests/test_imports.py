"""The house rules, checked on the source: every import (lazy ones inside functions included) is read
with `ast`, and the test fails on an import cycle, on an import upward between the wings
(deploy < train < compress < benchmarks; the data wing train.data imports deploy/ and train.config
only), and on torch/timm reachable from the data wing or from deploy/.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
WINGS = ("deploy", "train", "compress", "benchmarks")  # each may import only the ones before it
DATA_WING = "train.data"
# What the data wing may import from train/ outside itself: the torch-free YAML/dataclass config loader.
DATA_WING_ALLOWED = ("train.config",)
HEAVY = ("torch", "torchvision", "timm")  # never reachable from deploy/ or the data wing
KNOWN_CYCLES: list[list[str]] = []


def module_files(repo: Path = REPO) -> dict[str, Path]:
    """Dotted module name -> file, for every module of the four wings."""
    out = {}
    for wing in WINGS:
        for path in sorted((repo / wing).rglob("*.py")):
            parts = list(path.relative_to(repo).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join(parts)] = path
    return out


def _absolute(name: str, path: Path, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    base = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    base = base[:len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def imports_of(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """Every module `name` imports anywhere in its file, with the packages Python imports on the way
    (`import a.b.c` runs a/__init__ and a/b/__init__ first)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            module = _absolute(name, path, node)
            found.add(module)
            found.update(f"{module}.{a.name}" for a in node.names if f"{module}.{a.name}" in modules)
    closed = {".".join(m.split(".")[:i]) for m in found for i in range(1, m.count(".") + 2)}
    return closed - {name}


def import_graph(repo: Path = REPO) -> tuple[dict[str, set[str]], dict[str, set[str]]]:
    """(project module -> project modules it imports, project module -> top-level external packages)."""
    modules = module_files(repo)
    graph, external = {}, {}
    for name, path in modules.items():
        names = imports_of(name, path, modules)
        graph[name] = {m for m in names if m in modules}
        external[name] = {m.split(".")[0] for m in names if m.split(".")[0] not in WINGS}
    return graph, external


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle per strongly connected component of more than one module (Tarjan)."""
    index, low, stack, on_stack, cycles, counter = {}, {}, [], set(), [], [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return cycles


def _wing(module: str) -> str:
    return DATA_WING if module == DATA_WING or module.startswith(DATA_WING + ".") else module.split(".")[0]


def upward_imports(graph: dict[str, set[str]]) -> list[str]:
    """`a -> b` for every import that breaks the wing order or leaves the data wing."""
    rank = {w: i for i, w in enumerate(WINGS)}
    bad = []
    for src, targets in sorted(graph.items()):
        for dst in sorted(targets):
            if dst in WINGS:  # the empty wing packages themselves
                continue
            s, d = _wing(src), _wing(dst)
            if s == DATA_WING:
                if d not in (DATA_WING, "deploy") and dst not in DATA_WING_ALLOWED:
                    bad.append(f"{src} -> {dst} (the data wing imports deploy/ and {DATA_WING_ALLOWED} only)")
            elif rank[d.split(".")[0]] > rank[s.split(".")[0]]:
                bad.append(f"{src} -> {dst} ({s} may not import {d.split('.')[0]})")
    return bad


def reachable(graph: dict[str, set[str]], start: str) -> dict[str, str]:
    """Every module reachable from `start`, each with the module that first imported it."""
    seen, todo = {start: ""}, [start]
    while todo:
        v = todo.pop()
        for w in sorted(graph[v]):
            if w not in seen:
                seen[w] = v
                todo.append(w)
    return seen


def heavy_reached(graph: dict[str, set[str]], external: dict[str, set[str]], roots) -> list[str]:
    """`root: a -> b -> torch` for every torch/timm import reachable from a module under `roots`."""
    bad = []
    for root in sorted(m for m in graph if any(m == r or m.startswith(r + ".") for r in roots)):
        via = reachable(graph, root)
        for module in sorted(via):
            for lib in sorted(external[module] & set(HEAVY)):
                chain, m = [module], module
                while via[m]:
                    m = via[m]
                    chain.append(m)
                bad.append(f"{root}: {' -> '.join(reversed(chain))} -> {lib}")
    return bad


@pytest.fixture(scope="module")
def graphs():
    return import_graph()


def test_the_walk_sees_lazy_and_package_imports(graphs):
    graph, external = graphs
    assert "deploy.trt_runtime" in graph["deploy.runtime"]  # imported inside open_backend
    assert "train.data" in graph["train.data.splits"]  # the package runs before its module
    assert "tensorrt" in external["deploy.trt_runtime"]  # imported inside import_tensorrt


def test_every_project_import_names_a_module_that_exists():
    """A module moved without its importers updated (a lazy import would only fail when it runs)."""
    modules = module_files()
    missing = sorted(f"{name} -> {m}" for name, path in modules.items() for m in imports_of(name, path, modules)
                     if m.split(".")[0] in WINGS and m not in modules)
    assert missing == []


def test_no_import_cycles(graphs):
    graph, _ = graphs
    assert find_cycles(graph) == KNOWN_CYCLES


def test_no_upward_imports_between_wings(graphs):
    graph, _ = graphs
    assert upward_imports(graph) == []


def test_torch_and_timm_never_reach_the_data_wing_or_deploy(graphs):
    graph, external = graphs
    assert heavy_reached(graph, external, ("deploy", DATA_WING)) == []


def test_the_checks_catch_what_they_guard():
    """The rules themselves: a cycle, an upward import and torch two steps away are each reported."""
    graph = {"deploy.a": {"train.b"}, "train.b": {"deploy.a"}, "train.data.c": {"train.stage"},
             "train.stage": set(), "deploy.d": {"deploy.e"}, "deploy.e": set()}
    external = {m: set() for m in graph} | {"deploy.e": {"torch"}}
    assert find_cycles(graph) == [["deploy.a", "train.b"]]
    assert [b.split(" (")[0] for b in upward_imports(graph)] == ["deploy.a -> train.b", "train.data.c -> train.stage"]
    assert heavy_reached(graph, external, ("deploy",)) == ["deploy.d: deploy.d -> deploy.e -> torch",
                                                            "deploy.e: deploy.e -> torch"]


def test_importing_the_data_wing_and_deploy_loads_no_torch():
    """The same rule at run time: every module of the data wing and deploy/ (TensorRT's aside) imported
    in a fresh interpreter leaves torch, torchvision and timm unloaded."""
    graph, _ = import_graph()
    names = [m for m in graph if _wing(m) in (DATA_WING, "deploy")]
    code = ("import importlib, sys\n"
            f"for name in {names!r}:\n    importlib.import_module(name)\n"
            f"print(sorted(set({list(HEAVY)!r}) & set(sys.modules)))")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip().splitlines()[-1] == "[]"
