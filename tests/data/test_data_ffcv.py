"""FFCV writer and loaders, and the torchvision fallback, on real JPEGs and real .beton files.

Loader tests carry a timeout: a badly ordered FFCV pipeline spins forever instead of failing.
The first pass of each FFCV loader JIT-compiles its pipeline (~10 s here), so loaders are
built once per module and shared.
"""

import gc
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("ffcv")

from gdnsq.config import DataConfig  # noqa: E402
from gdnsq.data.ffcv_io import (  # noqa: E402
    beton_num_classes,
    create_ffcv_loaders,
    open_beton,
    write_beton,
    write_imagenet,
)
from gdnsq.data.imagefolder import (  # noqa: E402
    IMAGENET_MEAN,
    IMAGENET_STD,
    create_imagefolder_loaders,
)
from gdnsq.data.synthetic import make_jpeg_imagefolder  # noqa: E402
from gdnsq.errors import DataError  # noqa: E402

pytestmark = [
    pytest.mark.integration,
    # numba's dispatcher finalizer raises KeyError when a dropped FFCV loader's pipeline is
    # collected; harmless, and not ours to fix.
    pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning"),
]

CLASSES, PER_CLASS, VAL_PER_CLASS = 4, 6, 3
IMG, RESIZE, BATCH = 64, 80, 4
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def jpegs(tmp_path_factory) -> Path:
    return make_jpeg_imagefolder(
        tmp_path_factory.mktemp("jpegs"), classes=CLASSES, per_class=PER_CLASS, val_per_class=VAL_PER_CLASS
    )


@pytest.fixture(scope="module")
def betons(jpegs, tmp_path_factory) -> tuple[Path, Path]:
    return write_imagenet(jpegs, tmp_path_factory.mktemp("betons"), num_workers=2, progress=False)


def _cfg(kind, train, val, **kw) -> DataConfig:
    settings = dict(img_size=IMG, val_resize=RESIZE, batch_size=BATCH, num_workers=2) | kw
    return DataConfig(kind=kind, train_path=str(train), val_path=str(val), **settings)


@pytest.fixture(scope="module")
def ffcv_loaders(betons):
    loaders = list(create_ffcv_loaders(_cfg("ffcv", *betons), distributed=False, device=CPU, seed=0))
    yield loaders
    loaders.clear()  # pytest keeps the fixture value until after this teardown
    _collect_now()


def _collect_now():
    # Collect dropped FFCV loaders here, where numba's noisy finalizer is filtered, and not at a
    # random later point (a GC inside ast.parse then trips CPython 3.11.7's "AST constructor
    # recursion depth mismatch" SystemError, e.g. in a plugin's lazy import at session end).
    gc.collect()


@pytest.fixture(scope="module")
def tv_loaders(jpegs):
    return create_imagefolder_loaders(
        _cfg("imagefolder", jpegs / "train", jpegs / "val"), distributed=False, device=CPU, seed=0
    )


def _unnormalise(x: torch.Tensor) -> torch.Tensor:
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return x * std + mean


def _check_batch(x, y, batch):
    assert x.shape == (batch, 3, IMG, IMG) and x.dtype == torch.float32
    assert y.shape == (batch,) and y.dtype == torch.int64
    assert 0 <= int(y.min()) and int(y.max()) < CLASSES
    pixels = _unnormalise(x)  # normalised with ImageNet mean/std <=> back in [0, 1]
    assert -1e-3 <= float(pixels.min()) and float(pixels.max()) <= 1 + 1e-3
    assert float(pixels.std()) > 0.05  # real image content, not a constant


# ------------------------------------------------------------------------------------ writer


def test_write_imagenet_writes_complete_betons_in_imagefolder_order(jpegs, betons):
    from torchvision.datasets import ImageFolder

    train, val = betons
    assert [p.name for p in sorted(train.parent.iterdir())] == ["train.beton", "val.beton"]  # no temp files
    for path, split, n in ((train, "train", PER_CLASS), (val, "val", VAL_PER_CLASS)):
        reader = open_beton(path)
        labels = reader.metadata[f"f{reader.field_names.index('label')}"]
        assert reader.num_samples == CLASSES * n
        assert labels.tolist() == [label for _, label in ImageFolder(str(jpegs / split)).samples]
    assert beton_num_classes(train) == CLASSES


# ------------------------------------------------------------------------------------ loaders


