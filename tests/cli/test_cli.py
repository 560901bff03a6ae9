"""Bad input stops with one line naming the field, exit status 2, before anything runs or is written."""

import pytest

from gdnsq.cli import main


@pytest.mark.parametrize(
    "argv, field",
    [
        (["quickstart", "--target", "W0A2"], "quant.target_w"),
        (["quickstart", "--quant.target_a", "17"], "quant.target_a"),
        (["quickstart", "--quant.estimator", "magic"], "quant.estimator"),
        (["quickstart", "--model.name", "no_such_net"], "model.name"),
        (["quickstart", "--model.checkpoint", "/no/such/teacher.pt"], "model.checkpoint"),
        (["quickstart", "--quant.nosuchkey", "1"], "quant.nosuchkey"),
        (
            ["train", "--data.kind", "ffcv", "--data.train_path", "/no/train.beton", "--data.val_path", "/no/v.beton"],
            "data.train_path",
        ),
        (["train", "/no/such/job.yaml"], "config"),
    ],
)
def test_bad_input_is_one_line_exit_2(argv, field, tmp_path, capsys):
    summary = tmp_path / "out" / "summary.json"
    assert main(argv + ["--summary-json", str(summary)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"gdnsq: error: {field}") and "\n" not in err
    assert not summary.exists() and not summary.parent.exists()


@pytest.mark.parametrize(
    "argv, field",
    [
        (["quickstart", "--quant.method", "lsqq"], "quant.method"),
        (["quickstart", "--no-ray", "--quant.method", "lsqq"], "quant.method"),
        (["quickstart", "--quant.method", "bnnpp"], "quant.method"),  # bnnpp is W1A1 only
        (["quickstart", "--quant.method", "codeq", "--target", "W1A2"], "quant.target_w"),
        (["train", "{job}"], "quant.method_args.errr_weight"),
    ],
)
def test_bad_quant_method_fails_in_preflight_before_anything_trains(argv, field, tmp_path, capsys, monkeypatch):
    import gdnsq.launch.local
    import gdnsq.launch.ray_train

    def must_not_run(*args, **kwargs):
        raise AssertionError("training started")

    monkeypatch.setattr(gdnsq.launch.local, "run_local", must_not_run)
    monkeypatch.setattr(gdnsq.launch.ray_train, "fit", must_not_run)
    job = tmp_path / "job.yaml"
    job.write_text("ray: {enabled: false}\nquant: {method: pege, method_args: {errr_weight: 0.1}}\n")
    assert main([a.format(job=job) for a in argv] + ["--ray.storage_path", str(tmp_path / "runs")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"gdnsq: error: {field}") and "\n" not in err
    assert not (tmp_path / "runs").exists()
