"""The CUDA kernels (``triton_kernels.py``) run here through Triton's interpreter, on small CPU tensors, against the
CPU op (itself bit-identical to the reference graph: test_fused_quantizer.py): same x̂, input gradients, ranges,
keys; one launch per op (two for aewgs's activation backward); the key state advanced and the ticket reset.

Parameters are exact powers of two where values are compared bit for bit: the interpreter's exp2 (numpy's) and
torch's CPU exp2 round differently in the last bit for some inputs (on CUDA both are the device's exp2).

Triton decides at import whether its own helpers are interpreted, so these cases run in a child process started
with TRITON_INTERPRET=1 (``test_kernels_under_the_interpreter``) unless this process already has it."""

import os
import re
import subprocess
import sys

import pytest
import torch

from gdnsq.quant import cpu_ops
from gdnsq.quant.dither import next_key_

pytest.importorskip("triton")
ESTIMATORS = ["ste", "lsq", "ewgs", "aewgs"]
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
interpreted = pytest.mark.skipif(not INTERPRETED, reason="run by test_kernels_under_the_interpreter")


@pytest.mark.skipif(INTERPRETED, reason="this is the child")
def test_kernels_under_the_interpreter():
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__]
    run = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-2000:]
    summary = run.stdout.strip().splitlines()[-1]
    # every case ran; skipped: this driver and the 8 CUDA cases (they run in the parent process, on a GPU)
    assert re.search(r"\b32 passed, 9 skipped\b", summary), summary


@pytest.fixture(scope="module")
def tk():
    from gdnsq.quant import triton_ops

    return triton_ops


def _launched(tk, fn, *args):
    before = tk.launches
    out = fn(*args)
    return out, tk.launches - before