@pytest.mark.timeout(120)
def test_ffcv_train_loader_yields_normalised_random_crops(ffcv_loaders):
    train, _, num_classes = ffcv_loaders
    assert num_classes == CLASSES
    assert len(train) == CLASSES * PER_CLASS // BATCH
    seen = []
    for x, y in train:
        _check_batch(x, y, BATCH)
        seen += y.tolist()
    assert sorted(seen) == sorted(np.repeat(range(CLASSES), PER_CLASS).tolist())  # each image once
    assert train.next_epoch == 1


@pytest.mark.timeout(120)
def test_ffcv_train_shuffle_continues_from_resume_epoch(betons, ffcv_loaders):
    train, _, _ = ffcv_loaders
    epoch0 = train.traversal_order.sample_order(0)
    resumed, _, _ = create_ffcv_loaders(_cfg("ffcv", *betons), distributed=False, device=CPU, seed=0, epoch=3)
    assert resumed.next_epoch == 3
    assert np.array_equal(resumed.next_traversal_order(), train.traversal_order.sample_order(3))
    assert not np.array_equal(resumed.next_traversal_order(), epoch0)
    del resumed
    _collect_now()


@pytest.mark.timeout(120)
def test_order_choice_without_os_cache_and_distributed(betons, jpegs, tmp_path):
    from ffcv.traversal_order import QuasiRandom, Random

    loaders = list(create_ffcv_loaders(_cfg("ffcv", *betons, os_cache=False), distributed=False, device=CPU, seed=0))
    assert isinstance(loaders[0].traversal_order, QuasiRandom)  # data larger than RAM: page-wise shuffle
    assert sorted(loaders[0].next_traversal_order()) == list(range(CLASSES * PER_CLASS))
    # A real (one-rank) process group: QUASI_RANDOM would raise here, so RANDOM over the OS cache.
    torch.distributed.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        with pytest.warns(UserWarning, match="os_cache=False is not supported with distributed"):
            loaders += create_ffcv_loaders(_cfg("ffcv", *betons, os_cache=False), distributed=True, device=CPU, seed=0)[
                :2
            ]
        assert isinstance(loaders[-2].traversal_order, Random) and loaders[-2].distributed
        tv_train, _, _ = create_imagefolder_loaders(
            _cfg("imagefolder", jpegs / "train", jpegs / "val"), distributed=True, device=CPU, seed=0
        )
        assert len(tv_train) == CLASSES * PER_CLASS // BATCH
    finally:
        torch.distributed.destroy_process_group()
    loaders.clear()
    _collect_now()


@pytest.mark.timeout(120)
def test_ffcv_val_matches_torchvision_center_crop(ffcv_loaders, tv_loaders):
    _, ffcv_val, _ = ffcv_loaders
    _, tv_val, _ = tv_loaders
    assert len(ffcv_val) == len(tv_val) == CLASSES * VAL_PER_CLASS // BATCH
    for (xf, yf), (xt, yt) in zip(ffcv_val, tv_val):
        _check_batch(xf, yf, BATCH)
        assert yf.tolist() == yt.tolist()
        # Same crop up to JPEG re-encoding and resampling: a few pixel levels on average,
        # far below what a mirrored or shifted crop gives.
        diff = (_unnormalise(xf) - _unnormalise(xt)).abs().mean()
        assert float(diff) < 0.03
        assert float((_unnormalise(xf) - _unnormalise(xt.flip(-1))).abs().mean()) > 3 * float(diff)


@pytest.mark.timeout(180)
def test_device_pipeline_matches_cpu_pipeline(betons, ffcv_loaders):
    """The CUDA order (uint8 ToDevice -> ToTorchImage -> NormalizeOnDevice), run here on the CPU device:
    it builds (no Loader() hang: the op is not jitted) and gives the CPU pipeline's batches."""
    _, cpu_val, _ = ffcv_loaders
    _, dev_val, _ = create_ffcv_loaders(
        _cfg("ffcv", *betons), distributed=False, device=CPU, seed=0, normalize_on_device=True
    )
    for (xc, yc), (xd, yd) in zip(cpu_val, dev_val):
        _check_batch(xd, yd, BATCH)
        assert xd.is_contiguous(memory_format=torch.channels_last)
        assert yd.tolist() == yc.tolist()
        torch.testing.assert_close(xd, xc, atol=1e-5, rtol=1e-5)
    del dev_val
    _collect_now()


@pytest.mark.timeout(120)
def test_imagefolder_train_loader_matches_ffcv_contract(jpegs, tv_loaders):
    train, _, num_classes = tv_loaders
    assert num_classes == CLASSES and len(train) == CLASSES * PER_CLASS // BATCH
    orders = []
    for _ in range(2):
        labels = []
        for x, y in train:
            _check_batch(x, y, BATCH)
            labels += y.tolist()
        orders.append(labels)
    assert train.next_epoch == 2
    assert sorted(orders[0]) == sorted(orders[1]) and orders[0] != orders[1]  # reshuffled per epoch
    resumed, _, _ = create_imagefolder_loaders(
        _cfg("imagefolder", jpegs / "train", jpegs / "val", num_workers=0),
        distributed=False,
        device=CPU,
        seed=0,
        epoch=1,
    )
    assert [label for _, y in resumed for label in y.tolist()] == orders[1]  # resume continues the sequence


