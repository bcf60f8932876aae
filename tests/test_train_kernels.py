"""The training path's kernels (gam_triton/train_block.py): several steps against float64, determinism, a tiny
model trained for 20 steps, launches and saved bytes, double backward, autocast.

Tiny shapes: under TRITON_INTERPRET=1 every kernel runs in Triton's interpreter. On the plain CPU (no
interpreter) the GAM module takes its PyTorch path and the kernel-specific tests skip.
"""
import copy
import os
import sys

import pytest
import torch
from torch import nn

from gam_cases import TOL, assert_close, f64, make_input, make_ref
from gam_triton import GAM, convert
from gam_triton.ops._runtime import use_triton

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "perf"))

import common  # noqa: E402
import traffic  # noqa: E402


def _kernels_run(device) -> bool:
    return use_triton(torch.empty(1, device=device))


needs_kernels = pytest.mark.skipif(not _kernels_run("cuda" if torch.cuda.is_available() else "cpu"),
                                   reason="the training kernels run on CUDA or under TRITON_INTERPRET=1 only")


def _canonical(name: str) -> str:
    for old, new in (("fc1", "0"), ("fc2", "2"), ("conv1", "0"), ("bn1", "4"), ("bn", "1"), ("conv2", "3")):
        name = name.replace(f".{old}.", f".{new}.")
    return name


def _step(module, x, gout):
    module.zero_grad(set_to_none=True)
    x = x.detach().clone().requires_grad_(True)
    out = module(x)
    out.backward(gout)
    return out, x.grad, {_canonical(n): p.grad for n, p in module.named_parameters()}


def _assert_fp32_step_matches(gam, want_mod, x, gout) -> None:
    """One fp32 train step of ``gam`` against the float64 ``want_mod``: output, input and parameter gradients."""
    got, gx, gp = _step(gam, x, gout)
    want, wx, wp = _step(want_mod, x.cpu().double(), gout.cpu().double())
    assert_close(got, want, torch.float32, 1.0, "output")
    assert_close(gx, wx, torch.float32, 5.0, "grad x")
    for name, g in wp.items():
        n = max(g.abs().max().item(), 1.0)
        assert_close(gp[name] / n, g / n, torch.float32, 5.0, f"grad {name}")


CASES = [  # form, C, layout channels_last, dtype, (B, H, W), BN momentum, steps (C=192 is slow: one)
    ("yolo_grouped", 48, True, torch.float32, (2, 5, 3), 0.1, 3),
    ("paper", 20, False, torch.float16, (1, 4, 6), 0.1, 3),
    ("seed", 20, True, torch.float16, (2, 3, 5), 0.3, 3),
    ("yolo_grouped", 192, False, torch.float32, (1, 3, 2), None, 1),
    ("paper", 24, False, torch.bfloat16, (2, 4, 3), 0.1, 3),
]


@pytest.mark.gpu_check
@pytest.mark.parametrize("form,c,cl,dtype,bhw,momentum,steps", CASES,
                         ids=[f"{f}-C{c}-{'nhwc' if cl else 'nchw'}-{str(d)[6:]}" for f, c, cl, d, *_ in CASES])
def test_steps_against_float64(form, c, cl, dtype, bhw, momentum, steps, device):
    """Output and every gradient at each step, running statistics after the last (momentum None included)."""
    ref = make_ref(form, c).train()
    for m in ref.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.momentum = momentum
    gam = GAM.from_module(ref).to(device=device, dtype=dtype).train()
    want_mod = f64(ref).train()
    b, h, w = bhw
    scale = 1.0 if dtype == torch.float32 else 2.0
    for step in range(steps):
        x = make_input(b, c, h, w, dtype, device, cl, seed=10 + step)
        gout = make_input(b, c, h, w, dtype, device, cl, seed=20 + step)
        got, gx, gp = _step(gam, x, gout)
        want, wx, wp = _step(want_mod, x.cpu().double(), gout.cpu().double())
        assert_close(got, want, dtype, scale, f"step {step} output")
        assert_close(gx, wx, dtype, 5 * scale, f"step {step} grad x")
        assert gx.dtype == dtype
        for name, g in wp.items():
            assert gp[name].dtype == dtype, name
            n = max(g.abs().max().item(), 1.0)
            assert_close(gp[name] / n, g / n, dtype, 5 * scale, f"step {step} grad {name}")
    ours = {_canonical(n): t for n, t in gam.named_buffers()}
    for name, buf in want_mod.named_buffers():
        if name.endswith("num_batches_tracked"):
            assert int(ours[_canonical(name)]) == steps == int(buf)
        else:
            assert_close(ours[_canonical(name)].float(), buf, dtype, scale, f"buffer {name}")


