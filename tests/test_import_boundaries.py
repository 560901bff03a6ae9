"""Imports point down the layers: quant is pure torch, training is framework-free, Ray lives only in
gdnsq.launch, MLflow only in gdnsq.tracking, FFCV only in gdnsq.data.

Two kinds of check: fresh subprocesses that import modules and read ``sys.modules`` (module-level
imports, including ones pulled in through another gdnsq module), and a scan of every source file's
import statements (imports inside functions, which only run when called).
"""

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

import gdnsq

PACKAGE = Path(gdnsq.__file__).parent


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


ALL_MODULES = sorted(_module_name(p) for p in PACKAGE.rglob("*.py") if p.stem != "__main__")
# The one package allowed to import each edge library (launch and cli sit above tracking and may reach it).
EDGE_OWNERS = {"ray": "gdnsq.launch", "mlflow": "gdnsq.tracking", "ffcv": "gdnsq.data"}


def _loaded_after(imports: list[str]) -> list[str]:
    """``sys.modules`` of a fresh interpreter after importing ``imports``."""
    code = (
        f"import sys, json, importlib\nfor m in {imports!r}:\n    importlib.import_module(m)\n"
        "print(json.dumps(sorted(sys.modules)))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def _under(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


def test_module_list_covers_every_layer():
    for package in (
        "gdnsq.quant.zoo",
        "gdnsq.data",
        "gdnsq.training",
        "gdnsq.tracking",
        "gdnsq.launch",
        "gdnsq.export",
        "gdnsq.cli",
    ):
        assert any(_under(m, package) and m != package for m in ALL_MODULES), package


def test_quant_imports_only_torch_the_stdlib_and_errors():
    with_torch = {m.split(".")[0] for m in _loaded_after(["torch"])}
    loaded = _loaded_after(["gdnsq.quant"])
    ours = {m for m in loaded if _under(m, "gdnsq")}
    # the package root (a lazy table) and its version module always load with any submodule
    assert ours - {"gdnsq", "gdnsq._version", "gdnsq.errors"} <= {m for m in ours if _under(m, "gdnsq.quant")}, sorted(
        ours
    )
    assert "gdnsq.quant.zoo.lsq" in ours  # importing gdnsq.quant registers the zoo
    others = {m.split(".")[0] for m in loaded} - with_torch - set(sys.stdlib_module_names) - {"gdnsq"}
    assert not others, f"gdnsq.quant imports more than torch and the stdlib: {sorted(others)}"


def test_quant_submodules_import_without_a_cycle():
    for module in ("gdnsq.quant.zoo.lsq", "gdnsq.quant.methods", "gdnsq.quant.layers", "gdnsq.quant.quantizer"):
        assert module in _loaded_after([module])


@pytest.mark.parametrize("library", sorted(EDGE_OWNERS))
def test_no_module_outside_its_owner_loads_an_edge_library(library):
    owner = EDGE_OWNERS[library]
    above = ("gdnsq.launch", "gdnsq.cli") if library == "mlflow" else ()  # layers that may call tracking
    modules = [m for m in ALL_MODULES if not _under(m, owner) and not any(_under(m, a) for a in above)]
    assert any(_under(m, "gdnsq.training") for m in modules)
    loaded = _loaded_after(modules)
    assert not [m for m in loaded if _under(m, library)], f"importing {len(modules)} modules loaded {library}"


def _imported_libraries(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module.split(".")[0])
    return found


def test_edge_libraries_are_imported_only_by_their_owner_package():
    offenders = []
    for path in sorted(PACKAGE.rglob("*.py")):
        module = _module_name(path)
        for library in _imported_libraries(path) & set(EDGE_OWNERS):
            if not _under(module, EDGE_OWNERS[library]):
                offenders.append(f"{module} imports {library}")
    assert not offenders, offenders


def test_cli_help_does_not_import_torch():
    loaded = _loaded_after(["gdnsq", "gdnsq.cli", "gdnsq.cli.main"])
    assert not [m for m in loaded if _under(m, "torch") or _under(m, "ray") or _under(m, "mlflow")]
