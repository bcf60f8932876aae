"""The training path's kernels (gam_triton/train_block.py): several steps against float64, determinism, a tiny
model trained for 20 steps, launches and saved bytes, double backward, autocast.

Tiny shapes: under TRITON_INTERPRET=1 every kernel runs in Triton's interpreter. On the plain CPU (no
interpreter) the GAM module takes its PyTorch path and the kernel-specific tests skip.
"""
import copy
import os
import sys

from typing import Optional

import pytest
import torch
from torch import nn

from gam_cases import TOL, assert_close, f64, make_input, make_ref
from gam_triton import GAM, convert
from gam_triton.ops._runtime import use_triton

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "perf"))

import bench  # noqa: E402
import traffic  # noqa: E402


def _runtime_has_triton() -> bool:
    from gam_triton.ops._runtime import HAS_TRITON

    return HAS_TRITON


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
@pytest.mark.parametrize("cl,programs", [(False, None), (True, None), (True, 7), (False, 37)],
                         ids=["nchw", "nhwc", "nhwc-P7", "nchw-P37"])
def test_partial_sums_over_many_programs_are_exact(cl, programs, device, monkeypatch):
    """The reductions' partials over many programs: 16-pixel tiles on a 2 x 20 x 20 map make 50 tiles where the
    interpreter's own tiles make one; the op's own grids (the reductions' programs loop over 2-4 tiles, BN2's
    backward in two groups of the finalisation tree, the second short), or persistent grids of 7 programs
    (each looping over 7-8 tiles, one group) and of 37 (1-2 tiles each, a group of 32 and one of 5); BN2's
    backward in the GPU's gathered half tile; the channel gate's bias sums over its own partials (a tree: 7 groups
    of 8 programs, the last group short). One train
    step against float64, running statistics included, and a second identical step bitwise equal."""
    import triton

    from gam_triton.ops import _autotune, batchnorm, channel_gate

    monkeypatch.setenv("GAM_TRITON_AUTOTUNE", "0")  # the heuristics below, not a choice remembered earlier
    _autotune.reset()
    tiles, grids = [], []

    def bn_tile(C, N, channels_last, target=None, shuffled=False):
        tiles.append(shuffled)
        return triton.Config(dict(BLOCK_P=8 if shuffled else 16, BLOCK_C=16), num_warps=4, num_stages=1)

    real_programs = batchnorm.programs

    def bn_programs(n_tiles, n_cblocks, *args):
        p = real_programs(n_tiles, n_cblocks, *args) if programs is None else min(n_tiles, programs)
        grids.append((n_tiles, p))
        return p

    monkeypatch.setattr(batchnorm, "heuristic", bn_tile)
    monkeypatch.setattr(batchnorm, "programs", bn_programs)
    monkeypatch.setattr(channel_gate, "bwd_heuristic", lambda C, CR, HW, dtype, **kw:
                        triton.Config(dict(BLOCK_P=16, BLOCK_C=16, BLOCK_R=16), num_warps=4, num_stages=2))
    try:
        ref = make_ref("yolo_grouped", 48).train()
        gam = GAM.from_module(ref).to(device).train()
        twin = copy.deepcopy(gam)
        want_mod = f64(ref).train()
        x = make_input(2, 48, 20, 20, torch.float32, device, cl, seed=5)
        gout = make_input(2, 48, 20, 20, torch.float32, device, cl, seed=6)
        _assert_fp32_step_matches(gam, want_mod, x, gout)
        steps = [_step(twin, x, gout) for _ in range(2)]  # batch statistics: the running ones do not enter
    finally:
        _autotune.reset()
    assert True in tiles and False in tiles, "BN2's backward asks for the gathered tile, the rest for the plain one"
    assert all(p <= t for t, p in grids), grids
    if programs is None:  # the real grids: some reduction with two groups, BN1's elementwise pass one per tile
        assert any(batchnorm.GROUP < p < t for t, p in grids) and (50, 50) in grids, grids
    else:
        assert {p for _, p in grids} == {programs}, grids
    ours = {_canonical(n): t for n, t in gam.named_buffers()}
    for name, buf in want_mod.named_buffers():
        if not name.endswith("num_batches_tracked"):
            assert_close(ours[_canonical(name)], buf, torch.float32, 1.0, f"buffer {name}")
    (o1, gx1, gp1), (o2, gx2, gp2) = steps
    assert torch.equal(o1, o2) and torch.equal(gx1, gx2)
    for name in gp1:
        assert torch.equal(gp1[name], gp2[name]), name


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
def test_unfused_fp32_channel_gate_is_exact_too(cl, device, monkeypatch, kernel_names):
    """Where fp32 dots have no spill-free tile (channel_gate.fused: C/r > 128 on a GPU), the channel gate runs as
    PyTorch GEMMs inside the same ops: forced here at a small C, one train step and one eval call against
    float64, no channel-gate kernel launched."""
    from gam_triton.ops import channel_gate

    monkeypatch.setattr(channel_gate, "fused", lambda *a, **k: False)
    ref = make_ref("paper", 20).train()
    gam = GAM.from_module(ref).to(device).train()
    want_mod = f64(ref).train()
    x = make_input(2, 20, 3, 5, torch.float32, device, cl)
    gout = make_input(2, 20, 3, 5, torch.float32, device, cl, seed=3)
    _assert_fp32_step_matches(gam, want_mod, x, gout)
    with torch.no_grad():
        assert_close(gam.eval()(x), want_mod.eval()(x.cpu().double()), torch.float32, 1.0, "eval output")
    assert kernel_names and not {"channel_gate_fwd_kernel", "channel_gate_bwd_kernel"} & set(kernel_names)


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
def test_backward_launches_triton_kernels(device, kernel_names):
    gam = GAM.from_module(make_ref("yolo_grouped", 16)).to(device).train()
    x = make_input(2, 16, 3, 4, torch.float32, device, False).requires_grad_(True)
    out = gam(x)
    kernel_names.clear()  # the backward's launches only
    out.sum().backward()
    assert sorted(kernel_names) == sorted(["bn_bwd_reduce_kernel", "bn_bwd_apply_kernel"] * 2
                                          + ["channel_gate_bwd_kernel"])