@needs_kernels
@pytest.mark.parametrize("cl", [False, True], ids=["nchw", "nhwc"])
def test_partial_sums_over_many_programs_are_exact(cl, device, monkeypatch):
    """The last program's sums run to the runtime number of partials, 32 rows at a time (the BatchNorm statistics
    and reductions), and so do the channel gate's bias sums (a tree: 7 groups of 8 programs, the last group
    short): 16-pixel tiles on a 2 x 20 x 20 map make 50 partials (the BatchNorms: two chunks, the second part
    masked) where the interpreter's own tiles make one; BN2's backward in the GPU's gathered half tile. One train
    step against float64, running statistics included."""
    import triton

    from gam_triton.ops import _autotune, batchnorm, channel_gate

    monkeypatch.setenv("GAM_TRITON_AUTOTUNE", "0")  # the heuristics below, not a choice remembered earlier
    _autotune.reset()
    tiles = []

    def bn_tile(C, N, channels_last, target=None, gather=False):
        tiles.append(gather)
        return triton.Config(dict(BLOCK_P=8 if gather else 16, BLOCK_C=16), num_warps=4, num_stages=1)

    monkeypatch.setattr(batchnorm, "heuristic", bn_tile)
    monkeypatch.setattr(channel_gate, "bwd_heuristic", lambda C, CR, HW, dtype, **kw:
                        triton.Config(dict(BLOCK_P=16, BLOCK_C=16, BLOCK_R=16), num_warps=4, num_stages=2))
    try:
        ref = make_ref("yolo_grouped", 48).train()
        gam = GAM.from_module(ref).to(device).train()
        want_mod = f64(ref).train()
        x = make_input(2, 48, 20, 20, torch.float32, device, cl, seed=5)
        gout = make_input(2, 48, 20, 20, torch.float32, device, cl, seed=6)
        _assert_fp32_step_matches(gam, want_mod, x, gout)
    finally:
        _autotune.reset()
    assert True in tiles and False in tiles, "BN2's backward asks for the gathered tile, the rest for the plain one"
    ours = {_canonical(n): t for n, t in gam.named_buffers()}
    for name, buf in want_mod.named_buffers():
        if not name.endswith("num_batches_tracked"):
            assert_close(ours[_canonical(name)], buf, torch.float32, 1.0, f"buffer {name}")


def test_channel_gate_bias_sums_have_a_bounded_serial_tail():
    """At every sweep shape (YOLO channels 64-640 at 80, 40, 20, rate 4; and C1024 at 20, the 224-input maps) and
    batch 1-64, for every dtype class, the GPU heuristic's backward sums its bias partials in at most 16 serial
    steps on the longest path (a group's sum, then the groups'), within the counters there are; the programs
    that sum load at most 4x what the median program loads (its tile: x twice, dx1's two parts twice each, the
    weights' chunks five times)."""
    from triton import cdiv

    from gam_triton.ops import _autotune, channel_gate

    shapes = [(c, s) for s, cs in ((80, (64, 128, 192, 256, 320)), (40, (128, 256, 384, 512, 640)),
                                   (20, (256, 512, 576, 640, 1024)), (14, (256, 512)), (7, (512, 1024))) for c in cs]
    worst_steps, worst_ratio = 0, 0.0
    for c, s in shapes:
        cr = c // 4
        for dt, xdt in ((torch.bfloat16, None), (torch.bfloat16, torch.float32), (torch.float32, None)):
            for b in range(1, 65):
                cfg = channel_gate.bwd_heuristic(c, cr, s * s, dt, "gpu", xdt, batch=_autotune.pixels(b, s * s)[1])
                kw = cfg.kwargs
                n_parts = b * cdiv(s * s, kw["BLOCK_P"])
                group, block_q, block_f = channel_gate.bias_tree(n_parts, c + cr, cfg.num_warps)
                assert cdiv(n_parts, group) + 1 <= channel_gate.COUNTER_SLOTS
                assert block_q * block_f <= 2048 * cfg.num_warps
                worst_steps = max(worst_steps, channel_gate.bias_steps(n_parts, c + cr, cfg.num_warps))
                tile = 6 * min(kw["BLOCK_P"], s * s) * c + 5 * cdiv(c, kw["BLOCK_C"]) * kw["BLOCK_C"] * kw["BLOCK_R"]
                busiest = tile + (min(group, n_parts) + cdiv(n_parts, group)) * (c + cr)
                worst_ratio = max(worst_ratio, busiest / tile)
    assert worst_steps <= 16, worst_steps
    assert worst_ratio <= 4, worst_ratio


