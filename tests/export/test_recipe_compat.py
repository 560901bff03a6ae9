"""A packed file written before QuantSpec's bounds were named bound_w / bound_a (its recipe's plan says target_w /
target_a) still loads, with the layers' allocated targets, and gives the same outputs as one written now."""

import torch

from gdnsq.config import BudgetConfig, QuantConfig
from gdnsq.export import export_packed, load_packed
from gdnsq.export.container import read_container, write_container
from gdnsq.quant.layers import iter_quantized
from gdnsq.quant.spec import QuantSpec
from gdnsq.training.models import gdnsq_smallcnn
from gdnsq.training.surgery import calibrate_model, quantize_model
from gdnsq.training.targets import create_targets


def _old_format(path, out):
    """``path`` rewritten as the exporter wrote it before: plan entries' specs under target_w / target_a."""
    manifest, data = read_container(path)
    for entry in manifest["recipe"]["plan"]:
        spec = entry["spec"]
        spec["target_w"], spec["target_a"] = spec.pop("bound_w"), spec.pop("bound_a")
    fields = ("name", "offset", "nbytes", "sha256")
    blobs = [
        (b["name"], bytes(data[b["name"]]), {k: v for k, v in b.items() if k not in fields}) for b in manifest["blobs"]
    ]
    del manifest["blobs"]
    write_container(out, manifest, blobs)


def test_an_old_format_packed_file_loads_with_its_allocated_targets(tmp_path):
    torch.manual_seed(0)
    qcfg = QuantConfig(budget=BudgetConfig(kind="avg_bits_w", value=2.0, max_bits=6))
    model = gdnsq_smallcnn(width=4)
    quantize_model(model, qcfg)
    calibrate_model(model, [torch.randn(8, 1, 28, 28)], 2.2)
    create_targets(qcfg).after_step(model, converged_step=1)  # the budget's allocation: targets below the bound
    allocated = {n: (float(l.target_w), float(l.target_a)) for n, l in iter_quantized(model)}
    assert all(w < 6 for w, _ in allocated.values())
    recipe = {"builder": "timm", "name": "gdnsq_smallcnn", "kwargs": {"width": 4}, "batchnorm": "keep"}
    export_packed(model.eval(), tmp_path / "new.gdnsq", recipe=recipe)
    _old_format(tmp_path / "new.gdnsq", tmp_path / "old.gdnsq")
    manifest, _ = read_container(tmp_path / "old.gdnsq")
    assert (
        "target_w" in manifest["recipe"]["plan"][0]["spec"] and "bound_w" not in manifest["recipe"]["plan"][0]["spec"]
    )

    new, old = load_packed(tmp_path / "new.gdnsq"), load_packed(tmp_path / "old.gdnsq")
    for loaded in (new, old):
        assert {n: (float(l.target_w), float(l.target_a)) for n, l in iter_quantized(loaded)} == allocated
        assert all(l.spec.bound_w == 6.0 for _, l in iter_quantized(loaded))
    x = torch.randn(4, 1, 28, 28)
    with torch.no_grad():
        assert torch.equal(new(x), old(x))
        assert torch.allclose(new(x), model(x), atol=1e-5)


def test_quant_spec_reads_the_old_field_names():
    old = {"target_w": 3.0, "target_a": 2.0, "per_channel": False, "method": "lsq"}
    spec = QuantSpec.from_dict(old)
    assert (spec.bound_w, spec.bound_a, spec.per_channel, spec.method) == (3.0, 2.0, False, "lsq")
    assert QuantSpec.from_dict(spec.as_dict()).as_dict() == spec.as_dict()
