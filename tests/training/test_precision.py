"""train.precision / train.channels_last: config checks, and a short QAT run in bf16 + channels_last that
trains like the fp32 one (same teacher, same start, same batches; bundled digits, small CNN, CPU)."""

import copy

import pytest
import torch

from gdnsq.config import load_config
from gdnsq.data.loaders import create_loaders
from gdnsq.errors import ConfigError
from gdnsq.training.engine import Engine
from gdnsq.training.evaluation import evaluate
from gdnsq.training.models import create_model
from gdnsq.training.precision import Precision
from gdnsq.training.surgery import calibrate_model, quantize_model
from gdnsq.training.teacher import train_fp

BASE = {
    "ray.enabled": False,
    "tracking.enabled": False,
    "optim.name": "adamw",
    "optim.lr": 0.003,
    "optim.quant_lr": 0.01,
    "schedule.warmup_steps": 10,
    "schedule.scale_t": 10.0,
    "quant.init_bits": 3,
    "quant.target_w": 4,
    "quant.target_a": 4,
    "data.batch_size": 64,
}
CPU = torch.device("cpu")


def test_precision_settings_are_checked():
    with pytest.raises(ConfigError, match="train.precision"):
        load_config(None, {"train.precision": "int8"})
    with pytest.raises(ConfigError, match="train.precision: fp16 needs CUDA"):
        load_config(None, {"train.precision": "fp16", "train.device": "cpu"})
    cfg = load_config(None, {"train.precision": "fp16"})  # device auto: refused once the device is known
    with pytest.raises(ConfigError, match="train.precision: fp16 needs CUDA"):
        Precision.create(cfg.train, CPU)
    p = Precision.create(load_config(None, {"train.precision": "bf16", "train.channels_last": True}).train, CPU)
    assert p.dtype is torch.bfloat16 and p.scaler is None
    assert p.prepare_input(torch.zeros(2, 3, 4, 4)).is_contiguous(memory_format=torch.channels_last)


@pytest.fixture
def one_thread():
    # Under load from other processes, one thread is many times faster than two for this small CNN.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _qat(teacher, loaders, calib, precision: str, channels_last: bool, steps: int):
    cfg = load_config(None, {**BASE, "train.precision": precision, "train.channels_last": channels_last})
    prec = Precision.create(cfg.train, CPU)
    torch.manual_seed(1)
    student = copy.deepcopy(teacher).requires_grad_(True)
    quantize_model(student, cfg.quant)
    calibrate_model(student, calib, cfg.quant.init_bits)
    prec.prepare_module(student)
    t = prec.prepare_module(copy.deepcopy(teacher))
    seen = {}
    conv = t.features[0]
    conv.register_forward_hook(
        lambda m, a, out: seen.update(
            dtype=out.dtype, cl=a[0].is_contiguous(memory_format=torch.channels_last) and not a[0].is_contiguous()
        )
    )
    engine = Engine(cfg, student.train(), t, CPU, prec)
    start = evaluate(engine.model, loaders.val, CPU, prec)
    tasks = []
    engine.train_epoch(loaders.train, max_steps=steps, on_step=lambda step, parts: tasks.append(parts["train/task"]))
    val = evaluate(engine.model, loaders.val, CPU, prec)
    bits = torch.stack([layer.weight_bits().mean() for layer in student.modules() if hasattr(layer, "weight_quant")])
    return tasks, start, val, float(bits.detach().mean()), seen


@pytest.mark.timeout(600)
def test_bf16_channels_last_trains_like_fp32(one_thread):
    cfg = load_config(None, BASE)
    loaders = create_loaders(cfg, device=CPU)
    torch.manual_seed(0)
    teacher = create_model(cfg.model, num_classes=10, in_chans=1)
    train_fp(teacher, loaders.calib, 2, lr=1e-2, device=CPU, log=lambda s: None)
    teacher.eval().requires_grad_(False)
    fp_top1 = evaluate(teacher, loaders.val, CPU)["top1"]
    calib = [x for (x, _), _ in zip(loaders.calib, range(2))]
    t32, s32, v32, b32, seen32 = _qat(teacher, loaders, calib, "fp32", False, steps=40)
    t16, s16, v16, b16, seen16 = _qat(teacher, loaders, calib, "bf16", True, steps=40)
    print(
        f"teacher {fp_top1:.1f}; top1 / mean weight bits: fp32 {v32['top1']:.1f} / {b32:.3f}, "
        f"bf16 {v16['top1']:.1f} / {b16:.3f}"
    )
    # The teacher really ran in bf16 on channels_last inputs, the fp32 one in fp32.
    assert seen16 == {"dtype": torch.bfloat16, "cl": True} and seen32["dtype"] == torch.float32
    # The 3-bit start costs accuracy; both runs win it back, by a similar amount, along similar losses.
    print(f"val top1 at the start: fp32 {s32['top1']:.1f}, bf16 {s16['top1']:.1f}")
    assert v32["top1"] > s32["top1"] + 2 and v16["top1"] > s16["top1"] + 2
    mean32, mean16 = sum(t32) / len(t32), sum(t16) / len(t16)
    assert abs(mean16 - mean32) <= 0.2 * mean32, (mean32, mean16)
    assert abs(v16["top1"] - v32["top1"]) <= 6.0  # one seed, 40 steps: top-1 swings a few points step to step
    assert abs(b16 - b32) <= 0.05  # the bit-width descent (fp32 quantizer maths) follows the same path
