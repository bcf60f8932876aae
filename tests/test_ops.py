"""The three fused ops alone against float64 references: channel gate, final gate, BN-apply + ReLU.

Checks that the Triton path really runs where it should (a launch counter), mixed dtypes (autocast:
fp32 activations with half weights), random shapes through hypothesis, and that outputs are poisoned
before the kernels write them (so an unwritten element would fail the comparison).
"""
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gam_cases import TOL, assert_close
from gam_triton.ops import _runtime
from gam_triton.ops import channel_gate as cg_mod
from gam_triton.ops import elementwise as ew_mod
from gam_triton.ops._runtime import INTERPRET, new_output, use_triton
from gam_triton.ops.channel_gate import channel_gate, reference_grads
from gam_triton.ops.elementwise import bn_relu, final_gate
from gam_triton.reference import channel_shuffle, shuffle, unshuffle

KERNELS_RUN = INTERPRET or torch.cuda.is_available()


def _weights(c, cr, dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    w1 = (torch.randn(cr, c, generator=g) / c ** 0.5).to(device, dtype)
    b1 = (torch.randn(cr, generator=g) * 0.3).to(device, dtype)
    w2 = (torch.randn(c, cr, generator=g) / cr ** 0.5).to(device, dtype)
    b2 = (torch.randn(c, generator=g) * 0.3).to(device, dtype)
    return w1, b1, w2, b2


def _x(b, c, h, w, dtype, device, cl, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, c, h, w, generator=g).to(device, dtype)
    return x.contiguous(memory_format=torch.channels_last) if cl else x


def channel_gate_f64(x, w1, b1, w2, b2, sigmoid):
    """Straight from GAM_NOTES: per pixel, a = W2 relu(W1 x + b1) + b2; x1 = x * g(a)."""
    xp = x.double().permute(0, 2, 3, 1)
    a = torch.relu(xp @ w1.double().t() + b1.double()) @ w2.double().t() + b2.double()
    a = a.permute(0, 3, 1, 2)
    return x.double() * (torch.sigmoid(a) if sigmoid else a)


def final_gate_f64(x1, y2, scale, shift, groups):
    c = x1.shape[1]
    s = torch.sigmoid(y2.double() * scale.double().view(1, c, 1, 1) + shift.double().view(1, c, 1, 1))
    if groups:
        s = channel_shuffle(s, groups)
    return x1.double() * s


@pytest.fixture
def launches(monkeypatch):
    """Count kernel launches of the three ops (wrapping the one launch seam, ``_runtime.launch``)."""
    counts = {"channel_gate": 0, "final_gate": 0, "bn_relu": 0}
    if not KERNELS_RUN:
        return counts
    from gam_triton.kernels.channel_gate import channel_gate_fwd_kernel
    from gam_triton.kernels.elementwise import bn_relu_kernel, final_gate_kernel

    names = {id(channel_gate_fwd_kernel): "channel_gate", id(final_gate_kernel): "final_gate",
             id(bn_relu_kernel): "bn_relu"}
    real = _runtime.launch

    def counted(kernel, *a, **k):
        counts[names[id(kernel)]] += 1
        return real(kernel, *a, **k)

    monkeypatch.setattr(_runtime, "launch", counted)
    return counts


def test_outputs_are_poisoned_before_kernels_write():
    out = new_output((1, 3, 2, 2), torch.empty(0), torch.float32, False)
    assert torch.isnan(out).all()


@pytest.mark.parametrize("c,rate", [(20, 4), (24, 4), (48, 4), (192, 4), (576, 4), (20, 3), (5, 4)])
@pytest.mark.parametrize("sigmoid", [True, False])
@pytest.mark.parametrize("cl", [False, True], ids=["nchw", "nhwc"])
def test_channel_gate_fp32(c, rate, sigmoid, cl, device, launches):
    cr = c // rate
    w = _weights(c, cr, torch.float32, device)
    x = _x(2, c, 3, 5, torch.float32, device, cl)
    got = channel_gate(x, *w, sigmoid)
    assert launches["channel_gate"] == (1 if KERNELS_RUN else 0)
    assert got.is_contiguous(memory_format=torch.channels_last if cl else torch.contiguous_format)
    assert_close(got, channel_gate_f64(x.cpu(), *(t.cpu() for t in w), sigmoid), torch.float32)


@pytest.mark.gpu_check
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("out_cl", [False, True])
def test_channel_gate_half_and_layout_change(dtype, out_cl, device):
    w = _weights(48, 12, dtype, device)
    x = _x(2, 48, 4, 3, dtype, device, False)
    got = channel_gate(x, *w, True, out_channels_last=out_cl)
    assert got.dtype == dtype
    assert got.is_contiguous(memory_format=torch.channels_last if out_cl else torch.contiguous_format)
    assert_close(got, channel_gate_f64(x.cpu(), *(t.cpu() for t in w), True), dtype)


def test_channel_gate_mixed_dtype_as_under_autocast(device):
    """fp32 activations with fp16 weights: dots in fp16 (as nn.Linear under autocast), output fp32."""
    w = _weights(24, 6, torch.float16, device)
    x = _x(2, 24, 3, 3, torch.float32, device, True)
    got = channel_gate(x, *w, False)
    assert got.dtype == torch.float32
    assert_close(got, channel_gate_f64(x.cpu(), *(t.cpu() for t in w), False), torch.float16)


@pytest.mark.gpu_check
@pytest.mark.parametrize("sigmoid", [True, False])
def test_channel_gate_gradients(sigmoid, device):
    w = [t.requires_grad_() for t in _weights(20, 5, torch.float32, device)]
    x = _x(2, 20, 3, 4, torch.float32, device, False).requires_grad_()
    gout = _x(2, 20, 3, 4, torch.float32, device, False, seed=5)
    channel_gate(x, *w, sigmoid).backward(gout)
    xd = x.detach().cpu().double().requires_grad_()
    wd = [t.detach().cpu().double().requires_grad_() for t in w]
    channel_gate_f64(xd, *wd, sigmoid).backward(gout.cpu().double())
    for got, want in zip([x.grad] + [t.grad for t in w], [xd.grad] + [t.grad for t in wd]):
        n = max(want.abs().max().item(), 1.0)
        assert_close(got / n, want / n, torch.float32, 5)
    # The explicit formulas agree with autograd of the float64 reference too.
    formula = reference_grads(xd.detach(), *(t.detach() for t in wd), sigmoid, gout.cpu().double())
    for got, want in zip(formula, [xd.grad] + [t.grad for t in wd]):
        torch.testing.assert_close(got, want)


@pytest.mark.gpu_check
@pytest.mark.parametrize("groups", [0, 4, 2])
@pytest.mark.parametrize("layouts", [(False, False), (True, True), (False, True), (True, False)])
def test_final_gate(groups, layouts, device, launches):
    x1 = _x(2, 24, 3, 5, torch.float32, device, layouts[0])
    y2 = _x(2, 24, 3, 5, torch.float32, device, layouts[1], seed=2)
    g = torch.Generator().manual_seed(3)
    scale, shift = torch.randn(24, generator=g).to(device), torch.randn(24, generator=g).to(device)
    got = final_gate(x1, y2, scale, shift, groups)
    assert launches["final_gate"] == (1 if KERNELS_RUN else 0)
    assert_close(got, final_gate_f64(x1.cpu(), y2.cpu(), scale.cpu(), shift.cpu(), groups), torch.float32)


def test_final_gate_mixed_dtype_promotes(device):
    x1 = _x(1, 16, 2, 3, torch.float32, device, False)
    y2 = _x(1, 16, 2, 3, torch.float16, device, False, seed=2)
    scale, shift = torch.ones(16, device=device), torch.zeros(16, device=device)
    got = final_gate(x1, y2, scale, shift, 4)
    assert got.dtype == torch.float32
    assert_close(got, final_gate_f64(x1.cpu(), y2.cpu(), scale.cpu(), shift.cpu(), 4), torch.float16)


@pytest.mark.gpu_check
def test_final_gate_gradients(device):
    x1 = _x(2, 16, 3, 2, torch.float32, device, False).requires_grad_()
    y2 = _x(2, 16, 3, 2, torch.float32, device, True, seed=2).requires_grad_()
    g = torch.Generator().manual_seed(3)
    scale = torch.randn(16, generator=g).to(device).requires_grad_()
    shift = torch.randn(16, generator=g).to(device).requires_grad_()
    gout = _x(2, 16, 3, 2, torch.float32, device, False, seed=9)
    final_gate(x1, y2, scale, shift, 4).backward(gout)
    leaves = [t.detach().cpu().double().requires_grad_() for t in (x1, y2, scale, shift)]
    final_gate_f64(*leaves, 4).backward(gout.cpu().double())
    for got, want in zip((x1, y2, scale, shift), leaves):
        assert_close(got.grad, want.grad, torch.float32, 5)


@pytest.mark.gpu_check
@pytest.mark.parametrize("cl", [False, True])
def test_bn_relu_values_and_grads(cl, device, launches):
    y = _x(2, 12, 3, 3, torch.float32, device, cl).requires_grad_()
    g = torch.Generator().manual_seed(4)
    scale = torch.randn(12, generator=g).to(device).requires_grad_()
    shift = torch.randn(12, generator=g).to(device).requires_grad_()
    z = bn_relu(y, scale, shift)
    assert launches["bn_relu"] == (1 if KERNELS_RUN else 0)
    assert z.is_contiguous(memory_format=torch.channels_last if cl else torch.contiguous_format)
    gout = _x(2, 12, 3, 3, torch.float32, device, cl, seed=6)
    z.backward(gout)
    leaves = [t.detach().cpu().double().requires_grad_() for t in (y, scale, shift)]
    want = torch.relu(leaves[0] * leaves[1].view(1, -1, 1, 1) + leaves[2].view(1, -1, 1, 1))
    want.backward(gout.cpu().double())
    assert_close(z, want, torch.float32)
    for got, ref in zip((y, scale, shift), leaves):
        assert_close(got.grad, ref.grad, torch.float32, 5)


def test_shuffle_helpers_invert_and_match_reference():
    t = torch.arange(2 * 8 * 2 * 1, dtype=torch.float32).view(2, 8, 2, 1)
    assert torch.equal(shuffle(t, 4), channel_shuffle(t, 4))
    assert torch.equal(unshuffle(shuffle(t, 4), 4), t)


def test_dispatch_rule():
    x = torch.randn(1, 4, 2, 2)
    assert use_triton(x) == INTERPRET
    assert not use_triton(x.double()), "float64 always takes the PyTorch path"


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(c=st.integers(1, 70), rate=st.integers(1, 8), b=st.integers(0, 3), h=st.integers(1, 9),
       w=st.integers(1, 9), cl=st.booleans(), sigmoid=st.booleans(), groups=st.sampled_from([0, 2, 4]),
       dtype=st.sampled_from([torch.float32, torch.float16]))
def test_random_shapes_property(c, rate, b, h, w, cl, sigmoid, groups, dtype, device):
    """Any C, C/r >= 1, any map size, any batch: both fused ops equal their float64 definitions."""
    cr = c // rate
    if cr == 0 or (groups and c % groups):
        return
    wts = _weights(c, cr, dtype, device)
    x = _x(b, c, h, w, dtype, device, cl)
    x1 = channel_gate(x, *wts, sigmoid)
    assert x1.shape == x.shape and not (b and torch.isnan(x1).any())
    assert_close(x1, channel_gate_f64(x.cpu(), *(t.cpu() for t in wts), sigmoid), dtype, 2.0)
    y2 = _x(b, c, h, w, dtype, device, not cl, seed=3)
    scale = torch.linspace(-1, 1, c, device=device)
    shift = torch.linspace(0.5, -0.5, c, device=device)
    out = final_gate(x1, y2, scale, shift, groups)
    want = final_gate_f64(x1.cpu(), y2.cpu(), scale.cpu(), shift.cpu(), groups)
    rtol, atol = TOL[dtype]
    torch.testing.assert_close(out.cpu().double(), want, rtol=2 * rtol, atol=2 * atol)


@pytest.mark.skipif(not KERNELS_RUN, reason="launches the Triton kernel directly: needs the interpreter or a GPU")
@pytest.mark.parametrize("c,cr,block_c,block_p", [(20, 5, 16, 16), (48, 12, 16, 32), (576, 144, 128, 16),
                                                  (48, 12, 64, 16)])
@pytest.mark.parametrize("cl", [False, True], ids=["nchw", "nhwc"])
def test_channel_gate_every_tiling(c, cr, block_c, block_p, cl, device):
    """The chunked two-pass path (C > BLOCK_C) and the one-tile path give the same, right answer."""
    import triton

    w = _weights(c, cr, torch.float32, device)
    x = _x(2, c, 3, 7, torch.float32, device, cl)
    out = new_output(x.shape, x, x.dtype, cl)
    cfg = triton.Config(dict(BLOCK_P=block_p, BLOCK_C=block_c, BLOCK_R=max(16, _runtime.next_pow2(cr))),
                        num_warps=4, num_stages=1)
    _runtime.launch(*cg_mod.launch_args(x, *w, True, out, cfg, "ieee"))
    assert_close(out, channel_gate_f64(x.cpu(), *(t.cpu() for t in w), True), torch.float32)


@pytest.mark.skipif(not KERNELS_RUN, reason="launches the Triton kernel directly: needs the interpreter or a GPU")
@pytest.mark.parametrize("c,cr,block_c,block_p,dtype,xdt", [
    (20, 5, 16, 16, torch.float32, torch.float32), (48, 12, 16, 32, torch.bfloat16, torch.bfloat16),
    (48, 12, 32, 16, torch.float16, torch.float32), (192, 48, 64, 64, torch.bfloat16, torch.bfloat16),
    (576, 144, 128, 16, torch.float32, torch.float32)])  # BLOCK_R 256: fp32 fuses there in TF32 (channel_gate.fused)
@pytest.mark.parametrize("cl", [False, True], ids=["nchw", "nhwc"])
def test_channel_gate_backward_every_tiling(c, cr, block_c, block_p, dtype, xdt, cl, device, monkeypatch):
    """The fused backward (chunked passes, many pixel tiles, the bias sums' second launch) at forced tiles against
    float64 gradients, half-precision and autocast-style dtypes, H != W, outputs poisoned; bitwise repeatable."""
    import triton

    cfg = triton.Config(dict(BLOCK_P=block_p, BLOCK_C=block_c, BLOCK_R=max(16, _runtime.next_pow2(cr))),
                        num_warps=4, num_stages=2)
    monkeypatch.setattr(cg_mod, "bwd_heuristic", lambda *a, **k: cfg)
    monkeypatch.setenv("GAM_TRITON_AUTOTUNE", "0")
    monkeypatch.setattr(_runtime, "POISON", True)
    w = _weights(c, cr, dtype, device)
    x = _x(3, c, 5, 7, xdt, device, cl)
    ga, gb = _x(3, c, 5, 7, xdt, device, cl, seed=2), _x(3, c, 5, 7, dtype, device, cl, seed=3)
    counts = torch.zeros(cg_mod.COUNTER_SLOTS, dtype=torch.int32, device=device)
    got = [cg_mod.backward(x, ga, gb, *w, True, counts) for _ in range(2)]
    assert not counts.any(), "the counters are left zeroed"
    for a, b in zip(*got):
        assert torch.equal(a, b)
    want = reference_grads(x.cpu().double(), *(t.cpu().double() for t in w), True,
                           ga.cpu().double() + gb.cpu().double())
    for name, g, r in zip(("dx", "dw1", "db1", "dw2", "db2"), got[0], want):
        n = max(r.abs().max().item(), 1.0)
        assert_close(g.cpu() / n, r / n, dtype, 4.0, name)
    assert got[0][0].dtype == xdt and got[0][2].dtype == dtype


@pytest.mark.skipif(not KERNELS_RUN, reason="launches the Triton kernel directly: needs the interpreter or a GPU")
@pytest.mark.parametrize("block_p,block_c", [(16, 16), (64, 32)])
def test_final_gate_every_tiling(block_p, block_c, device):
    import triton

    x1 = _x(2, 40, 5, 7, torch.float32, device, True)
    y2 = _x(2, 40, 5, 7, torch.float32, device, False, seed=2)
    scale, shift = torch.linspace(-1, 1, 40, device=device), torch.linspace(1, -1, 40, device=device)
    out = new_output(x1.shape, x1, torch.float32, False)
    cfg = triton.Config(dict(BLOCK_P=block_p, BLOCK_C=block_c), num_warps=4, num_stages=1)
    _runtime.launch(*ew_mod.final_gate_launch_args(x1, y2, scale, shift, 4, out, cfg))
    assert_close(out, final_gate_f64(x1.cpu(), y2.cpu(), scale.cpu(), shift.cpu(), 4), torch.float32)


@pytest.mark.skipif(not KERNELS_RUN, reason="launches the Triton kernels directly: needs the interpreter or a GPU")
@pytest.mark.parametrize("programs", [1, 3, 5])
def test_elementwise_persistent_grids_cover_every_tile(programs, device, monkeypatch):
    """The persistent grid: P programs (fewer than the 2 x 3 x 2 (image, pixel block) tiles of a 2 x 40 x 5 x 7
    map in 16 x 16 tiles, over 3 channel blocks) each loop over tiles p, p + P, ...: every element written
    (outputs start as NaN under GAM_TRITON_POISON), final gate (shuffled, mixed layouts) and BN + ReLU."""
    import triton

    real = ew_mod.programs
    monkeypatch.setattr(ew_mod, "programs", lambda *a: (programs, real(*a)[1]))
    cfg = triton.Config(dict(BLOCK_P=16, BLOCK_C=16), num_warps=4, num_stages=1)
    x1 = _x(2, 40, 5, 7, torch.float32, device, True)
    y2 = _x(2, 40, 5, 7, torch.float32, device, False, seed=2)
    scale, shift = torch.linspace(-1, 1, 40, device=device), torch.linspace(1, -1, 40, device=device)
    out = new_output(x1.shape, x1, torch.float32, False)
    kernel, grid, args, kwargs = ew_mod.final_gate_launch_args(x1, y2, scale, shift, 4, out, cfg)
    assert grid == (programs, 3)
    _runtime.launch(kernel, grid, args, kwargs)
    assert_close(out, final_gate_f64(x1.cpu(), y2.cpu(), scale.cpu(), shift.cpu(), 4), torch.float32)
    z = new_output(y2.shape, y2, torch.float32, False)
    _runtime.launch(*ew_mod.bn_relu_launch_args(y2, scale, shift, z, cfg))
    want = torch.relu(y2.cpu().double() * scale.cpu().double().view(1, -1, 1, 1)
                      + shift.cpu().double().view(1, -1, 1, 1))
    assert_close(z, want, torch.float32)


@pytest.mark.skipif(not KERNELS_RUN, reason="the dispatch choice exists only where the kernels run")
def test_eager_no_grad_calls_skip_the_dispatcher_but_autograd_and_modes_do_not(monkeypatch, device):
    """Plain no-grad calls run the launch function directly (less overhead at batch 1); calls that need
    autograd, or run under a dispatch mode (FakeTensor, FlopCounterMode, ...), go through the custom op."""
    from torch.utils._python_dispatch import TorchDispatchMode

    calls = []
    real_op = cg_mod.run.op
    monkeypatch.setattr(cg_mod.run, "op", lambda *a: calls.append(1) or real_op(*a))
    w = _weights(16, 4, torch.float32, device)
    x = _x(1, 16, 2, 3, torch.float32, device, False)
    with torch.no_grad():
        direct = channel_gate(x, *w, True)
    assert calls == []

    class Seen(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            return func(*args, **(kwargs or {}))

    with torch.no_grad(), Seen():
        via_mode = channel_gate(x, *w, True)
    via_grad = channel_gate(x.clone().requires_grad_(), *w, True)
    assert len(calls) == 2
    torch.testing.assert_close(direct, via_mode)
    torch.testing.assert_close(direct, via_grad.detach())
