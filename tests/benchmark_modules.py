"""The benchmark scripts (benchmarks/*.py are scripts, not a package) loaded as modules for the tests."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def load(name: str):
    sys.path.insert(0, str(ROOT / "benchmarks"))  # a script's own imports of its neighbours (provenance, ...)
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up there (string annotations)
    spec.loader.exec_module(module)
    return module
