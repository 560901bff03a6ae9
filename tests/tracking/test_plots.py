"""The run plots draw from a history alone (no MLflow): bits per layer vs depth and vs size."""

from gdnsq.tracking.plots import draw_layer_bits, draw_run_plots


def _history():
    layers = [
        {
            "name": f"l{i}",
            "true_bits_w": b,
            "true_bits_a": 2,
            "bits_w": b - 0.1,
            "bits_a": 1.9,
            "target_w": 8,
            "target_a": 2,
            "params": p,
        }
        for i, (b, p) in enumerate(((3, 100), (1, 9000), (2, 800)))
    ]
    return [{"epoch": 1, "metrics": {"val/top1": 90.0}, "layers": layers}]


def test_bits_per_layer_plot(tmp_path):
    assert draw_layer_bits(_history(), tmp_path / "b.png") and (tmp_path / "b.png").stat().st_size > 1000
    assert not draw_layer_bits([], tmp_path / "none.png")
    assert "bits_per_layer.png" in draw_run_plots(_history(), tmp_path)


def test_pareto_front_plot(tmp_path):
    from gdnsq.tracking.plots import draw_pareto_front

    points = [
        {
            "label": "a",
            "top1": 80.0,
            "converged": True,
            "bytes_payload": 100,
            "bops": 9e6,
            "front_bytes": True,
            "front_bops": False,
        },
        {
            "label": "b",
            "top1": 85.0,
            "converged": True,
            "bytes_payload": 200,
            "bops": 5e6,
            "front_bytes": True,
            "front_bops": True,
        },
        {"label": "c", "top1": 99.0, "converged": False, "bytes_payload": 50, "bops": None},
    ]
    assert draw_pareto_front(points, tmp_path / "f.png", "t") and (tmp_path / "f.png").stat().st_size > 1000
    assert not draw_pareto_front([{"label": "x", "top1": 1.0}], tmp_path / "none.png")
    assert not (tmp_path / "none.png").exists()
