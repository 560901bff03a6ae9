"""GPU check (<= 5 minutes on one GPU): is QAT fast where users train?

1. Step time of timm ResNet-18 at 224x224, batch 256, bf16 autocast + channels_last: FP vs GDNSQ W2A2 vs
   torch.ao learnable fake-quant (same layers quantized, as in bench_step_overhead.py), and peak memory.
2. End-to-end images/s through our own code: the FFCV loader (GPU pipeline) on generated JPEGs
   (gdnsq/data/synthetic.py), the GDNSQ ``Engine`` with its FP teacher forward; and plain FP training
   through the same loader and precision (the issue's bar: QAT >= half of FP).
3. One optimizer step of a real job through Ray Train on one GPU (NCCL DDP backend, ``launch.ray_train.fit``).
4. The projected GPU-hours of jobs/imagenet_resnet18_w2a2.yaml on 8 GPUs from the measured images/s.

Without CUDA it says so, skips the GPU figures, and still runs every code path at a tiny size on the CPU
(gloo instead of NCCL), so the script itself stays tested.

    python benchmarks/gpu_check.py [--out out/gpu_check.json] [--steps 10] [--images 2048]
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]  # run from a checkout; bench_step_overhead is a sibling

from bench_step_overhead import AOFakeQuantLayer  # noqa: E402

from gdnsq.config import load_config  # noqa: E402
from gdnsq.training.precision import Precision  # noqa: E402

IMAGENET_TRAIN_IMAGES = 1_281_167
JOB = ROOT / "jobs" / "imagenet_resnet18_w2a2.yaml"


def log(msg: str) -> None:
    print(msg, flush=True)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def peak_gib(device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


def reset_peak(device):
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


class AOFloat32(AOFakeQuantLayer):
    """torch.ao fake-quant under the same rule as ours: quantizers in fp32 outside autocast, the conv inside."""

    def forward(self, x):
        with torch.autocast(x.device.type, enabled=False):
            w, x = self.fq_w(self.layer.weight.float()), self.fq_a(x.float())
        if isinstance(self.layer, torch.nn.Conv2d):
            return self.layer._conv_forward(x, w, self.layer.bias)
        return F.linear(x, w, self.layer.bias)


def step_times(device, prec: Precision, batch: int, size: int, steps: int) -> dict:
    """Median training-step time (ms) and peak memory of FP, GDNSQ and torch.ao, stepped in turn."""
    import timm
    from torch.ao.quantization._learnable_fake_quantize import _LearnableFakeQuantize

    from gdnsq.config import ObjectiveConfig, QuantConfig
    from gdnsq.training.objective import bit_penalties
    from gdnsq.training.surgery import _set_submodule, calibrate_model, plan, quantize_model

    torch.manual_seed(0)
    fp = timm.create_model("resnet18", num_classes=1000).to(device)
    x = torch.randn(batch, 3, size, size, device=device)
    y = torch.randint(0, 1000, (batch,), device=device)
    qcfg = QuantConfig(target_w=2, target_a=2)
    gd = copy.deepcopy(fp)
    quantize_model(gd, qcfg)
    calibrate_model(gd, [x[: max(2, batch // 4)]], init_bits=10)
    ao = copy.deepcopy(fp)
    for d in plan(ao, qcfg):
        if d.quantized:
            _set_submodule(ao, d.name, AOFloat32(ao.get_submodule(d.name)))
    with torch.no_grad():
        ao.train()(x[: max(2, batch // 4)])
    for m in ao.modules():
        if isinstance(m, _LearnableFakeQuantize):
            m.toggle_observer_update(False)
    models = {"fp": fp, "gdnsq": gd, "torch.ao": ao}
    for m in models.values():
        prec.prepare_module(m.train())
    x = prec.prepare_input(x)
    opts = {k: torch.optim.RAdam(m.parameters(), lr=1e-4) for k, m in models.items()}
    obj = ObjectiveConfig()

    def step(name):
        m, opt = models[name], opts[name]
        with prec.autocast():
            logits = m(x)
        loss = F.cross_entropy(logits.float(), y)
        if name == "gdnsq":
            t = bit_penalties(m, obj.eps, obj.p)
            loss = loss + 1e-3 * (t.p_w + t.p_a)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    out = {}
    times = {k: [] for k in models}
    for name in models:  # peak memory of each alone, then timing rounds in turn (load hits all alike)
        reset_peak(device)
        step(name)
        sync(device)
        out[f"peak_gib/{name}"] = peak_gib(device)
    for i in range(steps + 2):
        for name in models:
            sync(device)
            t0 = time.perf_counter()
            step(name)
            sync(device)
            if i >= 2:
                times[name].append(time.perf_counter() - t0)
    for k, v in times.items():
        out[f"step_ms/{k}"] = 1000 * statistics.median(v)
        out[f"images_per_s/{k}"] = batch / statistics.median(v)
    out["ratio/gdnsq_over_fp"] = out["step_ms/gdnsq"] / out["step_ms/fp"]
    out["ratio/torch.ao_over_fp"] = out["step_ms/torch.ao"] / out["step_ms/fp"]
    return out


def end_to_end(device, prec_name: str, batch: int, size: int, images: int, epochs: int, root: Path) -> dict:
    """images/s of QAT (Engine: FFCV batches -> teacher forward -> student step) and of FP training."""
    from gdnsq.data.ffcv_io import write_imagenet
    from gdnsq.data.synthetic import make_jpeg_imagefolder
    from gdnsq.training.engine import Engine
    from gdnsq.training.models import create_model
    from gdnsq.training.surgery import calibrate_model, quantize_model
    from gdnsq.training.teacher import train_fp

    classes = 8
    t = time.perf_counter()
    jpeg_size = (500, 375) if device.type == "cuda" else (80, 60)
    make_jpeg_imagefolder(root / "jpeg", classes=classes, per_class=images // classes, val_per_class=1, size=jpeg_size)
    write_imagenet(root / "jpeg", root / "beton", progress=False)
    log(f"  generated and wrote {images} JPEGs ({jpeg_size[0]}x{jpeg_size[1]}) in {time.perf_counter() - t:.0f} s")
    cfg = load_config(
        JOB,
        {
            "data.train_path": str(root / "beton" / "train.beton"),
            "data.val_path": str(root / "beton" / "val.beton"),
            "data.batch_size": batch,
            "data.img_size": size,
            "data.val_resize": max(size, int(size * 256 / 224)),
            "data.num_workers": None,
            "model.pretrained": False,
            "tracking.enabled": False,
            "ray.enabled": False,
            "train.precision": prec_name,
            "train.channels_last": True,
            "train.device": device.type,
        },
    )
    prec = Precision.create(cfg.train, device)
    from gdnsq.data.loaders import create_loaders

    loaders = create_loaders(cfg, device=device)
    teacher = prec.prepare_module(create_model(cfg.model, num_classes=1000, in_chans=3).to(device))
    out = {"loader_workers": cfg.data.num_workers if cfg.data.num_workers else "cpu share"}

    # FP training through the same loader, precision and memory format (the reference for "half of FP").
    fp = copy.deepcopy(teacher)
    train_fp(fp, loaders.train, 1, lr=1e-3, device=device, log=lambda s: None, precision=prec)  # warm-up
    sync(device)
    t0, n = time.perf_counter(), 0
    train_fp(fp, loaders.train, epochs, lr=1e-3, device=device, log=lambda s: None, precision=prec)
    sync(device)
    n = epochs * len(loaders.train) * batch
    out["images_per_s/fp_train"] = n / (time.perf_counter() - t0)
    del fp

    teacher.eval().requires_grad_(False)
    student = copy.deepcopy(teacher).requires_grad_(True)
    quantize_model(student, cfg.quant)
    calib = [x.clone() for (x, _), _ in zip(loaders.train, range(2))]
    calibrate_model(student, calib, cfg.quant.init_bits)
    prec.prepare_module(student)
    engine = Engine(cfg, student.train(), teacher, device, prec)
    reset_peak(device)
    engine.train_epoch(loaders.train)  # warm-up (FFCV compiles its pipeline, cuDNN picks algorithms)
    sync(device)
    t0 = time.perf_counter()
    for _ in range(epochs):
        engine.train_epoch(loaders.train)
    sync(device)
    out["images_per_s/qat_train"] = epochs * len(loaders.train) * batch / (time.perf_counter() - t0)
    out["peak_gib/qat_train"] = peak_gib(device)
    out["ratio/qat_over_fp_images_per_s"] = out["images_per_s/qat_train"] / out["images_per_s/fp_train"]
    return out


def ray_ddp_step(use_gpu: bool, root: Path) -> dict:
    """A real (tiny) job through launch.ray_train.fit on one worker: NCCL with a GPU, gloo without."""
    import ray

    from gdnsq.launch.ray_train import fit

    cfg = load_config(
        None,
        {
            "name": "gpu-check-ddp",
            "ray.storage_path": str(root / "runs"),
            "ray.use_gpu": use_gpu,
            "ray.num_workers": 1,
            "ray.cpus_per_worker": None,
            "tracking.enabled": False,
            "train.epochs": 1,
            "train.max_steps_per_epoch": 2,
            "train.teacher_epochs": 1,
            "data.batch_size": 256,
            "train.precision": "bf16",
            "train.channels_last": True,
        },
    )
    t0 = time.perf_counter()
    ray.init(address="local", logging_level="ERROR")  # the dashboard serves the state API Train V2 polls
    try:
        summary = fit(cfg)
    finally:
        ray.shutdown()
    return {
        "ray/backend": "nccl" if use_gpu else "gloo",
        "ray/steps": summary["steps"],
        "ray/wall_s": time.perf_counter() - t0,
    }


def projection(images_per_s_per_gpu: float) -> dict:
    """GPU-hours of the ImageNet W2A2 job (its epoch cap, 8 GPUs) at the measured per-GPU rate."""
    cfg = load_config(JOB, {"model.pretrained": False})
    gpus = cfg.ray.num_workers
    wall_h = cfg.train.epochs * IMAGENET_TRAIN_IMAGES / (gpus * images_per_s_per_gpu) / 3600
    return {
        "job": JOB.name,
        "job/epochs_cap": cfg.train.epochs,
        "job/gpus": gpus,
        "projected/wall_h": wall_h,
        "projected/gpu_hours": wall_h * gpus,
    }


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=ROOT / "out" / "gpu_check.json")
    p.add_argument("--steps", type=int, default=10, help="timed steps per variant (part 1)")
    p.add_argument("--images", type=int, default=2048, help="generated JPEGs for part 2")
    p.add_argument("--epochs", type=int, default=2, help="timed passes over them (after a warm-up pass)")
    p.add_argument("--skip-ray", action="store_true")
    args = p.parse_args(argv)

    cuda = torch.cuda.is_available()
    device = torch.device("cuda") if cuda else torch.device("cpu")
    res: dict = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "load_average": os.getloadavg()[0]}
    if cuda:
        torch.backends.cudnn.benchmark = True
        res.update(device=torch.cuda.get_device_name(), batch=256, size=224, precision="bf16")
        batch, size, steps, images, epochs = 256, 224, args.steps, args.images, args.epochs
    else:
        log(
            "gpu_check: CUDA is not available: skipping the GPU figures; running every part at a tiny size "
            "on the CPU (bf16 autocast, gloo) to exercise the code paths"
        )
        res.update(device="cpu (dry run)", batch=8, size=32, precision="bf16")
        batch, size, steps, images, epochs = 8, 32, 2, 32, 1
    prec = Precision.create(load_config(None, {"train.precision": "bf16", "train.channels_last": True}).train, device)

    t = time.perf_counter()
    log(f"1. step time, ResNet-18 {size}x{size}, batch {batch}, bf16 + channels_last")
    res.update(step_times(device, prec, batch, size, steps))
    log(
        f"   FP {res['step_ms/fp']:.1f} ms  GDNSQ {res['step_ms/gdnsq']:.1f} ms ({res['ratio/gdnsq_over_fp']:.2f}x)  "
        f"torch.ao {res['step_ms/torch.ao']:.1f} ms ({res['ratio/torch.ao_over_fp']:.2f}x)  "
        f"[{time.perf_counter() - t:.0f} s]"
    )
    torch.cuda.empty_cache() if cuda else None

    t = time.perf_counter()
    log("2. end to end: FFCV (GPU pipeline) -> teacher + GDNSQ student, and FP training through the same loader")
    with tempfile.TemporaryDirectory() as tmp:
        res.update(end_to_end(device, "bf16", batch, size, images, epochs, Path(tmp)))
    log(
        f"   QAT {res['images_per_s/qat_train']:.0f} images/s, FP {res['images_per_s/fp_train']:.0f} images/s "
        f"({res['ratio/qat_over_fp_images_per_s']:.2f} of FP; goal >= 0.5)  [{time.perf_counter() - t:.0f} s]"
    )

    if not args.skip_ray:
        t = time.perf_counter()
        log("3. one job step through Ray Train on one worker (NCCL on a GPU)")
        with tempfile.TemporaryDirectory() as tmp:
            res.update(ray_ddp_step(cuda, Path(tmp)))
        log(f"   {res['ray/backend']}: {res['ray/steps']} steps, {res['ray/wall_s']:.0f} s including Ray start")

    res.update(projection(res["images_per_s/qat_train"]))
    what = "" if cuda else "  (CPU dry run: not a GPU figure)"
    log(
        f"4. {res['job']} on {res['job/gpus']} GPUs, {res['job/epochs_cap']} epochs (its cap): "
        f"{res['projected/wall_h']:.1f} h wall, {res['projected/gpu_hours']:.0f} GPU-hours{what}"
    )
    for k in ("peak_gib/fp", "peak_gib/gdnsq", "peak_gib/torch.ao", "peak_gib/qat_train"):
        if res.get(k) is not None:
            log(f"   {k}: {res[k]:.1f} GiB")
    res["load_average_end"] = os.getloadavg()[0]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(res, indent=1))
    log(f"wrote {args.out}")
    return res


if __name__ == "__main__":
    main()