@interpreted
@pytest.mark.parametrize("estimator", ESTIMATORS)
@pytest.mark.parametrize("noise_ratio", [0.0, 0.3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_activation_kernels_match_the_cpu_op(tk, estimator, noise_ratio, dtype):
    torch.manual_seed(0)
    x = torch.randn(2, 3, 25, 20).to(dtype)  # 3,000 elements: three programs, partial sums added by the last
    g = torch.randn(2, 3, 25, 20).to(dtype)
    log_s, log_q, lo = torch.tensor(-4.0), torch.tensor(0.0), torch.tensor(-0.75)
    state = torch.tensor(0x1234567)
    (out, key), n_fwd = _launched(tk, tk.act_forward, x, log_s, log_q, lo, state, estimator, noise_ratio, dtype, True)
    expected_state = torch.tensor(0x1234567)
    expected_key = next_key_(expected_state)
    assert n_fwd == 1 and torch.equal(key, expected_key) and torch.equal(state, expected_state)
    assert int(tk._ticket(x.device)) == 0
    ref = cpu_ops.act_forward(x, log_s, log_q, lo, expected_key, estimator, noise_ratio, dtype)
    assert out.dtype == dtype and torch.equal(out, ref)
    replay, _ = tk.act_forward(x, log_s, log_q, lo, key, estimator, noise_ratio, dtype, False)
    assert torch.equal(replay, out) and torch.equal(state, expected_state)  # a replay leaves the state alone

    args = (g, x, log_s, log_q, lo, key, estimator, 1e-2, noise_ratio)
    (gx, grads), n_bwd = _launched(tk, tk.act_backward, *args, True)
    gx_ref, grads_ref = cpu_ops.act_backward(*args, True)
    assert n_bwd == (2 if estimator == "aewgs" else 1) and int(tk._ticket(x.device)) == 0
    if estimator == "aewgs":  # the scale is a ratio of sums: float64 partials here, piece order in C++
        assert torch.allclose(gx.float(), gx_ref.float(), rtol=1e-5, atol=1e-6 * float(g.abs().max()))
    else:
        assert torch.equal(gx, gx_ref)
    assert torch.allclose(grads, grads_ref, rtol=1e-5, atol=1e-5)
    _, grads_only = tk.act_backward(*args, False)  # no input gradient wanted: the parameters' still come
    assert torch.allclose(grads_only, grads_ref, rtol=1e-5, atol=1e-5)


@interpreted
@pytest.mark.parametrize("estimator", ESTIMATORS)
@pytest.mark.parametrize("shape,channels", [((6, 4, 3, 3), 6), ((5, 1500), 5), ((40, 30), 1)])
def test_weight_kernels_match_the_cpu_op(tk, estimator, shape, channels):
    """Per channel, rows longer than a block (1,500 > 1,024: ties across blocks keep the first), and per tensor."""
    torch.manual_seed(1)
    w = torch.randn(shape)
    flat = w.view(channels, -1)
    flat[0, [flat.shape[1] // 15, flat.shape[1] - 2]] = flat.min() - 1  # tied minima, far apart
    flat[-1] = 0.5  # a constant row: min and max at its first element
    g = torch.randn(shape)
    log_s = torch.full((channels,) + (1,) * (len(shape) - 1), -5.0)
    g_lo, g_hi = torch.randn(channels), torch.randn(channels)
    state = torch.tensor(777)
    (out, lo, hi, index, key), n_fwd = _launched(tk, tk.weight_forward, w, log_s, state, estimator, 0.2, w.dtype)
    expected_state = torch.tensor(777)
    expected_key = next_key_(expected_state)
    assert n_fwd == 1 and torch.equal(key, expected_key) and torch.equal(state, expected_state)
    ref = cpu_ops.weight_forward(w, log_s, expected_key, estimator, 0.2, w.dtype)
    for name, a, b in zip(("x̂", "lo", "hi", "index"), (out, lo, hi, index), ref):
        assert torch.equal(a, b), name
    args = (g, g_lo, g_hi, w, log_s, lo, index, key, estimator, 1e-2, 0.2)
    (gw, gs), n_bwd = _launched(tk, tk.weight_backward, *args)
    gw_ref, gs_ref = cpu_ops.weight_backward(*args)
    assert n_bwd == 1
    if estimator == "aewgs":
        assert torch.allclose(gw, gw_ref, rtol=1e-5, atol=1e-6)
    else:
        assert torch.equal(gw, gw_ref)
    assert torch.allclose(gs, gs_ref, rtol=1e-5, atol=1e-6 * float(gs_ref.abs().max()))


@interpreted
def test_weight_state_advances_like_the_reference(tk):
    state = torch.tensor(2**62 - 5)  # next to the top of the key range: the advance wraps mod 2^62
    expected = torch.tensor(2**62 - 5)
    for _ in range(3):
        _, _, _, _, key = tk.weight_forward(
            torch.randn(4, 8), torch.full((4, 1), -4.0), state, "ste", 0.0, torch.float32
        )
        assert torch.equal(key, next_key_(expected)) and torch.equal(state, expected)
    assert int(tk._ticket(state.device)) == 0


@interpreted
def test_bf16_weight_out_from_fp32_master(tk):
    """Autocast's case: float32 master weight in, bfloat16 x̂ out (fp32 maths, rounded once), fp32 gradient."""
    torch.manual_seed(2)
    w, log_s = torch.randn(8, 16, 3, 3), torch.full((8, 1, 1, 1), -6.0)
    out, lo, hi, index, key = tk.weight_forward(w, log_s, torch.tensor(5), "ste", 0.0, torch.bfloat16)
    ref = cpu_ops.weight_forward(w, log_s, key, "ste", 0.0, torch.float32)
    assert out.dtype == torch.bfloat16 and torch.equal(out, ref[0].bfloat16()) and lo.dtype == torch.float32
    g = torch.randn(8, 16, 3, 3).bfloat16()
    gw, _ = tk.weight_backward(g, None, None, w, log_s, lo, index, key, "ste", 1e-2, 0.0)
    assert gw.dtype == torch.float32 and torch.equal(gw, g.float())


@interpreted
@pytest.mark.parametrize("estimator", ["ste", "aewgs"])
def test_activation_kernels_loop_when_programs_are_fewer_than_blocks(tk, estimator, monkeypatch):
    """Large tensors get at most MAX_PROGRAMS programs, each looping over several blocks (here 2 for 4 blocks)."""
    monkeypatch.setattr(tk, "MAX_PROGRAMS", 2)
    torch.manual_seed(4)
    x, g = torch.randn(4000), torch.randn(4000)
    params = (torch.tensor(-3.0), torch.tensor(1.0), torch.tensor(-1.0))
    state = torch.tensor(99)
    out, key = tk.act_forward(x, *params, state, estimator, 0.1, torch.float32, True)
    assert torch.equal(key, torch.tensor(99)) and int(tk._ticket(x.device)) == 0
    assert torch.equal(out, cpu_ops.act_forward(x, *params, key, estimator, 0.1, torch.float32))
    gx, grads = tk.act_backward(g, x, *params, key, estimator, 1e-2, 0.1, True)
    gx_ref, grads_ref = cpu_ops.act_backward(g, x, *params, key, estimator, 1e-2, 0.1, True)
    assert torch.allclose(gx, gx_ref, rtol=1e-5, atol=1e-6) if estimator == "aewgs" else torch.equal(gx, gx_ref)
    assert torch.allclose(grads, grads_ref, rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(INTERPRETED or not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("estimator", ESTIMATORS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_ops_match_the_cpu_op(estimator, dtype):
    """On a GPU: the registered ops (Triton) against the CPU op on the same data. Bit-identical x̂ and input
    gradients need the device's exp2 to round as torch's CUDA exp2 does (both the CUDA maths library's);
    parameters here are exact powers of two, the model-level check is test_fused_model_steps_track_the_torch_path."""
    from gdnsq.quant import ops

    torch.manual_seed(5)
    x, g = torch.randn(8, 16, 30, 30).to(dtype), torch.randn(8, 16, 30, 30).to(dtype)
    params = (torch.tensor(-4.0), torch.tensor(1.0), torch.tensor(-0.5))
    w, gw, log_s = torch.randn(32, 16, 3, 3), torch.randn(32, 16, 3, 3), torch.full((32, 1, 1, 1), -6.0)
    results = []
    for device in ("cpu", "cuda"):
        d = [t.to(device) for t in (x, g, *params, w, gw, log_s)]
        out, key = ops.quantize_act(d[0], *d[2:5], torch.tensor(11, device=device), estimator, 0.1, dtype)
        gx, grads = ops.quantize_act_backward(d[1], d[0], *d[2:5], key, estimator, 1e-2, 0.1, True)
        wq, lo, hi, index, wkey = ops.quantize_weight(d[5], d[7], torch.tensor(12, device=device), estimator, 0.1,
                                                      dtype)  # fmt: skip
        gw_, gs = ops.quantize_weight_backward(d[6], lo, hi, d[5], d[7], lo, index, wkey, estimator, 1e-2, 0.1)
        results.append([t.cpu() for t in (out, key, gx, grads, wq, lo, hi, index, wkey, gw_, gs)])
    cpu, cuda = results
    for i, name in enumerate(("x̂", "key", "grad x", "grads", "ŵ", "lo", "hi", "index", "w key", "grad w", "d log_s")):
        if name in ("grads", "d log_s") or (estimator == "aewgs" and name in ("grad x", "grad w")):
            assert torch.allclose(cpu[i].float(), cuda[i].float(), rtol=1e-4, atol=1e-5), name
        else:
            assert torch.equal(cpu[i], cuda[i]), name