@needs_kernels
@pytest.mark.parametrize("cl", [False, True], ids=["nchw", "nhwc"])
def test_unfused_fp32_channel_gate_is_exact_too(cl, device, monkeypatch):
    """Where fp32 dots have no spill-free tile (channel_gate.fused: C/r > 128 on a GPU), the channel gate runs as
    PyTorch GEMMs inside the same ops: forced here at a small C, one train step and one eval call against
    float64, no channel-gate kernel launched."""
    from gam_triton.ops import _runtime, channel_gate

    monkeypatch.setattr(channel_gate, "fused", lambda *a, **k: False)
    launched = []
    real = _runtime.launch
    monkeypatch.setattr(_runtime, "launch", lambda k, *a: launched.append(getattr(k, "fn", k).__name__) or real(k, *a))
    ref = make_ref("paper", 20).train()
    gam = GAM.from_module(ref).to(device).train()
    want_mod = f64(ref).train()
    x = make_input(2, 20, 3, 5, torch.float32, device, cl)
    gout = make_input(2, 20, 3, 5, torch.float32, device, cl, seed=3)
    _assert_fp32_step_matches(gam, want_mod, x, gout)
    with torch.no_grad():
        assert_close(gam.eval()(x), want_mod.eval()(x.cpu().double()), torch.float32, 1.0, "eval output")
    assert launched and not {"channel_gate_fwd_kernel", "channel_gate_bwd_kernel"} & set(launched)


@needs_kernels
def test_two_identical_steps_are_bitwise_equal(device):
    ref = make_ref("yolo_grouped", 32).train()
    first = GAM.from_module(ref).to(device).train()
    second = copy.deepcopy(first)
    x = make_input(2, 32, 6, 5, torch.float32, device, False)
    gout = make_input(2, 32, 6, 5, torch.float32, device, False, seed=3)
    o1, gx1, gp1 = _step(first, x, gout)
    o2, gx2, gp2 = _step(second, x, gout)
    assert torch.equal(o1, o2) and torch.equal(gx1, gx2)
    for name in gp1:
        assert torch.equal(gp1[name], gp2[name]), name
    for (name, b1), (_, b2) in zip(first.named_buffers(), second.named_buffers()):
        assert torch.equal(b1, b2), name


class _Tiny(nn.Module):
    def __init__(self, gam: nn.Module) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.gam = gam
        self.head = nn.Conv2d(16, 2, 1)

    def forward(self, x):
        return self.head(torch.relu(self.gam(self.stem(x))))


def test_tiny_model_tracks_the_reference_loss_curve(device):
    torch.manual_seed(0)
    ref = _Tiny(make_ref("yolo_grouped", 16))
    ours = convert(copy.deepcopy(ref)).to(device)
    assert isinstance(ours.gam, GAM)
    ref = ref.double()
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(4, 3, 4, 5, generator=gen)
    target = torch.randn(4, 2, 4, 5, generator=gen)
    curves = []
    for model, dt, dev in ((ref, torch.float64, "cpu"), (ours, torch.float32, device)):
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        losses = []
        for _ in range(20):
            opt.zero_grad()
            loss = nn.functional.mse_loss(model(x.to(dev, dt)), target.to(dev, dt))
            loss.backward()
            opt.step()
            losses.append(loss.item())
        curves.append(losses)
    want, got = curves
    assert got[-1] < 0.85 * got[0]
    torch.testing.assert_close(torch.tensor(got, dtype=torch.float64), torch.tensor(want, dtype=torch.float64),
                               rtol=2e-3, atol=1e-5)


@needs_kernels
def test_backward_launches_triton_kernels(device, monkeypatch):
    from gam_triton.ops import _runtime

    gam = GAM.from_module(make_ref("yolo_grouped", 16)).to(device).train()
    x = make_input(2, 16, 3, 4, torch.float32, device, False).requires_grad_(True)
    out = gam(x)
    launched = []
    real = _runtime.launch
    monkeypatch.setattr(_runtime, "launch", lambda k, *a: launched.append(getattr(k, "fn", k).__name__) or real(k, *a))
    out.sum().backward()
    assert sorted(launched) == sorted(["bn_bwd_reduce_kernel", "bn_bwd_apply_kernel"] * 2 + ["channel_gate_bwd_kernel"])


