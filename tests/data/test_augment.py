"""data.augment: each setting reaches the ImageFolder (timm) and FFCV training pipelines; mistakes are one line."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from gdnsq.config import DataConfig, flatten, load_config, setting_type, to_dict
from gdnsq.data.imagefolder import create_imagefolder_loaders
from gdnsq.data.synthetic import make_jpeg_imagefolder
from gdnsq.errors import ConfigError

JOBS = Path(__file__).resolve().parents[2] / "jobs"
CPU = torch.device("cpu")
SET = {
    "scale": [0.3, 0.9],
    "ratio": [0.5, 2.0],
    "hflip": 0.25,
    "vflip": 0.75,
    "color_jitter": 0.3,
    "auto_augment": "rand-m9-mstd0.5",
    "re_prob": 0.4,
}


@pytest.fixture(scope="module")
def jpegs(tmp_path_factory) -> Path:
    return make_jpeg_imagefolder(tmp_path_factory.mktemp("aug"), classes=2, per_class=4, size=(40, 40))


def _data(kind, train, val, augment) -> DataConfig:
    return load_config(
        None,
        {
            "data.kind": kind,
            "data.train_path": str(train),
            "data.val_path": str(val),
            "data.img_size": 32,
            "data.val_resize": 36,
            "data.batch_size": 2,
            "data.num_workers": 0,
            **{f"data.augment.{k}": v for k, v in augment.items()},
        },
    ).data


def _ops(loader) -> list:
    return list(loader.loader.dataset.transform.transforms)


def _one(ops, cls):
    found = [op for op in ops if type(op).__name__ == cls]
    assert len(found) == 1, (cls, ops)
    return found[0]


def test_every_setting_reaches_the_imagefolder_pipeline(jpegs):
    d = _data("imagefolder", jpegs / "train", jpegs / "val", SET)
    train, _, _ = create_imagefolder_loaders(d, distributed=False, device=CPU, seed=0)
    ops = _ops(train)
    crop = _one(ops, "RandomResizedCropAndInterpolation")
    assert tuple(crop.scale) == (0.3, 0.9) and tuple(crop.ratio) == (0.5, 2.0)
    assert _one(ops, "RandomHorizontalFlip").p == 0.25
    assert _one(ops, "RandomVerticalFlip").p == 0.75
    assert _one(ops, "RandAugment") is not None  # timm: an auto-augment policy replaces colour jitter
    assert _one(ops, "RandomErasing").probability == 0.4
    x, _ = next(iter(train))
    assert x.shape == (2, 3, 32, 32)
    # Colour jitter (without an auto-augment policy, which takes its place in timm).
    d = _data("imagefolder", jpegs / "train", jpegs / "val", {"color_jitter": 0.3})
    jitter = _one(_ops(create_imagefolder_loaders(d, distributed=False, device=CPU, seed=0)[0]), "ColorJitter")
    assert jitter.brightness == (0.7, 1.3) and jitter.saturation == (0.7, 1.3)


def test_default_is_light_and_imagenet_jobs_keep_their_protocol(jpegs):
    d = _data("imagefolder", jpegs / "train", jpegs / "val", {})
    ops = _ops(create_imagefolder_loaders(d, distributed=False, device=CPU, seed=0)[0])
    assert tuple(_one(ops, "RandomResizedCropAndInterpolation").scale) == (0.6, 1.0)
    names = {type(op).__name__ for op in ops}
    assert not names & {"RandomHorizontalFlip", "RandomVerticalFlip", "ColorJitter", "RandAugment", "RandomErasing"}
    for path in sorted(JOBS.glob("imagenet_*.yaml")):
        a = load_config(path).data.augment
        assert (a.scale, a.hflip) == ([0.08, 1.0], 0.5), path.name


def test_every_ffcv_setting_reaches_the_ffcv_pipeline(jpegs, tmp_path):
    from gdnsq.data.ffcv_io import create_ffcv_loaders, train_augment, write_imagenet

    sub = {k: SET[k] for k in ("scale", "ratio", "hflip", "color_jitter")}
    train_b, val_b = write_imagenet(jpegs, tmp_path, num_workers=1, progress=False)
    d = _data("ffcv", train_b, val_b, sub)
    decoder, flip, *jitter = train_augment(d)
    assert (decoder.scale, decoder.ratio) == ((0.3, 0.9), (0.5, 2.0))
    assert flip.flip_prob == 0.25
    assert [type(op).__name__ for op in jitter] == ["RandomBrightness", "RandomContrast", "RandomSaturation"]
    assert all(op.magnitude == 0.3 and op.p == 1.0 for op in jitter)
    assert len(train_augment(_data("ffcv", train_b, val_b, {}))) == 1  # the default: the crop alone
    train, _, _ = create_ffcv_loaders(d, distributed=False, device=CPU, seed=0)
    x, _ = next(iter(train))
    assert x.shape == (2, 3, 32, 32)


@pytest.mark.parametrize(
    ("over", "message"),
    [
        ({"data.augment.hflipp": 0.5}, "data.augment.hflipp: unknown setting; did you mean data.augment.hflip"),
        ({"data.augment.hflip": 1.5}, "data.augment.hflip: must be a probability in [0, 1], got 1.5"),
        ({"data.augment.scale": "[0.5]"}, "data.augment.scale: must be [low, high]"),
        ({"data.augment.scale": "[0.9, 0.5]"}, "data.augment.scale: must be [low, high] with 0 < low <= high <= 1"),
        ({"data.augment.auto_augment": "best"}, "data.augment.auto_augment: not a timm policy name"),
    ],
)
def test_mistakes_are_one_line(over, message):
    with pytest.raises(ConfigError) as e:
        load_config(None, over)
    assert str(e.value).startswith(message) and "\n" not in str(e.value)


def test_ffcv_refuses_what_it_has_no_op_for():
    with pytest.raises(ConfigError, match=r"^data.augment.vflip: not available with data.kind ffcv"):
        load_config(None, {"data.kind": "ffcv", "data.train_path": "a", "data.val_path": "b", "data.augment.vflip": 1})


def test_settings_have_dotted_names_for_yaml_cli_sweeps_and_mlflow():
    keys = flatten(to_dict(load_config()))
    assert {f"data.augment.{k}" for k in SET} <= set(keys)
    assert setting_type("data.augment.hflip") is float and setting_type("data.augment.auto_augment") is str
    cfg = load_config(None, {"data.augment.scale": "[0.2, 1]", "data.augment.hflip": "0.5"})
    assert cfg.data.augment.scale == [0.2, 1.0] and cfg.data.augment.hflip == 0.5
