"""The layout's rules: no import circles at module level, the runtime never imports the simulator, and
importing the simulator (or the cache and its protocol) imports no torch."""

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _module_graph() -> dict[str, set[str]]:
    mods: dict[str, set[str]] = {}
    for f in sorted((ROOT / "moe_runtime").rglob("*.py")) + sorted((ROOT / "simulator").rglob("*.py")):
        parts = f.relative_to(ROOT).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        pkg = name.split(".") if parts[-1] == "__init__" else name.split(".")[:-1]
        deps = set()
        for node in ast.parse(f.read_text()).body:  # module level: lazy imports inside functions are fine
            if isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    base = ".".join(pkg[: len(pkg) - node.level + 1] + ([node.module] if node.module else []))
                deps |= {base} | {f"{base}.{a.name}" for a in node.names}
            elif isinstance(node, ast.Import):
                deps |= {a.name for a in node.names}
        mods[name] = deps
    graph = {}
    for m, deps in mods.items():
        edges = set()
        for d in deps:
            bits = d.split(".")
            edges |= {".".join(bits[:i]) for i in range(1, len(bits) + 1)}  # importing a.b.c imports a, a.b
        graph[m] = {d for d in edges if d in mods and d != m and not m.startswith(d + ".")}
    return graph


def test_no_import_circles_and_the_runtime_never_imports_the_simulator():
    graph = _module_graph()
    state: dict[str, int] = {}

    def visit(u, path):
        state[u] = 1
        for v in graph[u]:
            assert state.get(v) != 1, "import circle: " + " -> ".join(path[path.index(v):] + [v]) \
                if v in path else f"import circle through {v}"
            if v not in state:
                visit(v, path + [v])
        state[u] = 2

    for m in graph:
        if m not in state:
            visit(m, [m])
    assert not [m for m, ds in graph.items() if m.startswith("moe_runtime") and any(d.startswith("simulator")
                                                                                    for d in ds)]


def test_simulator_and_cache_import_no_torch():
    code = "import sys, simulator.replay, simulator.sweep, moe_runtime.core.protocol; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"


def _package_graph() -> dict[str, set[str]]:
    """Subpackage -> the project subpackages it imports, counting imports inside functions too."""
    def package(mod: str) -> str | None:
        bits = mod.split(".")
        if bits[0] == "simulator":
            return "simulator"
        return ".".join(bits[:2]) if bits[0] == "moe_runtime" and len(bits) > 1 else None

    graph: dict[str, set[str]] = {}
    for f in sorted((ROOT / "moe_runtime").rglob("*.py")) + sorted((ROOT / "simulator").rglob("*.py")):
        parts = f.relative_to(ROOT).with_suffix("").parts
        src = package(".".join(parts[:-1] if parts[-1] == "__init__" else parts))
        if src is None:  # moe_runtime/__init__.py
            continue
        for node in ast.walk(ast.parse(f.read_text())):
            names = []
            if isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            graph.setdefault(src, set()).update(d for d in map(package, names) if d and d != src)
    return graph


def test_packages_form_no_cycle_counting_imports_inside_functions():
    graph = _package_graph()
    order: list[str] = []
    while graph:
        leaves = [p for p, deps in graph.items() if not deps - set(order)]
        assert leaves, f"import cycle among packages: {sorted(graph)}"
        order += sorted(leaves)
        for p in leaves:
            del graph[p]
    assert order[0] == "moe_runtime.core"


def test_core_stands_alone_and_imports_no_torch():
    """The core imports no other part of the project (and so never the simulator) and no torch, anywhere in
    its files; importing every core module leaves torch unloaded."""
    assert not _package_graph().get("moe_runtime.core")
    core = sorted((ROOT / "moe_runtime" / "core").rglob("*.py"))
    for f in core:
        for node in ast.walk(ast.parse(f.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else (
                [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            assert not [n for n in names if n.split(".")[0] == "torch"], f"{f.name} imports torch"
    mods = [".".join(f.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__") for f in core]
    code = f"import sys; import {', '.join(mods)}; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"
