"""The package's layers import one way (README, Architecture): every import statement in
gpu_session/ and infra/, module-level or inside a function, is read from the source and checked.

- no import cycle among gpu_session's modules;
- each layer imports only from the layers below it (LAYERS, lowest first);
- no product module imports the simulator (only the face, gpu_session.cli, and the tests do);
- the chat imports nothing of the session flows.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "gpu_session"

# Lowest first; a module may import its own layer and the layers before it.
LAYERS = [
    ("gpu_session.errors", "gpu_session.paths", "gpu_session.progress", "gpu_session.fit", "gpu_session"),
    ("gpu_session.clouds",),
    ("gpu_session.sizing",),
    ("gpu_session.host",),
    ("gpu_session.local",),
    ("gpu_session.providers",),
    ("gpu_session.stack",),
    ("gpu_session.chat",),
    ("gpu_session.session",),
    ("gpu_session.cli",),
]
SIM = "gpu_session.sim"  # beside the layers: it may import the product; only cli and tests import it


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in PACKAGE.rglob("*.py")}


def imports(path: Path) -> set[str]:
    """The gpu_session modules `path` imports: `from a.b import c` names a.b.c when that is a module."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            for alias in node.names:
                found.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in MODULES else base)
    return {m for m in found if m == "gpu_session" or m.startswith("gpu_session.")}


GRAPH = {name: imports(path) - {name} for name, path in MODULES.items()}


def layer(module: str) -> int:
    best = None
    for rank, prefixes in enumerate(LAYERS):
        for prefix in prefixes:
            if module == prefix or (prefix != "gpu_session" and module.startswith(prefix + ".")):
                best = rank
    assert best is not None, f"{module} is in no layer: add it to LAYERS (and to the README's Architecture)"
    return best


def test_the_walk_sees_the_imports():
    """The walk finds what is there (so the checks below can fail): a few known edges."""
    assert "gpu_session.session.down" in GRAPH["gpu_session.cli.watch"]
    assert "gpu_session.local.record" in GRAPH["gpu_session.chat.client"]
    assert "gpu_session.host.engines" in GRAPH["gpu_session.sim"]  # a relative `from ..` one level up


def test_no_import_cycle():
    index, low, stack, on_stack, cycles = {}, {}, [], set(), []

    def visit(v: str) -> None:  # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in GRAPH.get(v, ()):
            if w not in GRAPH:
                continue
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

    for v in sorted(GRAPH):
        if v not in index:
            visit(v)
    assert not cycles, f"import cycles: {cycles}"


@pytest.mark.parametrize("module", sorted(m for m in GRAPH if not m.startswith(SIM)))
def test_imports_go_down_the_layers(module):
    wrong = [m for m in GRAPH[module] if not m.startswith(SIM) and layer(m) > layer(module)]
    assert not wrong, f"{module} (layer {layer(module)}) imports {wrong}, which sit above it"


def test_no_product_module_imports_the_simulator():
    product = {m: deps for m, deps in GRAPH.items() if not m.startswith((SIM, "gpu_session.cli"))}
    product["infra/__main__.py"] = imports(ROOT / "infra" / "__main__.py")
    reaching = {m: sorted(d for d in deps if d.startswith(SIM)) for m, deps in product.items()}
    assert not {m: d for m, d in reaching.items() if d}


def test_the_chat_imports_nothing_of_the_session_flows():
    chat = {
        m: sorted(d for d in deps if d.startswith("gpu_session.session"))
        for m, deps in GRAPH.items()
        if m.startswith("gpu_session.chat")
    }
    assert not {m: d for m, d in chat.items() if d}
