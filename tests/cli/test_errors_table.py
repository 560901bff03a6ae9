"""docs/errors.md, as a test: every bad input tried exits 2 with one stderr line naming the field or file,
before anything trains, and writes nothing (neither in the working folder nor next to its inputs).

Each row runs in-process (``gdnsq.cli.main``) in an empty working folder; its inputs live in another
folder, which must be unchanged afterwards. Regenerate the doc after changing a row or a message::

    PYTHONPATH=. python tests/cli/test_errors_table.py > docs/errors.md
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SWEEP = str(ROOT / "jobs" / "cpu_smallcnn_sweep.yaml")
JOB = str(ROOT / "jobs" / "cpu_smallcnn_w2a2.yaml")
QS = ["quickstart", "--no-ray"]
IMAGES = ["train", "--no-ray", "--data.kind", "imagefolder", "--data.img_size", "16", "--data.batch_size", "2"]
IMAGES += ["--data.train_path"]

# (command, what the one line must name). {in} is the inputs folder (see make_inputs).
ROWS = [
    (QS + ["--target", "W0A2"], "quant.target_w"),
    (QS + ["--target", "banana"], "--target"),
    (QS + ["--quant.target_a", "17"], "quant.target_a"),
    (QS + ["--quant.estimator", "magic"], "quant.estimator"),
    (QS + ["--quant.batchnorm", "melt"], "quant.batchnorm"),
    (QS + ["--quant.act_signed", "maybe"], "quant.act_signed"),
    (QS + ["--quant.init_bits", "1"], "quant.init_bits"),
    (QS + ["--quant.nosuchkey", "1"], "quant.nosuchkey"),
    (QS + ["--quant.method", "lsqq"], "quant.method"),
    (QS + ["--quant.method", "bnnpp"], "quant.method"),
    (QS + ["--quant.method", "codeq", "--target", "W1A2"], "quant.target_w"),
    (QS + ["--quant.rules", "[{pattern: nosuchlayer, skip: true}]"], "quant.rules"),
    (QS + ["--model.name", "no_such_net"], "model.name"),
    (QS + ["--model.checkpoint", "/no/such/teacher.pt"], "model.checkpoint"),
    (QS + ["--train.epochs", "2.5"], "train.epochs: must be an integer"),
    (QS + ["--train.epochs", "0"], "train.epochs"),
    (QS + ["--train.epochs"], "train.epochs: missing value"),
    (QS + ["--train.device", "tpu"], "train.device"),
    (QS + ["--optim.lr", "-1"], "optim.lr"),
    (QS + ["--optim.lr", "fast"], "optim.lr: must be a number"),
    (QS + ["--optim.name", "lion"], "optim.name"),
    (QS + ["--objective.distill", "mse"], "objective.distill"),
    (QS + ["--schedule.anneal", "2"], "schedule.anneal"),
    (QS + ["--data.kind", "parquet"], "data.kind"),
    (QS + ["--data.batch_size", "0"], "data.batch_size"),
    (QS + ["--name", "a/b"], "name"),
    (QS + ["--resume", "nosuch", "--ray.storage_path", "{in}/runs"], "--resume"),
    (QS + ["--target", "W3A3", "--name", "w1a1run", "--ray.storage_path", "{in}/runs"], "quant.target_w 1 -> 3"),
    (QS + ["--ray.storage_path", "{in}/corrupt.pt/runs"], "ray.storage_path: cannot write"),
    (["quickstart", "--ray.checkpoints_to_keep", "1"], "ray.checkpoints_to_keep"),
    (["quickstart", "--ray.num_workers", "0"], "ray.num_workers"),
    (["quickstart", "--ray.address", "http://127.0.0.1:8265"], "ray.address"),
    (["quickstart", "--ray.address", "127.0.0.1:1"], "ray.address"),
    (["train", "/no/such/job.yaml"], "config"),
    (["train", "{in}/bad.yaml"], "bad.yaml:3:2"),
    (["train", "{in}/list.yaml"], "config"),
    (["train", "{in}/pege.yaml"], "quant.method_args.errr_weight"),
    (
        [
            "train",
            "--no-ray",
            "--data.kind",
            "ffcv",
            "--data.train_path",
            "/no/t.beton",
            "--data.val_path",
            "/no/v.beton",
        ],
        "data.train_path",
    ),
    (
        [
            "train",
            "--no-ray",
            "--data.kind",
            "ffcv",
            "--data.train_path",
            "{in}/corrupt.beton",
            "--data.val_path",
            "{in}/corrupt.beton",
        ],
        "data.train_path",
    ),
    (
        [
            "train",
            "--data.kind",
            "ffcv",
            "--data.train_path",
            "{in}/corrupt.beton",
            "--data.val_path",
            "{in}/corrupt.beton",
        ],
        "data.train_path",
    ),
    (
        [
            "train",
            "--data.kind",
            "imagefolder",
            "--data.train_path",
            "{in}/notimages",
            "--data.val_path",
            "{in}/notimages",
        ],
        "data.train_path",
    ),
    (["sweep", SWEEP, "--sweep.metric", "val/ns_top"], "sweep.metric"),
    (["sweep", SWEEP, "--sweep.space.optim.lrr", "{grid: [0.1]}"], "sweep.space.optim.lrr"),
    (["sweep", SWEEP, "--ray.enabled", "false"], "ray.enabled"),
    (["sweep", JOB], "sweep"),
    (["data", "write", "{in}/nosuchsrc", "out"], "nosuchsrc"),
    (["data", "write", "{in}/notimages", "out"], "notimages"),
    (["export", "{in}/corrupt.pt", "--out", "out"], "corrupt.pt"),
    (["export", "/no/such/checkpoint.pt", "--out", "out"], "checkpoint.pt"),
    (["submit", JOB, "--working-dir", "/no/such/dir", "--dry-run"], "--working-dir"),
    # Every setting's declared bounds and its type's rules (issue 28): checked where the value enters.
    (QS + ["--optim.lr", "inf"], "optim.lr: must be a finite number"),
    (QS + ["--optim.lr", "nan"], "optim.lr"),
    (QS + ["--optim.quant_lr", "-inf"], "optim.quant_lr"),
    (QS + ["--optim.weight_decay", "-0.1"], "optim.weight_decay"),
    (QS + ["--data.img_size", "0"], "data.img_size"),
    (QS + ["--data.img_size", "100000"], "data.img_size"),
    (QS + ["--data.num_workers", "-1"], "data.num_workers"),
    (QS + ["--data.val_fraction", "1.5"], "data.val_fraction"),
    (QS + ["--data.batch_size", "1e30"], "data.batch_size"),
    (QS + ["--train.max_steps_per_epoch", "0"], "train.max_steps_per_epoch"),
    (QS + ["--train.seed", "-1"], "train.seed"),
    (QS + ["--train.epochs", "9" * 40], "train.epochs: must be within"),
    (QS + ["--train.patience", "-3"], "train.patience"),
    (QS + ["--objective.p", "nan"], "objective.p"),
    (QS + ["--objective.eps", "0"], "objective.eps"),
    (QS + ["--schedule.warmup", "-inf"], "schedule.warmup"),
    (QS + ["--schedule.check_every", "0"], "schedule.check_every"),
    (QS + ["--quant.init_bits", "30"], "quant.init_bits"),
    (QS + ["--quant.method_args", "{error_weight: nan}"], "quant.method_args.error_weight"),
    (QS + ["--quant.rules", "[{pattern: conv, pattern: fc}]"], "quant.rules: not valid YAML (duplicate key"),
    (QS + ["--quant.budget.value_a", "0.5"], "quant.budget.value_a"),
    (QS + ["--ray.max_failures", "-2"], "ray.max_failures"),
    (QS + ["--tracking.uri", ""], "tracking.uri: must not be empty"),
    (QS + ["--model.name", "resnet18\trm -rf"], "model.name: must not contain control characters"),
    (["train", "{in}/dup.yaml"], "dup.yaml:4:3 is not valid YAML (duplicate key 'lr', first on line 2)"),
    (["train", "{in}/latin1.yaml"], "latin1.yaml:3 is not UTF-8 text"),
    (["train", "{in}/notimages"], "is a directory; give a YAML job file"),
    (["train", "{in}/overrides_a_list.yaml", "--quant.target_w", "2"], "quant: must be a mapping"),
    # A run name is one safe folder name under the storage path, checked before anything trains or moves.
    (QS + ["--name", "..", "--ray.storage_path", "{in}/runs"], "name: must not start with '.'"),
    (QS + ["--name", "..", "--fresh", "--ray.storage_path", "{in}/runs"], "name: must not start with '.'"),
    (QS + ["--name", ".hidden"], "name: must not start with '.'"),
    (QS + ["--name", "../../etc"], "name: must not start with '.'"),
    (QS + ["--name", "a\\b"], "name: must be one folder name"),
    (QS + ["--name", "n" * 240], "name: must be at most 200 bytes"),
    (QS + ["--resume", "x/.."], "name: must be one folder name"),
    (["sweep", SWEEP, "--sweep.name", ".."], "sweep.name: must not start with '.'"),
    # The data against the job, in pre-flight: a listing, never a decode.
    (IMAGES + ["{in}/oneclass/train", "--data.val_path", "{in}/oneclass/val"], "has 1 class (a); a classifier"),
    (IMAGES + ["{in}/images/train", "--data.val_path", "{in}/oneclass/val"], "data.val_path: its class folders"),
    (IMAGES + ["{in}/images/train", "--data.val_path", "{in}/images/val", "--data.batch_size", "5"], "data.batch_size"),
    (IMAGES + ["{in}/bad.yaml", "--data.val_path", "{in}/images/val"], "data.train_path"),
    (IMAGES + ["{in}/images/train", "--data.val_path", "{in}/images/val", "--data.val_resize", "8"], "data.img_size"),
    (
        IMAGES + ["{in}/images/train", "--data.val_path", "{in}/images/val", "--model.name", "vit_tiny_patch16_224"],
        "data.img_size: vit_tiny_patch16_224 cannot take 16x16 images",
    ),
    (QS + ["--data.batch_size", "5000"], "data.batch_size: 5000 is more than the 3500 training samples per rank"),
    (["quickstart", "--ray.num_workers", "4", "--data.batch_size", "1000"], "data.batch_size: 1000 is more than"),
    (QS + ["--model.num_classes", "2"], "model.num_classes: 2 is fewer than the data's 10 classes"),
    (QS + ["--model.in_chans", "3"], "model.in_chans: 3, but the data has 1 channel"),
    (QS + ["--data.bad_images", "ignore"], "data.bad_images: must be one of error, skip"),
    (["quickstart", "--ray.address", "\u6a21\u578b:1"], "ray.address: expected HOST:PORT"),
    (["quickstart", "--ray.address", "127.0.0.1:99999"], "ray.address: expected HOST:PORT"),
    (QS + ["--model.checkpoint", "{in}"], "is a folder; give the weights file in it"),
    (["quickstart", "--dry-run", "--data.batch_size", "5000"], "data.batch_size: 5000 is more than"),
    (["train", "--dry-run", "{in}/dup.yaml"], "duplicate key 'lr'"),
    (QS + ["--dry-run", "--target", "W3A3", "--name", "w1a1run", "--ray.storage_path", "{in}/runs"], "1 -> 3"),
    # Export and pull write into --out: checked before the first byte.
    (["export", "{in}/student.pt", "--out", "{in}/bad.yaml"], "bad.yaml is a file, not a folder"),
    (["export", "{in}/student.pt", "--out", "{in}/bad.yaml/export"], "which is not a folder"),
    (["export", "{in}/student.pt", "--out", "/sys/gdnsq-export"], "--out: cannot write"),
    (["export", "{in}/student.pt", "--out", "out", "--input-size", "0"], "--input-size: must be in [1, 8192]"),
    (["export", "{in}/student.pt", "--out", "out", "--batch", "-1"], "--batch: must be in [1, 1024]"),
    (["models", "pull", "x/1", "--out", "{in}/bad.yaml", "--tracking-uri", "sqlite:///{in}/mlflow.db"], "--out:"),
    (QS + ["--summary-json", "{in}/images"], "images is a folder; give a file path"),
    (QS + ["--summary-json", "{in}/bad.yaml/summary.json"], "which is not a folder"),
    # Usage errors (argparse's): one line saying where the usage is, not the usage block above an error line.
    (["nosuchcommand"], "invalid choice: 'nosuchcommand'"),
    (["models", "nosuch"], "'gdnsq models --help' shows the usage"),
    (["export"], "the following arguments are required: CHECKPOINT_OR_REF, --out"),
    (["export", "{in}/student.pt", "--out"], "argument --out: expected one argument"),
    (QS + ["--dry-run=3"], "--dry-run: ignored explicit argument '3'"),
    (QS + ["--=nan"], "ambiguous option: --=nan"),
    (["models", "list", "--bogus"], "unrecognized arguments: --bogus"),
]


def make_inputs(folder: Path) -> None:
    import mlflow
    import torch

    from gdnsq.config import load_config, to_dict
    from gdnsq.data.synthetic import make_jpeg_imagefolder
    from gdnsq.training.checkpoint import save_checkpoint
    from gdnsq.training.surgery import build_student, calibrate_model

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "bad.yaml").write_text("train:\n  epochs: 3\n bad: [1\n")
    (folder / "list.yaml").write_text("- 1\n- 2\n")
    (folder / "pege.yaml").write_text("ray: {enabled: false}\nquant: {method: pege, method_args: {errr_weight: 0.1}}\n")
    (folder / "corrupt.beton").write_bytes(b"\0" * 4096)
    (folder / "dup.yaml").write_text("optim:\n  lr: 0.1\n  name: sgd\n  lr: 0.2\n")
    (folder / "latin1.yaml").write_bytes("train:\n  epochs: 2\nname: caf\u00e9\n".encode("latin-1"))
    (folder / "overrides_a_list.yaml").write_text("quant: [1, 2]\n")
    make_jpeg_imagefolder(folder / "images", classes=2, per_class=2, val_per_class=1, size=(16, 16))
    make_jpeg_imagefolder(folder / "oneclass", classes=1, per_class=2, val_per_class=1, size=(16, 16))
    for split in ("train", "val"):
        (folder / "oneclass" / split / "c000").rename(folder / "oneclass" / split / "a")
    (folder / "corrupt.pt").write_bytes(b"not a checkpoint")
    (folder / "notimages").mkdir()
    (folder / "notimages" / "readme.txt").write_text("no class folders here")
    student = build_student(load_config(None, {}), 10, 1)
    calibrate_model(student, [torch.randn(8, 1, 28, 28) for _ in range(2)], init_bits=2)
    state = {"config": to_dict(load_config(None, {})), "engine": {"model": student.state_dict()}, "best": {}}
    torch.save({**state, "best": {"ns_top1": -1.0, "state": None}}, folder / "student.pt")
    mlflow.MlflowClient(f"sqlite:///{folder / 'mlflow.db'}").search_registered_models()  # an empty store
    stored = to_dict(load_config(None, {"name": "w1a1run", "quant.target_w": 1, "quant.target_a": 1}))
    save_checkpoint(
        {"config": stored, "engine": {"epoch": 1, "model": {}}}, folder / "runs" / "w1a1run" / "checkpoint.pt"
    )


def tree(folder: Path) -> dict[str, float | None]:
    """Every path under ``folder``, with its mtime for files (a probe file made and removed again
    changes its folder's mtime, not what the folder holds)."""
    return {str(p.relative_to(folder)): (p.stat().st_mtime if p.is_file() else None) for p in folder.rglob("*")}


def run_row(argv: list[str], inputs: Path, work: Path) -> tuple[int, str]:
    from gdnsq.cli import main

    cwd = os.getcwd()
    os.chdir(work)
    try:
        return main([a.replace("{in}", str(inputs)) for a in argv]), ""
    except SystemExit as e:  # argparse's usage errors
        return e.code, ""
    finally:
        os.chdir(cwd)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    folder = tmp_path_factory.mktemp("inputs")
    make_inputs(folder)
    return folder


@pytest.mark.timeout(120)
@pytest.mark.parametrize("argv, names", ROWS, ids=[" ".join(r[0][:4]) for r in ROWS])
def test_bad_input_exits_2_with_one_line_and_writes_nothing(argv, names, inputs, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    before = tree(inputs)
    rc, _ = run_row(argv, inputs, tmp_path)
    err = capsys.readouterr().err.strip()
    assert rc == 2, err
    assert err.startswith("gdnsq: error: ") and "\n" not in err, err
    assert names in err, err
    assert list(tmp_path.iterdir()) == [], "a failed command left files in the working folder"
    assert tree(inputs) == before, "a failed command changed its inputs' folder"


def test_docs_list_every_row():
    doc = (ROOT / "docs" / "errors.md").read_text()
    for argv, _ in ROWS:
        assert f"`gdnsq {' '.join(argv)}`".replace(str(ROOT) + "/", "") in doc, argv


if __name__ == "__main__":  # regenerate docs/errors.md
    import contextlib
    import io
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        inputs = Path(d) / "in"
        make_inputs(inputs)
        print("# Bad input: one line, exit 2, nothing written\n")
        print("Every row is run by `tests/cli/test_errors_table.py` in an empty folder; `{in}` is a folder of bad")
        print("inputs (an invalid YAML file, a zeroed `.beton`, a folder without class folders, a checkpoint of a")
        print("W1A1 run named `w1a1run`, ...). Each exits with status 2, prints one line naming the field or file,")
        print(
            "and writes nothing. Regenerate with\n"
            "`PYTHONPATH=. python tests/cli/test_errors_table.py > docs/errors.md`.\n"
        )
        print("| command | exit | message |\n|---|---|---|")
        for argv, _ in ROWS:
            work = Path(d) / "work"
            work.mkdir()
            err = io.StringIO()
            with contextlib.redirect_stderr(err):
                rc, _ = run_row(argv, inputs, work)
            line = err.getvalue().strip().splitlines()[-1].replace(str(inputs), "{in}").replace(str(ROOT) + "/", "")
            cmd = " ".join(argv).replace(str(ROOT) + "/", "")
            print(f"| `gdnsq {cmd}` | {rc} | {line.replace('|', '/')} |")
            os.rmdir(work)
        sys.stdout.flush()
