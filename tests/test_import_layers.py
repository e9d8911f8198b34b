"""The package's import structure: no module imports a module of a higher layer, and no set of
modules imports itself round a cycle (docs/design.md §5 gives the layers and why).

Imports are read with ast from the sources, every import statement wherever it stands
(module level, inside functions, under TYPE_CHECKING), so an import hidden in a function to
dodge a cycle still counts. ``triton_kernels/`` is installed as ``safepatch_merge.triton_kernels``
and is read as such.
"""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PKG = "safepatch_merge"

# Lowest first. A module may import modules of its own layer or lower ones. The root
# package ("") only holds the version.
LAYERS: list[tuple[str, ...]] = [
    ("", "errors"),
    ("io", "dist", "devices", "cuda_streams", "versions", "testing", "config_fields"),
    ("ops", "triton_kernels", "models"),
    ("eval",),        # generation and judges; derive uses them for on-policy data and checks
    ("derive",),
    ("score",),       # scores the derived patches (derive's data and model loading)
    ("merge",),
    ("push",),
    ("pipeline",),    # runs the stages above in order
    ("cli", "__main__"),
]
RANK = {name: i for i, names in enumerate(LAYERS) for name in names}


def module_files() -> dict[str, tuple[Path, bool]]:
    """{dotted module name: (file, is a package __init__)} of the installed package."""
    out = {}
    roots = [(REPO / PKG, PKG), (REPO / "triton_kernels", f"{PKG}.triton_kernels")]
    for root, prefix in roots:
        for path in sorted(root.rglob("*.py")):
            parts = list(path.relative_to(root).with_suffix("").parts)
            is_pkg = parts[-1] == "__init__"
            if is_pkg:
                parts = parts[:-1]
            out[".".join([prefix] + parts)] = (path, is_pkg)
    return out


def imports_of(name: str, path: Path, is_pkg: bool, known: set[str]) -> set[str]:
    """The package's modules that module `name` imports (a name imported from a package that
    is itself a submodule counts as that submodule)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        targets = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".") if is_pkg else name.split(".")[:-1]
                base = base[:len(base) - (node.level - 1)]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            targets = [f"{mod}.{a.name}" if f"{mod}.{a.name}" in known else mod
                       for a in node.names]
        for t in targets:
            while t not in known and "." in t:
                t = t.rsplit(".", 1)[0]
            if t in known and t != name:
                found.add(t)
    return found


def import_graph() -> dict[str, set[str]]:
    files = module_files()
    known = set(files)
    return {m: imports_of(m, p, is_pkg, known) for m, (p, is_pkg) in files.items()}


def layer_of(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def upward_imports(graph: dict[str, set[str]]) -> list[str]:
    """'a (layer) imports b (higher layer)' for every import that climbs."""
    bad = []
    for a, targets in sorted(graph.items()):
        for b in sorted(targets):
            if RANK[layer_of(b)] > RANK[layer_of(a)]:
                bad.append(f"{a} ({layer_of(a) or 'root'}) imports {b} ({layer_of(b)})")
    return bad


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out = []
    counter = 0
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            v, it = work[-1]
            w = next(it, None)
            if w is not None:
                if w not in index:
                    index[w] = low[w] = counter
                    counter += 1
                    stack.append(w)
                    on_stack.add(w)
                    work.append((w, iter(sorted(graph.get(w, ())))))
                elif w in on_stack:
                    low[v] = min(low[v], index[w])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[v])
            if low[v] == index[v]:
                comp = []
                while True:
                    w = stack.pop()
                    on_stack.discard(w)
                    comp.append(w)
                    if w == v:
                        break
                if len(comp) > 1:
                    out.append(sorted(comp))
    return out


def test_every_package_has_a_layer():
    graph = import_graph()
    assert f"{PKG}.merge.engine" in graph and f"{PKG}.triton_kernels" in graph
    unplaced = sorted({layer_of(m) for m in graph} - set(RANK))
    assert not unplaced, f"add these to LAYERS: {unplaced}"


def test_no_module_imports_a_higher_layer():
    assert upward_imports(import_graph()) == []


def test_no_import_cycle():
    assert cycles(import_graph()) == []


def test_merge_selector_is_at_the_bottom_of_merge():
    """merge.select (the exact k-th-largest selector of both methods' trims) imports only ops
    and lower layers, never another merge module, so every method and the thresholds can use
    it (docs/design.md §5.1)."""
    graph = import_graph()
    mine = {m for m in graph[f"{PKG}.merge.select"] if layer_of(m) == "merge"}
    assert mine == set()
    users = {m for m, t in graph.items() if f"{PKG}.merge.select" in t}
    assert {f"{PKG}.merge.thresholds", f"{PKG}.merge.safepatch_method",
            f"{PKG}.merge.classic.trim"} <= users


def test_function_level_imports_are_read():
    graph = import_graph()
    # merge/__init__ imports the engine inside __getattr__; the CLI imports the engine in run()
    assert f"{PKG}.merge.engine" in graph[f"{PKG}.merge"]
    assert f"{PKG}.merge" in graph[f"{PKG}.cli.merge_cmd"]


def test_the_checks_catch_what_they_look_for():
    graph = {f"{PKG}.io.a": {f"{PKG}.merge.b"}, f"{PKG}.merge.b": {f"{PKG}.merge.c"},
             f"{PKG}.merge.c": {f"{PKG}.merge.b"}, f"{PKG}.merge.d": set()}
    assert upward_imports(graph) == [f"{PKG}.io.a (io) imports {PKG}.merge.b (merge)"]
    assert cycles(graph) == [[f"{PKG}.merge.b", f"{PKG}.merge.c"]]


@pytest.mark.parametrize("module", ["safepatch_merge.merge.config",
                                    "safepatch_merge.merge.mergekit_config",
                                    "safepatch_merge.merge.safepatch_params",
                                    "safepatch_merge.io.atomic"])
def test_config_modules_import_no_torch(module):
    probe = f"import sys, {module}; print('torch' in sys.modules)"
    res = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                         timeout=120)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "False"
