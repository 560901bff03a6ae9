"""Two DDP ranks (gloo, torch.multiprocessing, no Ray) through ``runtime.wrap_ddp`` (gradient_as_bucket_view,
static_graph) and the Engine: every quantizer's state (steps, clamps, bit targets, dither keys) is identical on
both ranks after training on different data, and again after both resume from their checkpoints and train on.
A rank whose quantizers drift apart trains a different model from the one rank 0 saves (llm-compressor #3119)."""

import os

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from gdnsq.config import load_config
from gdnsq.training.engine import Engine
from gdnsq.training.models import SmallCNN
from gdnsq.training.runtime import Precision, wrap_ddp
from gdnsq.training.surgery import calibrate_model, quantize_model

STEPS = 3


def _quantizer_state(engine: Engine) -> dict:
    state = engine.core.state_dict()
    return {k: v.clone() for k, v in state.items() if "_quant." in k or ".target_" in k}


def _engine(cfg) -> Engine:
    torch.manual_seed(0)  # the same initial model on every rank
    student, teacher = SmallCNN(), SmallCNN()
    quantize_model(student, cfg.quant)
    calibrate_model(student, [torch.randn(8, 1, 28, 28)], init_bits=cfg.quant.init_bits)
    cpu = torch.device("cpu")
    return Engine(cfg, wrap_ddp(student, cpu), teacher, cpu, Precision.create(cfg.train, cpu))


def _rank(rank: int, world: int, folder: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{folder}/group", rank=rank, world_size=world)
    torch.set_num_threads(1)
    cfg = load_config(None, {"ray.enabled": False, "tracking.enabled": False, "schedule.check_every": 2})
    g = torch.Generator().manual_seed(100 + rank)  # each rank its own data
    batches = [(torch.randn(8, 1, 28, 28, generator=g), torch.randint(0, 10, (8,), generator=g)) for _ in range(4)]
    engine = _engine(cfg)
    engine.train_epoch(batches, max_steps=STEPS)
    checkpoint = engine.state_dict()
    first = _quantizer_state(engine)
    resumed = _engine(cfg)
    resumed.load_state_dict(checkpoint)
    resumed.train_epoch(batches[::-1], max_steps=STEPS)
    torch.save({"trained": first, "resumed": _quantizer_state(resumed)}, os.path.join(folder, f"rank{rank}.pt"))
    dist.destroy_process_group()


def test_quantizer_state_is_identical_on_every_rank_after_training_and_after_a_resume(tmp_path):
    mp.spawn(_rank, args=(2, str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    for phase in ("trained", "resumed"):
        assert r0[phase].keys() == r1[phase].keys() and any(k.endswith("log_s") for k in r0[phase])
        for k in r0[phase]:
            assert torch.equal(r0[phase][k], r1[phase][k]), (phase, k)
    # the resumed run trained on: its state moved from the checkpoint's
    assert any(not torch.equal(r0["trained"][k], r0["resumed"][k]) for k in r0["trained"] if k.endswith("log_s"))
