"""CPU: the quantizer ops' C++ kernels against inductor's generated code for the same maths (why ``fused.py`` is C++).

One activation quantizer (signed, per tensor) and one per-channel weight quantizer, forward + backward, fp32:

* ``ops``: the registered ops (``ops.py``), i.e. the C++ kernels on the CPU;
* ``reference``: the reference torch graph (``functional.noisy_quantize``), eager;
* ``inductor``: that reference graph compiled by ``torch.compile`` (inductor's C++/OpenMP code, same draws).

The variants run in turn, round after round; the median time of each is reported.

    python benchmarks/bench_quantizer_kernels.py [--rounds 15] [--act 32,64,56,56] [--weight 256,2304]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from gdnsq.quant import functional as F
from gdnsq.quant.autograd import QuantizeActivation, QuantizeWeight


def _act_ref(x, log_s, log_q, lo, key):
    low, hi, s = F.activation_grid(log_s, log_q, lo)
    return F.noisy_quantize(x, low, hi, low, s, key=key)


def _weight_ref(w, log_s, key):
    lo, hi = F.channel_range(w, log_s.shape[0])
    y = F.noisy_quantize(w, None, None, lo.detach().reshape(log_s.shape), torch.exp2(log_s), key=key)
    return y, lo, hi


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--act", default="32,64,56,56")
    ap.add_argument("--weight", default="256,2304")
    args = ap.parse_args()
    torch.manual_seed(0)
    x = torch.randn(*map(int, args.act.split(","))).requires_grad_(True)
    w = torch.randn(*map(int, args.weight.split(","))).requires_grad_(True)
    gx, gw = torch.randn_like(x), torch.randn_like(w)
    log_s, log_q, lo = (torch.tensor(v, requires_grad=True) for v in (-5.0, 1.0, -2.0))
    w_log_s = torch.full((w.shape[0], 1), -6.0, requires_grad=True)
    key = torch.tensor(12345)
    act_c, w_c = torch.compile(_act_ref), torch.compile(_weight_ref)

    def act(kind):
        if kind == "ops":
            y = QuantizeActivation.apply(x, log_s, log_q, lo, key.clone(), "ste", 1e-2, 0.0, torch.float32)
        else:
            y = (act_c if kind == "inductor" else _act_ref)(x, log_s, log_q, lo, key)
        torch.autograd.grad(y, (x, log_s, log_q, lo), gx)

    def weight(kind):
        if kind == "ops":
            y, lo_, hi_ = QuantizeWeight.apply(w, w_log_s, key.clone(), "ste", 1e-2, 0.0, torch.float32)
        else:
            y, lo_, hi_ = (w_c if kind == "inductor" else _weight_ref)(w, w_log_s, key)
        torch.autograd.grad((y * gw).sum() + lo_.sum() - hi_.sum(), (w, w_log_s))

    kinds = ("ops", "reference", "inductor")
    times = {(f.__name__, k): [] for f in (act, weight) for k in kinds}
    for r in range(args.rounds + 2):
        for f in (act, weight):
            for k in kinds:
                t0 = time.perf_counter()
                f(k)
                if r >= 2:  # the first rounds compile
                    times[(f.__name__, k)].append(time.perf_counter() - t0)
    print(f"threads {torch.get_num_threads()}, activation {tuple(x.shape)}, weight {tuple(w.shape)}, fp32, ste")
    for (name, kind), v in times.items():
        print(f"  {name:<7} {kind:<10} {statistics.median(v) * 1000:8.2f} ms  (forward + backward)")


if __name__ == "__main__":
    main()
