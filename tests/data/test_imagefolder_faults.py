"""Data that is not what it seems, in generated ImageFolder trees: a corrupt or zero-byte image, one class,
mismatched classes, a directory link loop, files that are not images, a batch larger than a rank's share.
Shapes and counts fail in pre-flight (a listing, no decoding) in one line; an image that cannot be decoded
follows data.bad_images, in the loaders and in the FFCV writer."""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

import pytest
import torch

from gdnsq.cli import main
from gdnsq.config import load_config
from gdnsq.data.facts import scan_data
from gdnsq.data.imagefolder import create_imagefolder_loaders, list_images
from gdnsq.data.synthetic import make_jpeg_imagefolder
from gdnsq.errors import DataError, GdnsqError
from gdnsq.launch.preflight import check_data

CPU = torch.device("cpu")
PER_CLASS, CLASSES = 6, 3


@pytest.fixture
def tree(tmp_path) -> Path:
    """root/{train,val}/c000..c002 with 6 train and 2 val JPEGs each (40x30)."""
    return make_jpeg_imagefolder(tmp_path / "ds", classes=CLASSES, per_class=PER_CLASS, val_per_class=2, size=(40, 30))


def _cfg(root: Path, **overrides):
    settings = {
        "data.kind": "imagefolder",
        "data.train_path": str(root / "train"),
        "data.val_path": str(root / "val"),
        "data.img_size": "24",
        "data.batch_size": "4",
        "data.num_workers": "2",
        "ray.enabled": "false",
    }
    return load_config(None, {**settings, **overrides})


def _one_line(error: pytest.ExceptionInfo) -> str:
    message = str(error.value)
    assert "\n" not in message
    return message


# --------------------------------------------------------------------------------------- pre-flight


def test_one_class_is_refused_before_anything_loads(tree):
    for split in ("train", "val"):
        for extra in ("c001", "c002"):
            shutil.rmtree(tree / split / extra)
    with pytest.raises(DataError) as e:
        check_data(_cfg(tree))
    assert _one_line(e) == f"data.train_path: {tree / 'train'} has 1 class (c000); a classifier needs at least 2"


def test_mismatched_class_folders_are_named(tree):
    (tree / "val" / "c002").rename(tree / "val" / "zebra")
    with pytest.raises(DataError) as e:
        check_data(_cfg(tree))
    assert _one_line(e) == (
        "data.val_path: its class folders differ from data.train_path's (only in train: c002; only in val: zebra)"
    )


@pytest.mark.parametrize("ranks, batch, ok", [(1, 18, True), (1, 19, False), (3, 6, True), (4, 6, False)])
def test_the_batch_must_fit_each_rank_share(tree, ranks, batch, ok):
    cfg = _cfg(tree, **{"data.batch_size": str(batch), "ray.enabled": "true", "ray.num_workers": str(ranks)})
    if ok:
        assert check_data(cfg).train.size == 18
        return
    with pytest.raises(DataError) as e:
        check_data(cfg)
    assert _one_line(e).startswith(f"data.batch_size: {batch} is more than the {18 // ranks} training samples")


def test_the_bundled_batch_is_checked_too():
    with pytest.raises(DataError, match=r"^data\.batch_size: 5000 is more than the 3500 training samples per rank"):
        check_data(load_config(None, {"data.batch_size": "5000", "ray.enabled": "false"}))


def test_a_classifier_narrower_than_the_data_is_refused(tree):
    with pytest.raises(GdnsqError, match=r"^model\.num_classes: 2 is fewer than the data's 3 classes$"):
        check_data(_cfg(tree, **{"model.num_classes": "2"}))


def test_a_crop_larger_than_the_validation_resize_is_refused_in_preflight(tree):
    with pytest.raises(DataError, match=r"^data\.img_size \(64\) must be <= data\.val_resize \(32\)$"):
        check_data(_cfg(tree, **{"data.img_size": "64", "data.val_resize": "32"}))


def test_files_that_are_not_images_are_not_samples(tree):
    for name in ("README.txt", ".DS_Store", "labels.csv"):
        (tree / "train" / "c000" / name).write_text("not an image")
    facts = scan_data(_cfg(tree).data)
    assert facts.train.size == CLASSES * PER_CLASS and facts.train.classes == ("c000", "c001", "c002")


# ------------------------------------------------------------------------------------- link loops


def test_a_directory_link_loop_is_not_followed_and_the_loaders_see_the_same_tree(tree, caplog):
    (tree / "train" / "c000" / "again").symlink_to(tree / "train")  # the dataset root, from inside a class
    (tree / "train" / "c001" / "self").symlink_to(".")
    (tree / "train" / "c002" / "sub").mkdir()
    (tree / "train" / "c002" / "sub" / "up").symlink_to(tree / "train" / "c002")
    shutil.copy(next((tree / "train" / "c002").glob("*.jpg")), tree / "train" / "c002" / "sub" / "extra.jpg")
    with caplog.at_level(logging.WARNING, logger="gdnsq"):
        facts = check_data(_cfg(tree))
    assert facts.train.size == CLASSES * PER_CLASS + 1  # each file once; the real subfolder's image counts
    assert len(facts.train.skipped_links) == 3
    assert "3 directory link(s) not followed" in caplog.text
    train, _, _ = create_imagefolder_loaders(_cfg(tree).data, distributed=False, device=CPU, seed=0)
    assert len(train.loader.dataset) == facts.train.size