LAUNCH_SHAPE = bench.Shape(2, 32, 8, 8, 4, True)  # the shape: YOLO grouped B2 C32 8x8


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


def _saved_bytes(module, x, per_save: bool, counters: Optional[list] = None) -> int:
    """Bytes of the activations saved for backward (parameters excluded): distinct storages, or every save. The
    reductions' int32 counters (scratch of a fixed size per channel count, not an activation) are left out and
    their sizes appended to ``counters``."""
    params = {p.untyped_storage().data_ptr() for p in module.parameters()}
    seen, total = set(), 0

    def pack(t):
        nonlocal total
        st = t.untyped_storage()
        if t.dtype == torch.int32:
            if counters is not None:
                counters.append(t.numel())
            return t
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
    counters, big = [], []
    per_save = _saved_bytes(gam, x, True, counters) / _saved_bytes(ref, x.cpu(), True)
    distinct = _saved_bytes(gam, x, False) / _saved_bytes(ref, x.cpu(), False)
    assert per_save <= 0.4, per_save
    assert distinct <= 0.46, distinct  # x, x1, y2 (C channels), y1, z1 (C/r) and two [4, C] fp32 vectors
    x4 = make_input(4, 32, 16, 12, torch.float32, device, False).requires_grad_(True)
    _saved_bytes(gam, x4, True, big)
    assert counters and counters == big, (counters, big)  # the counters do not grow with the batch or the map


@needs_kernels
def test_double_backward_raises_a_clear_error(device):
    gam = GAM.from_module(make_ref("paper", 20)).to(device).train()
    x = make_input(2, 20, 3, 3, torch.float32, device, False).requires_grad_(True)
    with pytest.raises(RuntimeError, match="double backward"):
        torch.autograd.grad(gam(x).sum(), x, create_graph=True)


