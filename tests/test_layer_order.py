"""The layer order between gdnsq's own folders, read from the source (an AST scan of every import, inside
functions too): no import points to a higher floor, and no set of modules imports itself round in a circle.

Floors, bottom up (README "Layout"): errors, config -> quant -> data -> training -> tracking -> export -> launch
-> cli. The package's ``__init__`` (the public API, lazy) sits above them all.
"""

import ast
from pathlib import Path

import gdnsq

PACKAGE = Path(gdnsq.__file__).parent
FLOORS = ["_version", "errors", "config", "quant", "data", "training", "tracking", "export", "launch", "cli"]


def _module(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _floor(module: str) -> int:
    if module == "gdnsq":
        return len(FLOORS)
    return FLOORS.index(module.split(".")[1])


def _imports(path: Path) -> set[str]:
    """The gdnsq modules ``path`` imports (relative or absolute), resolved to module names."""
    module = _module(path)
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.split(".")[0] == "gdnsq"}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            elif (node.module or "").split(".")[0] == "gdnsq":
                target = node.module
            else:
                continue
            # `from . import x` / `from .pkg import mod` name modules; other names are attributes of target
            names = [f"{target}.{a.name}" for a in node.names]
            found |= {n for n in names if n in MODULES} or {target}
    return {m for m in found if m in MODULES and m != module}


MODULES = {_module(p) for p in PACKAGE.rglob("*.py")}
GRAPH = {_module(p): _imports(p) for p in PACKAGE.rglob("*.py")}


def test_every_module_sits_on_a_floor():
    assert all(_floor(m) >= 0 for m in MODULES)
    assert {m.split(".")[1] for m in MODULES if m != "gdnsq"} <= set(FLOORS)


def test_no_import_points_up():
    up = sorted(f"{a} -> {b}" for a, targets in GRAPH.items() for b in targets if _floor(b) > _floor(a))
    assert not up, "imports that point to a higher floor:\n" + "\n".join(up)


def _circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan), each sorted."""
    index, low, stack, on, out = {}, {}, [], set(), []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            part = []
            while True:
                w = stack.pop()
                on.discard(w)
                part.append(w)
                if w == v:
                    break
            if len(part) > 1:
                out.append(sorted(part))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_no_modules_import_each_other_in_a_circle():
    assert _circles(GRAPH) == []


def test_the_scan_sees_a_circle_and_an_upward_import():
    # The checks above are only as good as the scan: a made-up graph with both defects is caught.
    assert _circles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert "gdnsq.launch.run" in GRAPH["gdnsq.cli.train"]  # a function-level relative import is seen
    assert _floor("gdnsq.cli.train") > _floor("gdnsq.launch.run") > _floor("gdnsq.training.job")
