"""The maths and the engine import none of Ray, MLflow or FFCV."""
import json
import subprocess
import sys


def test_core_imports_no_edge_libraries():
    code = ("import sys, json; import gdnsq.quant, gdnsq.training.objective, gdnsq.training.schedules, gdnsq.training.engine, "
            "gdnsq.training.surgery, gdnsq.training.job, gdnsq.training.bits; "
            "print(json.dumps(sorted(m for m in ('ray', 'mlflow', 'ffcv') if m in sys.modules)))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert json.loads(out.stdout.strip().splitlines()[-1]) == []
