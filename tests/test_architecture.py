"""The import rules of docs/ARCHITECTURE.md: layers import only downwards, no import circles anywhere
(function-level imports included), export and training never import each other, and importing the
package or its config is fast (no torch)."""
import ast
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "stablemoe_megatron"

# Lowest first; a module may import its own layer or lower ones. Longest prefix wins.
LAYERS = [
    ("foundation", ("errors", "runtime", "cpu_compat", "parallel")),
    ("settings and pure algorithms", ("routing", "tokenizer", "data_integrity", "checkpoint", "config", "cli_args",
                                      "size_configs", "model.config", "moe.config")),
    ("megatron building blocks", ("moe", "model", "data", "parallel_text")),
    ("analysis", ("analysis",)),
    ("training and export", ("training", "export")),
    ("entry points", ("train", "evaluate", "entry", "cli")),
]
FORBIDDEN = [  # (importer prefix, imported prefix): same or lower layer, but kept apart on purpose
    ("export", "training"), ("training", "export"), ("checkpoint", "training"), ("checkpoint", "export"),
    ("routing", "moe"), ("routing", "model"), ("analysis", "training"),
]


def _module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict:
    return {_module_name(p): p for p in PACKAGE.rglob("*.py")}


def _imports(path: Path, modules: dict) -> set:
    """Project modules imported anywhere in ``path`` (top level and inside functions)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("stablemoe_megatron"))
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("stablemoe_megatron"):
            for alias in node.names:  # "from pkg import module" imports the module
                candidate = f"{node.module}.{alias.name}"
                found.add(candidate if candidate in modules else node.module)
    return {m for m in found if m in modules}


def _graph() -> dict:
    modules = _modules()
    return {name: _imports(path, modules) - {name} for name, path in modules.items()}


def _short(name: str) -> str:
    return name[len("stablemoe_megatron."):] if name.startswith("stablemoe_megatron.") else ""


def _matches(short: str, prefix: str) -> bool:
    return short == prefix or short.startswith(prefix + ".")


def _layer(name: str) -> int:
    short = _short(name)
    if not short:
        return 0  # the package itself
    best = None
    for index, (_, prefixes) in enumerate(LAYERS):
        for prefix in prefixes:
            if _matches(short, prefix) and (best is None or len(prefix) > len(best[1])):
                best = (index, prefix)
    assert best is not None, f"{name} belongs to no layer of docs/ARCHITECTURE.md: add it to LAYERS"
    return best[0]


def test_every_module_has_a_layer():
    for name in _modules():
        _layer(name)


def test_layers_import_only_downwards():
    bad = [f"{a} ({LAYERS[_layer(a)][0]}) imports {b} ({LAYERS[_layer(b)][0]})"
           for a, targets in _graph().items() for b in targets if _layer(b) > _layer(a)]
    assert not bad, "\n".join(bad)


def test_forbidden_edges():
    bad = [f"{a} imports {b}" for a, targets in _graph().items() for b in targets
           for src, dst in FORBIDDEN if _matches(_short(a), src) and _matches(_short(b), dst)]
    assert not bad, "\n".join(bad)


def test_no_import_circles():
    graph = _graph()
    index, low, stack, on_stack, cycles = {}, {}, [], set(), []

    def visit(node):  # Tarjan's strongly connected components
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in graph[node]:
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                item = stack.pop()
                on_stack.discard(item)
                component.append(item)
                if item == node:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for node in graph:
        if node not in index:
            visit(node)
    assert not cycles, cycles


def test_the_checker_sees_a_circle():
    """The cycle finder is not vacuous: the rules see function-level imports."""
    modules = _modules()
    assert "stablemoe_megatron.training.step" in _imports(PACKAGE / "training" / "probe.py", modules)


@pytest.mark.parametrize("module", ["stablemoe_megatron", "stablemoe_megatron.config", "stablemoe_megatron.cli_args"])
def test_light_imports_do_not_load_torch(module):
    code = f"import sys, {module}; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=60)
    assert out.stdout.strip() == "False", out.stderr[-2000:]
