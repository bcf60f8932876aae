"""The channel shuffle read as contiguous runs (``kernels/shuffle.py``): the final gate and BatchNorm2's backward
with RUNS on, against float64 and against the element-by-element gather (RUNS off), at odd channel counts (runs
cut short by the mask), several channel blocks, G = 2, 4, 8, every dtype, outputs poisoned (NaN) before the
kernels write them."""
import pytest
import torch

from gam_cases import assert_close
from gam_triton.ops import _runtime
from gam_triton.ops import batchnorm as bn
from gam_triton.ops import elementwise as ew
from gam_triton.ops._runtime import INTERPRET, new_output
from gam_triton.reference import channel_shuffle

pytestmark = pytest.mark.skipif(not (INTERPRET or torch.cuda.is_available()),
                                reason="launches the Triton kernels directly: needs the interpreter or a GPU")

# (C, G, BLOCK_C): runs of BLOCK_C / G channels; C / G channels per group, not a multiple of the run where odd
CASES = [(20, 4, 16), (48, 4, 16), (24, 8, 32), (32, 2, 16), (12, 4, 32)]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _cfg(block_c: int):
    import triton

    return triton.Config(dict(BLOCK_P=16, BLOCK_C=block_c), num_warps=4, num_stages=1)


def _t(shape, dtype, device, cl, seed):
    g = torch.Generator().manual_seed(seed)
    t = torch.randn(*shape, generator=g).to(device, dtype)
    return t.contiguous(memory_format=torch.channels_last) if cl else t


def _launch(launch_args: tuple, runs: bool) -> None:
    kernel, grid, args, kwargs = launch_args
    _runtime.launch(kernel, grid, args, dict(kwargs, RUNS=runs))


@pytest.mark.parametrize("c,groups,block_c", CASES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_final_gate_runs(c, groups, block_c, dtype, device):
    y2 = _t((2, c, 3, 5), dtype, device, True, 2)
    x1 = _t((2, c, 3, 5), dtype, device, c % 3 == 0, 1)   # x1 and out in either layout
    scale, shift = torch.linspace(-2, 2, c, device=device), torch.linspace(1, -1, c, device=device)
    assert ew.shuffle_runs(groups, block_c, y2) and not ew.shuffle_runs(groups, block_c, y2.contiguous())
    outs = []
    for runs in (True, False):
        out = new_output(x1.shape, x1, dtype, c % 2 == 0)
        _launch(ew.final_gate_launch_args(x1, y2, scale, shift, groups, out, _cfg(block_c)), runs)
        outs.append(out)
    s = torch.sigmoid(y2.cpu().double() * scale.cpu().double().view(1, c, 1, 1)
                      + shift.cpu().double().view(1, c, 1, 1))
    assert_close(outs[0], x1.cpu().double() * channel_shuffle(s, groups), dtype)
    assert torch.equal(outs[0], outs[1]), "runs and gather compute the same elements the same way"


def _bn2_f64(y, x1, g, weight, bias, groups, eps):
    """Gradients of sum(g * x1 * shuffle(sigmoid(BN(y)))) in float64 (batch statistics)."""
    y, x1, weight, bias = (t.cpu().double().requires_grad_() for t in (y, x1, weight, bias))
    t = torch.nn.functional.batch_norm(y, None, None, weight, bias, training=True, eps=eps)
    out = x1 * channel_shuffle(torch.sigmoid(t), groups)
    out.backward(g.cpu().double())
    return y.grad, x1.grad, weight.grad, bias.grad


@pytest.mark.parametrize("c,groups,block_c", CASES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_bn2_backward_runs(c, groups, block_c, dtype, device):
    """Both backward launches (the reduction and the elementwise pass) with RUNS on and off: dy (written as runs),
    dx1, dgamma, dbeta against float64; the two paths agree to rounding."""
    y = _t((2, c, 3, 5), dtype, device, True, 3)
    x1 = _t((2, c, 3, 5), dtype, device, c % 3 == 0, 4)
    g = _t((2, c, 3, 5), dtype, device, c % 2 == 0, 5)
    weight = torch.linspace(0.5, 1.5, c, device=device)
    bias = torch.linspace(-0.3, 0.3, c, device=device)
    counts = torch.zeros(bn.counter_slots(c), dtype=torch.int32, device=device)
    st = bn.stats(y, weight, bias, (None, None, None), 1e-5, 0.1, False, counts)
    got = []
    for runs in (True, False):
        coef = torch.full((2, c), float("nan"), device=device)
        dw, db = torch.full_like(weight, float("nan")), torch.full_like(bias, float("nan"))
        _launch(bn.reduce_launch_args(1, g, x1, y, st, coef, dw, db, groups, counts, _cfg(block_c)), runs)
        assert not counts.any(), "the counters are left zero"
        dy = new_output(y.shape, y, dtype, True)
        dx1 = new_output(x1.shape, x1, dtype, c % 3 == 0)
        _launch(bn.apply_launch_args(1, g, x1, y, st, coef, dy, dx1, groups, _cfg(block_c)), runs)
        got.append((dy, dx1, dw, db))
    want = _bn2_f64(y, x1, g, weight, bias, groups, 1e-5)
    for name, a, b, w in zip(("dy", "dx1", "dgamma", "dbeta"), *got, want):
        n = max(w.abs().max().item(), 1.0)
        assert_close(a.float() / n, w / n, dtype, 5.0, name)
        assert_close(a.float() / n, b.float() / n, dtype, 1.0, name + " runs against gather")