def test_a_link_to_another_folder_is_followed_once(tree, tmp_path):
    shared = make_jpeg_imagefolder(tmp_path / "shared", classes=1, per_class=4, size=(40, 30)) / "train" / "c000"
    (tree / "train" / "c000" / "more").symlink_to(shared)
    (tree / "train" / "c000" / "more_again").symlink_to(shared)  # the same folder twice: read once
    files, skipped = list_images(str(tree / "train" / "c000"), (".jpg",))
    assert len(files) == PER_CLASS + 4 and [Path(s).name for s in skipped] == ["more_again"]
    assert files == sorted(files, key=lambda f: (os.path.dirname(f), os.path.basename(f)))  # torchvision's order


# ------------------------------------------------------------------------------------ bad images


def _break(tree: Path) -> tuple[Path, Path]:
    images = sorted((tree / "train" / "c001").glob("*.jpg"))
    corrupt, empty = images[0], images[1]
    corrupt.write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    empty.write_bytes(b"")
    return corrupt, empty


def test_a_bad_image_is_one_line_naming_it_by_default(tree):
    corrupt, empty = _break(tree)
    train, _, _ = create_imagefolder_loaders(_cfg(tree).data, distributed=False, device=CPU, seed=0)
    with pytest.raises(DataError) as e:
        for _ in train:  # decoded in two worker processes; the error is raised in this one
            pass
    message = _one_line(e)
    assert message.startswith("data.train_path: unreadable image ") and (
        str(corrupt) in message or str(empty) in message
    )
    assert message.endswith("replace or remove it, or set data.bad_images: skip")


def test_skip_trains_on_full_batches_and_counts_each_bad_file_once(tree):
    corrupt, empty = _break(tree)
    train, val, _ = create_imagefolder_loaders(
        _cfg(tree, **{"data.bad_images": "skip"}).data, distributed=False, device=CPU, seed=0
    )
    for _ in range(2):
        shapes = [tuple(x.shape) for x, _ in train]
    assert shapes == [(4, 3, 24, 24)] * (CLASSES * PER_CLASS // 4)
    assert {f.split(" (")[0] for f in train.bad_files} == {str(corrupt), str(empty)}
    assert list(val) and not val.bad_files


def test_a_folder_of_nothing_but_broken_images_stops_even_under_skip(tree):
    for image in (tree / "train").rglob("*.jpg"):
        image.write_bytes(b"broken")
    train, _, _ = create_imagefolder_loaders(
        _cfg(tree, **{"data.bad_images": "skip", "data.num_workers": "0"}).data, distributed=False, device=CPU, seed=0
    )
    with pytest.raises(
        DataError, match=r"^data\.train_path: 18 unreadable images in a row .* is it an image folder\?$"
    ):
        next(iter(train))


def test_the_ffcv_writer_honours_the_policy(tree, tmp_path):
    from gdnsq.data.ffcv_io import open_beton, write_beton

    corrupt, empty = _break(tree)
    out = tmp_path / "out" / "train.beton"
    with pytest.raises(DataError) as e:
        write_beton(tree / "train", out, num_workers=2, progress=False)
    message = _one_line(e)  # the first bad file a writer process met, and a count of the others
    assert message.startswith(("unreadable image " + str(corrupt), "unreadable image " + str(empty)))
    assert "(and 1 more)" in message
    assert not out.exists() and list(out.parent.iterdir()) == []
    write_beton(tree / "train", out, num_workers=2, progress=False, bad_images="skip")
    assert open_beton(out).num_samples == CLASSES * PER_CLASS - 2


def test_gdnsq_data_write_takes_the_policy(tree, tmp_path, capsys):
    _break(tree)
    assert main(["data", "write", str(tree), str(tmp_path / "betons")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "unreadable image" in err and "--bad-images skip" in err
    assert not (tmp_path / "betons").exists()
    assert main(["data", "write", str(tree), str(tmp_path / "betons"), "--bad-images", "skip"]) == 0
    assert sorted(p.name for p in (tmp_path / "betons").iterdir()) == ["train.beton", "val.beton"]


# ------------------------------------------------------------------------------------ a whole run


@pytest.mark.timeout(600)
def test_a_run_skips_bad_images_and_counts_them_in_its_summary(tree, tmp_path, capsys):
    _break(tree)
    summary = tmp_path / "summary.json"
    args = [
        "train",
        "--no-ray",
        "--data.kind",
        "imagefolder",
        "--data.train_path",
        str(tree / "train"),
        "--data.val_path",
        str(tree / "val"),
        "--data.img_size",
        "24",
        "--data.batch_size",
        "4",
        "--data.num_workers",
        "0",
        "--train.epochs",
        "1",
        "--train.teacher_epochs",
        "1",
        "--train.max_steps_per_epoch",
        "2",
        "--tracking.enabled",
        "false",
        "--ray.storage_path",
        str(tmp_path / "runs"),
    ]
    assert main([*args, "--name", "strict"]) == 2  # the default: stop, naming the file
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "unreadable image" in err and "data.bad_images: skip" in err
    assert main([*args, "--name", "lenient", "--data.bad_images", "skip", "--summary-json", str(summary)]) == 0
    assert json.loads(summary.read_text())["skipped_images"] == 2
    assert "skipped images   2 unreadable" in capsys.readouterr().out
