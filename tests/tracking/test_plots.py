"""The run plots draw from a history alone (no MLflow): bits per layer vs depth and vs size."""
from gdnsq.tracking.plots import draw_layer_bits, draw_run_plots


def _history():
    layers = [{"name": f"l{i}", "true_bits_w": b, "true_bits_a": 2, "bits_w": b - 0.1, "bits_a": 1.9,
               "target_w": 8, "target_a": 2, "params": p} for i, (b, p) in enumerate(((3, 100), (1, 9000), (2, 800)))]
    return [{"epoch": 1, "metrics": {"val/top1": 90.0}, "layers": layers}]


def test_bits_per_layer_plot(tmp_path):
    assert draw_layer_bits(_history(), tmp_path / "b.png") and (tmp_path / "b.png").stat().st_size > 1000
    assert not draw_layer_bits([], tmp_path / "none.png")
    assert "bits_per_layer.png" in draw_run_plots(_history(), tmp_path)
