"""The steady-state training step is GPU-shaped: it reads nothing back from the device, and it launches at most
twice the ops of the FP distillation step (timm ResNet-18, every conv but the stem quantized).

Counted on the CPU through the ops CUDA would run. A host read is any op that hands a tensor's value to Python
(``_local_scalar_dense``: item / bool / float / int; data-dependent shapes: nonzero and kin) or ``tolist`` /
``numpy``. The optimizer's step counters are left out: torch keeps them on the host even on CUDA (``capturable``
off), so reading them is no device sync. Ops: those a TorchDispatchMode sees below autograd, views excluded (no
kernel), the optimizer's host-side step arithmetic excluded likewise; the optimizer runs ``foreach``, its default
on CUDA (on the CPU torch defaults to one op per parameter)."""

import timm
import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

from gdnsq.config import load_config
from gdnsq.training.engine import Engine
from gdnsq.training.runtime import Precision
from gdnsq.training.surgery import calibrate_model, quantize_model

HOST_READS = {"_local_scalar_dense", "nonzero", "masked_select", "unique", "_unique2", "unique_consecutive"}
CHECK_EVERY = 2


class Counter(TorchDispatchMode):
    """Host reads and kernel-launching ops, leaving out the optimizer's host-resident step counters."""

    def __init__(self, host: set[int]):
        super().__init__()
        self.host, self.reads, self.ops = host, 0, 0

    def _on_host(self, args) -> bool:
        first = args[0] if args else None
        first = first[0] if isinstance(first, (list, tuple)) and first else first
        return isinstance(first, torch.Tensor) and first.data_ptr() in self.host

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not self._on_host(args):
            self.reads += func.overloadpacket.__name__ in HOST_READS
            self.ops += not func.is_view
        return func(*args, **(kwargs or {}))


class ListReads(TorchFunctionMode):
    """tolist / numpy: host reads that do not pass the dispatcher."""

    def __init__(self):
        super().__init__()
        self.reads = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        self.reads += func in (torch.Tensor.tolist, torch.Tensor.numpy)
        return func(*args, **(kwargs or {}))


def _engine(quantized: bool) -> Engine:
    overrides = {"schedule.check_every": CHECK_EVERY, "schedule.warmup": 0.0, "ray.enabled": False}
    cfg = load_config(None, {**overrides, "tracking.enabled": False, "train.epochs": 1})
    torch.manual_seed(0)
    student, teacher = timm.create_model("resnet18", num_classes=10), timm.create_model("resnet18", num_classes=10)
    if quantized:
        quantize_model(student, cfg.quant)
        calibrate_model(student, [torch.randn(2, 3, 16, 16)], init_bits=cfg.quant.init_bits)
    engine = Engine(cfg, student, teacher, torch.device("cpu"), Precision.create(cfg.train, torch.device("cpu")))
    for group in engine.optimizer.param_groups:
        group["foreach"] = True  # CUDA's default
    return engine


def _batches(n: int) -> list:
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(2, 3, 16, 16, generator=g), torch.randint(0, 10, (2,), generator=g)) for _ in range(n)]


def _count_steps(engine: Engine, steps: int) -> tuple[list[tuple[int, int]], int, int]:
    """([(global step, host reads during it)], reads of the epoch's end, ops per step) over one epoch."""
    host = {s["step"].data_ptr() for s in engine.optimizer.state.values() if "step" in s}
    per_step, last = [], [0]
    with Counter(host) as counted, ListReads() as listed:

        def on_step(step, parts):
            reads = counted.reads + listed.reads
            per_step.append((step, reads - last[0]))
            last[0] = reads

        engine.train_epoch(_batches(steps), on_step=on_step)
    return per_step, counted.reads + listed.reads - last[0], counted.ops // steps


def test_steady_state_step_reads_nothing_back_and_launches_at_most_twice_the_fp_ops():
    ops = {}
    for quantized in (False, True):
        engine = _engine(quantized)
        engine.train_epoch(_batches(1))  # the first step: the plan, the optimizer's state, the targets' set-up
        per_step, at_end, ops[quantized] = _count_steps(engine, 2 * CHECK_EVERY)
        cadence = [reads for step, reads in per_step if step % CHECK_EVERY == 0]
        steady = [reads for step, reads in per_step if step % CHECK_EVERY != 0]
        assert len(steady) == 2 and steady == [0, 0], per_step
        # the cadence: the finite check (one read) and, past the warm-up, the true-bit convergence check
        assert len(cadence) == 2 and all(reads >= 1 for reads in cadence), per_step
        assert at_end == 1  # the epoch's sums, finite flag and temperature in one batched tolist
    assert ops[True] <= 2 * ops[False], ops