@pytest.mark.gpu_check
@pytest.mark.parametrize("scale", [1.0, 16.0], ids=["unit", "large"])
@pytest.mark.parametrize("amp", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_autocast_training_is_as_close_to_float64_as_eager_autocast(amp, scale, device):
    """Ours and eager, both under autocast, against float64: ours may not be much further off than eager. "large":
    activations x16 through the YOLO form's unbounded channel gate (x1 = x * a, no sigmoid: outputs about 2,000,
    weight gradients about 12,000, near fp16's 65,504): eager's fp16 stays finite there, and ours must too."""
    ref = make_ref("yolo_grouped", 32).train().to(device)
    gam = GAM.from_module(ref).to(device).train()
    want_mod = f64(ref).train()
    x = make_input(2, 32, 5, 4, torch.float32, device, True) * scale
    gout = make_input(2, 32, 5, 4, torch.float32, device, True, seed=9)
    with torch.autocast(device, dtype=amp):
        got, gx, gp = _step(gam, x, gout)
        eager, ex, ep = _step(ref, x, gout)
    want, wx, wp = _step(want_mod, x.cpu().double(), gout.cpu().double())
    rtol, atol = TOL[amp]

    def err(a, b):
        return (a.detach().cpu().double() - b).abs().max().item()

    assert got.dtype == eager.dtype and gx.dtype == torch.float32
    finite = [torch.isfinite(t).all().item() for t in (eager, ex, *ep.values())]
    assert all(finite), f"eager autocast overflowed at this scale: {finite}"
    assert all(torch.isfinite(t).all().item() for t in (got, gx, *gp.values()))
    n = max(want.abs().max().item(), 1.0)
    assert err(got, want) / n <= 2 * err(eager, want) / n + atol
    assert err(gx, wx) <= 2 * err(ex, wx) + atol * wx.abs().max().item()
    for name, g in wp.items():
        assert gp[name].dtype == torch.float32, name
        n = max(g.abs().max().item(), 1.0)
        assert err(gp[name], g) / n <= 2 * err(ep[name], g) / n + atol, name


def _meta(shape, dtype, channels_last):
    t = torch.empty(shape, dtype=dtype, device="meta")
    return t.contiguous(memory_format=torch.channels_last) if channels_last else t


@pytest.mark.skipif(not _runtime_has_triton(), reason="builds the kernels' launches: needs triton")
@pytest.mark.parametrize("batch", [1, 16, 64])
def test_reductions_have_a_bounded_serial_tail_and_balanced_programs(batch):
    """From the launches the module makes (GPU heuristics, 132 SMs, meta tensors: nothing runs) at every YOLO
    sweep shape, both BatchNorms (BN1: C/4 channels, BN2: C), both layouts: at most MAX_PROGRAMS programs per
    channel block, so the finalisation tree runs at most 2 serial steps of GROUP rows; and the load instructions
    of the busiest program (its tiles plus the tree's) are at most 4x the median program's."""
    import statistics

    import triton

    from gam_triton.ops import batchnorm as bn

    for c, s in bench.yolo_pairs():
        for which, ch in (("bn1", c // 4), ("bn2", c)):
            for dt, cl in ((torch.bfloat16, True), (torch.float32, False)):
                y = _meta((batch, ch, s, s), dt, cl)
                n = batch * s * s
                st, coef, counts = _meta((4, ch), torch.float32, False), _meta((2, ch), torch.float32, False), \
                    torch.empty(bn.counter_slots(ch), dtype=torch.int32, device="meta")
                cfg = bn.heuristic(ch, n, cl, target="gpu", sms=132)
                stats = bn.stats_launch_args(y, None, None, (st, st, st), 1e-5, 0.1, False, counts, st, cfg)
                mode = 1 if which == "bn2" else 0
                gcfg = bn.heuristic(ch, n, cl, target="gpu", shuffled=mode == 1, sms=132)
                red = bn.reduce_launch_args(mode, y, y if mode else None, y, st, coef, None, None, 4 * mode, counts,
                                            gcfg)
                for (kernel, grid, args, kwargs), tensors, tree in ((stats, 1, bn.TREE_LOADS["stats"]),
                                                                     (red, 2 + mode, bn.TREE_LOADS["reduce"])):
                    p, n_cb = grid
                    bp = kwargs["BLOCK_P"]
                    t = triton.cdiv(n, bp)
                    label = f"{kernel.fn.__name__} B{batch} C{ch} {s}x{s} {dt} grid {grid}"
                    assert 1 <= p <= min(t, bn.MAX_PROGRAMS) and n_cb == triton.cdiv(ch, kwargs["BLOCK_C"]), label
                    assert args[1 if tensors == 1 else 4].shape[0] == p + triton.cdiv(p, bn.GROUP), label
                    groups = triton.cdiv(p, bn.GROUP)
                    steps = triton.cdiv(min(p, bn.GROUP), bn.GROUP) + triton.cdiv(groups, bn.GROUP)
                    assert steps <= 2, label
                    # load instructions, as the compile check counts them: tiles (t // p or t // p + 1 each) x
                    # tensors, and the finalising program's tree (the partials of both levels, the parameters)
                    own = sorted(((t - q - 1) // p + 1) * tensors for q in range(p))
                    busiest = own[-1] + tree
                    wave = 132 * min(32, 64 // kwargs["num_warps"])
                    # balanced, or kept at MIN_WAVE of a wave where balance would leave most SMs idle
                    assert busiest <= 4 * statistics.median(own) or p * n_cb >= bn.MIN_WAVE * wave, \
                        (label, busiest, statistics.median(own))


def _occupancies(num_warps: int) -> set:
    """CTAs per SM a kernel of num_warps can get (64 warps and 32 CTAs, 65536 registers per SM, registers in steps of
    8)."""
    top = min(32, 64 // num_warps)
    return {max(1, min(top, 65536 // (r * 32 * num_warps))) for r in range(8, 256, 8)}


@pytest.mark.skipif(not _runtime_has_triton(), reason="builds the kernels' launches: needs triton")
def test_memory_bound_grids_are_whole_waves_at_the_headline_shapes():
    """B16 YOLO headline shapes, bf16 channels_last and fp32 NCHW, 132 SMs (meta tensors: nothing runs): every
    launch of bn_stats, bn_bwd_reduce, bn_bwd_apply, bn_relu and final_gate has a grid whose waves (grid / (132
    x CTAs per SM)) are >= 0.6 and never in (1, 1.15] for every CTAs-per-SM its registers could give, up to
    rounding of the grid to the channel blocks; and whole_waves itself keeps that for any grid."""
    from gam_triton.ops import _runtime
    from gam_triton.ops import batchnorm as bn
    from gam_triton.ops import elementwise as ew

    for w in (1, 2, 4, 8):
        for g in range(132, 132 * min(32, 64 // w) + 1, 7):
            m = _runtime.whole_waves(g, 1, w, 132) / 132
            assert not any(1 < m / o <= 1.15 for o in _occupancies(w)), (w, g, m)
    for c, s in ((64, 80), (128, 80), (256, 40), (512, 20)):
        n = 16 * s * s
        for dt, cl in ((torch.bfloat16, True), (torch.float32, False)):
            launches = []
            for mode, ch in ((0, c // 4), (1, c)):
                y = _meta((16, ch, s, s), dt, cl)
                st, coef = _meta((4, ch), torch.float32, False), _meta((2, ch), torch.float32, False)
                counts = torch.empty(bn.counter_slots(ch), dtype=torch.int32, device="meta")
                cfg = bn.heuristic(ch, n, cl, target="gpu", sms=132)
                gcfg = bn.heuristic(ch, n, cl, target="gpu", shuffled=mode == 1, sms=132)
                launches += [bn.stats_launch_args(y, None, None, (st, st, st), 1e-5, 0.1, False, counts, st, cfg),
                             bn.reduce_launch_args(mode, y, y if mode else None, y, st, coef, None, None, 4 * mode,
                                                   counts, gcfg),
                             bn.apply_launch_args(mode, y, y if mode else None, y, st, coef, y, y if mode else None,
                                                  4 * mode, gcfg)]
            y1, y2 = _meta((16, c // 4, s, s), dt, cl), _meta((16, c, s, s), dt, cl)
            v1, v2 = _meta((c // 4,), torch.float32, False), _meta((c,), torch.float32, False)
            launches += [ew.bn_relu_launch_args(y1, v1, v1, y1, ew.heuristic(c // 4, s * s, cl, "gpu", batch=16)),
                         ew.final_gate_launch_args(y2, y2, v2, v2, 4, y2, ew.heuristic(c, s * s, cl, "gpu", batch=16))]
            for kernel, grid, _args, kwargs in launches:
                w = kwargs["num_warps"]
                ctas = grid[0] * grid[1]
                label = f"{kernel.fn.__name__} C{c} {s}x{s} {dt} grid {grid} w{w}"
                for occ in _occupancies(w):
                    waves, slack = ctas / (132 * occ), grid[1] / (132 * occ)
                    assert waves >= 0.6 or occ < min(32, 64 // w), label  # a full-occupancy wave fills >= 0.6 of one
                    assert not 1 + slack < waves <= 1.15, (label, occ, waves)