# ------------------------------------------------------------------------------------ bad input


def test_missing_beton_is_a_one_line_data_error(betons, tmp_path):
    missing = tmp_path / "nope.beton"
    with pytest.raises(DataError, match=f"no such .beton file: {missing}$"):
        create_ffcv_loaders(_cfg("ffcv", missing, betons[1]), distributed=False, device=CPU, seed=0)


@pytest.mark.parametrize("keep", [0.5, 0.999, 16])
def test_truncated_beton_is_caught_before_loading(betons, tmp_path, keep):
    data = betons[0].read_bytes()
    cut = tmp_path / "cut.beton"
    cut.write_bytes(data[: int(len(data) * keep) if keep < 1 else int(keep)])
    with pytest.raises(DataError, match=f"^{cut} is "):
        create_ffcv_loaders(_cfg("ffcv", cut, betons[1]), distributed=False, device=CPU, seed=0)


def test_garbage_file_is_not_a_beton(betons, tmp_path):
    junk = tmp_path / "junk.beton"
    junk.write_bytes(np.random.default_rng(0).integers(0, 256, 10_000, dtype=np.uint8).tobytes())
    with pytest.raises(DataError, match=str(junk)):
        create_ffcv_loaders(_cfg("ffcv", betons[0], junk), distributed=False, device=CPU, seed=0)


def test_empty_imagefolder_raises_and_writes_nothing(tmp_path):
    (tmp_path / "src" / "cat").mkdir(parents=True)
    (tmp_path / "src" / "cat" / "notes.txt").write_text("not an image")
    out = tmp_path / "out" / "train.beton"
    with pytest.raises(DataError, match="has no images"):
        write_beton(tmp_path / "src", out, progress=False)
    assert not out.parent.exists() or not any(out.parent.iterdir())
    with pytest.raises(DataError, match="has no images"):
        create_imagefolder_loaders(
            _cfg("imagefolder", tmp_path / "src", tmp_path / "src"), distributed=False, device=CPU, seed=0
        )


def test_missing_split_fails_before_train_is_written(jpegs, tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "train").symlink_to(jpegs / "train")
    with pytest.raises(DataError, match=f"no such ImageFolder directory: {src / 'val'}"):
        write_imagenet(src, tmp_path / "out", progress=False)
    # A val split missing a class would shift ImageFolder's label numbering.
    (src / "val").mkdir()
    for cls in sorted(p.name for p in (jpegs / "val").iterdir())[1:]:
        (src / "val" / cls).symlink_to(jpegs / "val" / cls)
    with pytest.raises(DataError, match="train/ and val/ class folders differ"):
        write_imagenet(src, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def test_unreadable_jpeg_is_named_and_leaves_no_file(tmp_path):
    src = make_jpeg_imagefolder(tmp_path / "src", classes=2, per_class=2, size=(40, 30)) / "train"
    bad = src / "c001" / "broken.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0 this is not really a jpeg")
    out = tmp_path / "out" / "train.beton"
    with pytest.raises(DataError, match=f"unreadable image {bad}"):
        write_beton(src, out, num_workers=2, progress=False)
    assert list(out.parent.iterdir()) == []


def test_config_mistakes_are_named(betons, jpegs):
    with pytest.raises(DataError, match="data.img_size"):
        create_ffcv_loaders(_cfg("ffcv", *betons, img_size=300), distributed=False, device=CPU, seed=0)
    with pytest.raises(DataError, match="data.batch_size=1000"):
        create_ffcv_loaders(_cfg("ffcv", *betons, batch_size=1000), distributed=False, device=CPU, seed=0)
    with pytest.raises(DataError, match="data.batch_size=1000"):
        create_imagefolder_loaders(
            _cfg("imagefolder", jpegs / "train", jpegs / "val", batch_size=1000), distributed=False, device=CPU, seed=0
        )


def test_data_modules_import_without_loading_ffcv():
    code = (
        "import sys, gdnsq.data.ffcv_io, gdnsq.data.imagefolder, gdnsq.data.synthetic; "
        "assert 'ffcv' not in sys.modules, 'ffcv imported at module import'"
    )
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    subprocess.run([sys.executable, "-c", code], check=True, env=env)
