"""The package's layers, read from its source: arrows point down (zsq -> integrations -> core),
no integration imports another, nobody imports another package's private names, no cycles.

Layers (docs/ARCHITECTURE.md):
    core         granq_ao.{config, functional, granularity, relu, diagnostics, ops, qdq_graph, onnx_export,
                          saved_settings, quantizer_state}
    integrations granq_ao.integrations.<toolchain>   (may import the core and itself)
    zsq          granq_ao.zsq                        (may import integrations and the core)
    front        granq_ao (its __init__)             re-exports; nothing inside the package imports it
"""
import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "granq_ao"
CORE = {"granq_ao.config", "granq_ao.functional", "granq_ao.granularity", "granq_ao.relu", "granq_ao.onnx_export",
        "granq_ao.diagnostics", "granq_ao.ops", "granq_ao.qdq_graph", "granq_ao.saved_settings",
        "granq_ao.quantizer_state", "granq_ao.student_protocol",
        "granq_ao.fx_graph"}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports_of(path: Path):
    """``(imported module, imported names)`` for each ``import``/``from`` inside granq_ao, relative
    imports resolved."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "granq_ao":
                    yield alias.name, ()
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] == "granq_ao":
                yield target, tuple(alias.name for alias in node.names)


MODULES = {module_name(p): p for p in PACKAGE.rglob("*.py")}


def resolve(target: str, names):
    """Modules an import statement reaches: ``from pkg import sub`` reaches ``pkg.sub`` (running
    ``pkg/__init__`` on the way is not a dependency on its names); ``from mod import name``, ``mod``."""
    submodules = [f"{target}.{name}" for name in names if f"{target}.{name}" in MODULES]
    return submodules if submodules and len(submodules) == len(names) else [target] + submodules


def layer(module: str) -> str:
    if module == "granq_ao":
        return "front"
    if module in CORE:
        return "core"
    if module.startswith("granq_ao.integrations."):
        return "integration:" + module.split(".")[2]
    if module == "granq_ao.integrations":
        return "integrations-index"
    if module.startswith("granq_ao.zsq"):
        return "zsq"
    raise AssertionError(f"{module} belongs to no layer: add it to a layer or to CORE")


EDGES = sorted({(src, dst) for src, path in MODULES.items() for target, names in imports_of(path)
                for dst in resolve(target, names) if dst != src})


def test_every_module_has_a_layer():
    for module in MODULES:
        layer(module)


@pytest.mark.parametrize("src, dst", EDGES)
def test_imports_point_down(src, dst):
    a, b = layer(src), layer(dst)
    if a == "front" or a == b:
        return
    allowed = {"core": set(), "zsq": {"core"}, "integrations-index": set()}
    if a.startswith("integration:"):
        assert b == "core", f"{src} (an integration) imports {dst} ({b}): integrations use the core only"
        return
    if a == "zsq":
        assert b == "core" or b.startswith("integration:"), f"{src} imports {dst} ({b})"
        return
    assert b in allowed[a], f"{src} ({a}) imports {dst} ({b}): an upward import"


def test_no_private_names_across_packages():
    for src, path in MODULES.items():
        own_package = src.rsplit(".", 1)[0] if path.name != "__init__.py" else src
        for target, names in imports_of(path):
            for piece in target.split(".")[1:] + [n for n in names]:
                if piece.startswith("_") and not piece.startswith("__"):
                    same_package = target.startswith(own_package + ".") or target == own_package
                    assert same_package, f"{src} imports the private name {piece!r} from {target}"


def test_no_import_cycles():
    graph = {}
    for src, dst in EDGES:
        if dst in MODULES:
            graph.setdefault(src, set()).add(dst)
    # a package __init__ that re-exports its submodules is not a cycle of its own code
    graph = {src: {dst for dst in dsts if not (MODULES[dst].name == "__init__.py" and src.startswith(dst + "."))}
             for src, dsts in graph.items()}
    state = {}

    def visit(node, stack):
        state[node] = "open"
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                raise AssertionError("import cycle: " + " -> ".join(stack[stack.index(nxt):] + [nxt]))
            if nxt not in state:
                visit(nxt, stack + [nxt])
        state[node] = "done"

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])


def test_the_checks_can_fail(tmp_path):
    """The layer rule rejects the kinds of import this package once had."""
    with pytest.raises(AssertionError, match="integrations use the core only"):
        test_imports_point_down("granq_ao.integrations.pytorch_quantization._placement",
                                "granq_ao.integrations.torch_ao.placement")
    with pytest.raises(AssertionError, match="upward import"):
        test_imports_point_down("granq_ao.functional", "granq_ao.zsq.trainer")


SIZE_EXCEPTIONS: set = set()  # none: every module of granq_ao/ keeps the limits


def test_no_function_over_60_lines_and_no_class_over_250(load_script, tmp_path):
    """The structure targets of docs/ARCHITECTURE.md, measured by benchmarks/code_size.py."""
    code_size = load_script("benchmarks/code_size.py")
    found = code_size.measure(PACKAGE)
    too_long = [f"{entry['path']}:{entry['line']} {entry['name']} ({entry['lines']} lines)"
                for kind, limit in (("functions", 60), ("classes", 250)) for entry in found[kind]
                if entry["lines"] > limit and entry["path"] not in SIZE_EXCEPTIONS]
    assert not too_long, too_long
    # the measurement itself: a nested function counts on its own and inside its parent
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "m.py").write_text("class A:\n    def f(self):\n        def g():\n            pass\n"
                                           "        return g\n")
    sizes = {entry["name"]: entry["lines"] for kind in ("functions", "classes")
             for entry in code_size.measure(tmp_path / "pkg")[kind]}
    assert sizes == {"A": 5, "A.f": 4, "A.f.<locals>.g": 2}
