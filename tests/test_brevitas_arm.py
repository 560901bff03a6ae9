"""The method harness's Brevitas arm: Brevitas's quantizers behind gdnsq's interface, and its missing-library error."""

from __future__ import annotations

import sys
import warnings

import pytest
import torch
from benchmark_modules import load


def test_missing_brevitas_is_a_one_line_error(monkeypatch, capsys):
    compare = load("compare_methods")
    monkeypatch.setitem(sys.modules, "brevitas", None)  # import brevitas -> ImportError, as when not installed
    assert compare.main(["--methods", "lsq,brevitas", "--no-record", "--out", "unused"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "pip install 'brevitas==" in err


@pytest.mark.parametrize("bits", [2, 1])
def test_brevitas_student_has_full_grids_learns_its_scales_and_reloads_exactly(bits):
    pytest.importorskip("brevitas")
    arm, compare = load("brevitas_arm"), load("compare_methods")
    from gdnsq.quant.layers import iter_quantized, quantizer_parameters
    from gdnsq.training.surgery import build_student, calibrate_model

    arm.register()
    recipe = compare.load_recipe(compare.parse_args(["--no-record"]))
    cfg = compare.job_config(recipe, {"quant.method": "brevitas", "quant.target_w": bits, "quant.target_a": bits})
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        student = build_student(cfg, num_classes=10, in_chans=1)
        x = torch.rand(16, 1, 28, 28)
        calibrate_model(student, [x, 0.5 * x], 8.0)
        layers = list(iter_quantized(student))
        assert len(quantizer_parameters(student)) == 2 * len(layers)  # one weight and one input scale each
        for _, layer in layers:
            w = layer.weight
            lo, hi, z, s = layer.weight_quant.grid(w)
            codes = torch.round((layer.weight_quant.eval()(w) - z) / s)
            assert int(codes.max() - codes.min()) + 1 == 2**bits  # every level used: no narrow range
            assert layer.act_quant.grid()[0].item() == 0.0  # post-ReLU inputs: an unsigned grid
        student.eval()
        again = build_student(cfg, num_classes=10, in_chans=1)
        again.load_state_dict(student.state_dict())
        again.eval()
        assert torch.equal(student(x), again(x))
