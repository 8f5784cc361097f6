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