LAUNCH_SHAPE = common.Shape(2, 32, 8, 8, 4, True)  # the shape: YOLO grouped B2 C32 8x8


@needs_kernels
def test_train_step_launches_at_most_half_of_eager(device):
    eager = traffic.eager_traffic(LAUNCH_SHAPE, torch.float32, "train")
    ours = traffic.gam_triton_traffic(LAUNCH_SHAPE, torch.float32, "train", device=device)
    assert ours.launches <= 0.5 * eager.launches, (ours.launches, eager.launches, ours.by_op())
    ops = ours.by_op()
    for kernel in ("bn_stats", "bn_bwd_reduce", "bn_bwd_apply", "channel_gate_bwd"):
        assert ops[f"gam_triton::{kernel}"][0] >= 1, kernel
    assert "aten::native_batch_norm" not in ops and "aten::var_mean" not in ops


@needs_kernels
def test_train_forward_launches_at_most_eight(device):
    gam = GAM.from_module(make_ref("yolo_grouped", 32)).to(device).train()
    x = make_input(2, 32, 8, 8, torch.float32, device, False).requires_grad_(True)
    gam(x)  # warm-up (autotuner, compilation)
    t = traffic.count(lambda: gam(x))
    assert t.launches <= 8, t.by_op()


def _saved_bytes(module, x, per_save: bool) -> int:
    """Bytes of the activations saved for backward (parameters excluded): distinct storages, or every save."""
    params = {p.untyped_storage().data_ptr() for p in module.parameters()}
    seen, total = set(), 0

    def pack(t):
        nonlocal total
        st = t.untyped_storage()
        if st.data_ptr() not in params and (per_save or st.data_ptr() not in seen):
            seen.add(st.data_ptr())
            total += st.nbytes() if not per_save else t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        module(x)
    return total


@needs_kernels
def test_saved_activation_bytes_against_eager(device):
    ref = make_ref("yolo_grouped", 32).train()
    gam = GAM.from_module(ref).to(device).train()
    x = make_input(2, 32, 8, 8, torch.float32, device, False).requires_grad_(True)
    per_save = _saved_bytes(gam, x, True) / _saved_bytes(ref, x.cpu(), True)
    distinct = _saved_bytes(gam, x, False) / _saved_bytes(ref, x.cpu(), False)
    assert per_save <= 0.4, per_save
    assert distinct <= 0.46, distinct  # x, x1, y2 (C channels), y1, z1 (C/r) and two [4, C] fp32 vectors


@needs_kernels
def test_double_backward_raises_a_clear_error(device):
    gam = GAM.from_module(make_ref("paper", 20)).to(device).train()
    x = make_input(2, 20, 3, 3, torch.float32, device, False).requires_grad_(True)
    with pytest.raises(RuntimeError, match="double backward"):
        torch.autograd.grad(gam(x).sum(), x, create_graph=True)


@pytest.mark.gpu_check
@pytest.mark.parametrize("amp", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_autocast_training_is_as_close_to_float64_as_eager_autocast(amp, device):
    """Ours and eager, both under autocast, against float64: ours may not be much further off than eager."""
    ref = make_ref("yolo_grouped", 32).train().to(device)
    gam = GAM.from_module(ref).to(device).train()
    want_mod = f64(ref).train()
    x = make_input(2, 32, 5, 4, torch.float32, device, True)
    gout = make_input(2, 32, 5, 4, torch.float32, device, True, seed=9)
    with torch.autocast(device, dtype=amp):
        got, gx, gp = _step(gam, x, gout)
        eager, ex, ep = _step(ref, x, gout)
    want, wx, wp = _step(want_mod, x.cpu().double(), gout.cpu().double())
    rtol, atol = TOL[amp]

    def err(a, b):
        return (a.detach().cpu().double() - b).abs().max().item()

    assert got.dtype == eager.dtype and gx.dtype == torch.float32
    assert err(got, want) <= 2 * err(eager, want) + atol
    assert err(gx, wx) <= 2 * err(ex, wx) + atol * wx.abs().max().item()
    for name, g in wp.items():
        assert gp[name].dtype == torch.float32, name
        n = max(g.abs().max().item(), 1.0)
        assert err(gp[name], g) / n <= 2 * err(ep[name], g) / n + atol, name
