"""The eval spatial branch as two Triton convolutions (gam_triton.ops.conv, kernels/conv.py).

Against float64 references: the conv kernels alone (odd kernel sizes, grouped and plain, both layouts,
fp32/fp16/bf16), and the GAM module of every public form under GAM_TRITON_CONV=triton (3 launches, no aten
convolution). The selection logic: a candidate that disagrees with the cuDNN path is dropped with a warning.
Bad input. Under TRITON_INTERPRET=1 the kernels run in Triton's interpreter (slow: 7x7 implicit GEMMs, so
shapes are tiny); on a GPU they compile for real.
"""
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from gam_cases import assert_close, f64, make_input, make_ref
from gam_triton import GAM
from gam_triton.ops import _autotune, _runtime, conv
from gam_triton.ops._runtime import INTERPRET
from gam_triton.reference import shuffle as shuffle_map

KERNELS_RUN = INTERPRET or torch.cuda.is_available()
needs_kernels = pytest.mark.skipif(not KERNELS_RUN, reason="the Triton kernels run only on CUDA or under "
                                   "TRITON_INTERPRET=1; elsewhere the PyTorch path is what runs")


@pytest.fixture
def triton_convs(monkeypatch):
    monkeypatch.setenv("GAM_TRITON_CONV", "triton")


def _rand(shape, dtype, device, scale=1.0, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=gen) * scale).to(device=device, dtype=dtype)


def _tile(bp, bn, bk, stages=2):
    import triton

    return triton.Config(dict(BLOCK_P=bp, BLOCK_N=bn, BLOCK_K=bk), num_warps=4, num_stages=stages)


def _conv1(x, wp, bias, z, cfg):
    _runtime.launch(*conv.conv1_launch_args(x, wp, bias, z, cfg, conv.precision(wp.dtype)))


def _layout(t, channels_last):
    return t.contiguous(memory_format=torch.channels_last) if channels_last else t.contiguous()


def _conv1_against_f64(case, dtype, channels_last, device):
    """(z, its float64 reference, a function computing z again) of the public conv_bn_relu at case = (B, CIN,
    COUT, groups, K, H, W)."""
    b, cin, cout, g, k, h, w = case
    x = _layout(_rand((b, cin, h, w), dtype, device), channels_last)
    wt = _rand((cout, cin // g, k, k), dtype, device, 1.5 / (cin // g * k * k) ** 0.5, seed=1)
    bias = _rand((cout,), dtype, device, 0.3, seed=2)
    z = conv.conv_bn_relu(x, wt, bias, g)
    want = torch.relu(F.conv2d(x.cpu().double(), wt.cpu().double(), bias.cpu().double(), padding=k // 2,
                               groups=g))
    assert z.dtype == dtype and z.is_contiguous(memory_format=torch.channels_last)
    return z, want, lambda: conv.conv_bn_relu(x, wt, bias, g)


# --- the kernels alone ---------------------------------------------------------------------------------------
CONV1_CASES = [  # (B, CIN, COUT, groups, K, H, W)
    (1, 48, 12, 4, 7, 3, 5),    # GAM grouped conv1 at C = 48: 12 in and 3 out channels per group
    (2, 20, 5, 1, 3, 4, 3),     # plain, C/r = 5 (padded to 16 columns), batch 2
    (1, 24, 6, 1, 5, 1, 1),     # a 1x1 map: every tap but the centre is padding
    (1, 40, 36, 1, 1, 2, 3),    # 1x1 kernel
    (1, 32, 8, 4, 3, 2, 3),     # 8 in / 2 out per group: packed in pairs (2 block-diagonal groups)
    (1, 32, 32, 2, 3, 3, 2),    # 16 per group: not merged, 2 groups
]


@needs_kernels
@pytest.mark.parametrize("case", CONV1_CASES, ids=lambda c: "B{}_C{}_O{}_g{}_k{}_{}x{}".format(*c))
@pytest.mark.parametrize("dtype,channels_last", [(torch.float32, False), (torch.float32, True),
                                                 (torch.float16, True), (torch.bfloat16, False)],
                         ids=["fp32-nchw", "fp32-nhwc", "fp16-nhwc", "bf16-nchw"])
def test_conv_bn_relu_kernel(case, dtype, channels_last, device):
    z, want, _ = _conv1_against_f64(case, dtype, channels_last, device)
    assert_close(z, want, dtype, what=f"conv_bn_relu {case}")


@needs_kernels
def test_conv_kernels_many_tiles(device):
    """Tiles of 16: several pixel, out-channel and in-channel blocks (partial ones masked) per grid."""
    b, cin, cout, k, h, w = 1, 20, 20, 3, 5, 4
    x = _rand((b, cin, h, w), torch.float32, device)
    wt = _rand((cout, cin, k, k), torch.float32, device, 0.05, seed=1)
    bias = _rand((cout,), torch.float32, device, 0.3, seed=2)
    cfg = _tile(16, 16, 16)
    z = torch.full((b, cout, h, w), float("nan"), device=device).contiguous(memory_format=torch.channels_last)
    _conv1(x, conv.pack_weight(wt), bias, z, cfg)
    z_want = torch.relu(F.conv2d(x.double().cpu(), wt.double().cpu(), bias.double().cpu(), padding=1))
    assert_close(z, z_want, torch.float32, what="conv1 tiles of 16")
    w2 = _rand((cin, cout, k, k), torch.float32, device, 0.05, seed=3)
    scale, shift = torch.ones(cin, device=device), torch.zeros(cin, device=device)
    x1 = _rand((b, cin, h, w), torch.float32, device, seed=4)
    out = torch.full_like(x1, float("nan"))
    _runtime.launch(*conv.conv2_launch_args(z_want.float().to(device), conv.pack_weight(w2), None, scale, shift, x1,
                                            4, out, cfg, "tf32x3"))
    s = torch.sigmoid(F.conv2d(z_want, w2.double().cpu(), padding=1))
    assert_close(out, x1.double().cpu() * shuffle_map(s, 4), torch.float32, what="conv2 tiles of 16")


@needs_kernels
def test_conv_kernels_int64_offsets(monkeypatch, device):
    """The int64 in-image offsets (images of 2**31+ elements) forced on a small case: same results."""
    monkeypatch.setattr(conv, "_span", lambda *t: 2**31)
    x1 = _rand((1, 16, 2, 3), torch.float32, device)
    w1 = _rand((4, 4, 3, 3), torch.float32, device, 0.2, seed=1)
    w2 = _rand((16, 1, 3, 3), torch.float32, device, 0.2, seed=2)
    one, zero = torch.ones(16, device=device), torch.zeros(16, device=device)
    z = conv.conv_bn_relu(x1, w1, None, 4)
    out = conv.conv_gate(z, w2, None, one, zero, x1, 4, 4)
    zw = torch.relu(F.conv2d(x1.double().cpu(), w1.double().cpu(), padding=1, groups=4))
    assert_close(z, zw, torch.float32, what="z1, int64 offsets")
    s = torch.sigmoid(F.conv2d(z.double().cpu(), w2.double().cpu(), padding=1, groups=4))
    assert_close(out, x1.double().cpu() * shuffle_map(s, 4), torch.float32, what="out, int64 offsets")


# --- split-K conv1 (forced: the interpreter's heuristic never splits) ----------------------------------------
@pytest.fixture
def forced_split(monkeypatch):
    """conv1 launches the heuristic tile split SPLIT ways (``forced_split(SPLIT)``); the tuner off (no cache)."""
    monkeypatch.setenv("GAM_TRITON_AUTOTUNE", "0")
    _autotune.reset()

    def force(split, bp=16, bn=16, bk=16):
        import triton

        cfg = triton.Config(dict(BLOCK_P=bp, BLOCK_N=bn, BLOCK_K=bk, SPLIT=split), num_warps=4, num_stages=2)
        monkeypatch.setattr(conv, "conv1_heuristic", lambda *a, **k: cfg)
        return cfg

    yield force
    _autotune.reset()


SPLIT_CASES = [  # (B, CIN, COUT, groups, K, H, W, SPLIT)
    (1, 33, 5, 1, 3, 3, 5, 2),    # odd C, H != W, COUT padded to 16 columns; 27 K steps in 2 splits (14 + 13)
    (2, 20, 12, 1, 3, 4, 3, 4),   # batch 2, 18 steps in 4 splits (5 + 5 + 5 + 3)
    (1, 48, 12, 4, 3, 2, 3, 3),   # grouped: 12 in and 3 out channels per group (merged)
    (1, 24, 6, 1, 3, 1, 1, 8),    # a 1x1 map; 18 steps in 8 splits of 3: the last split is empty (zeros)
]


@needs_kernels
@pytest.mark.parametrize("case", SPLIT_CASES, ids=lambda c: "B{}_C{}_O{}_g{}_k{}_{}x{}_s{}".format(*c))
@pytest.mark.parametrize("dtype,channels_last", [(torch.float32, False), (torch.float32, True),
                                                 (torch.float16, True), (torch.float16, False),
                                                 (torch.bfloat16, True), (torch.bfloat16, False)],
                         ids=["fp32-nchw", "fp32-nhwc", "fp16-nhwc", "fp16-nchw", "bf16-nhwc", "bf16-nchw"])
def test_conv1_split_k(case, dtype, channels_last, device, forced_split, monkeypatch, kernel_names):
    """Split-K conv1 against float64, poisoned outputs and partials (NaN: every element must be written), and
    the same bits on a second run (fixed-order sum, no atomics)."""
    forced_split(case[7])
    monkeypatch.setattr(_runtime, "POISON", True)
    z, want, again = _conv1_against_f64(case[:7], dtype, channels_last, device)
    assert_close(z, want, dtype, what=f"split-K conv_bn_relu {case}")
    assert kernel_names == ["conv_split_kernel", "split_sum_kernel"]
    bits = lambda t: t.contiguous().view(torch.int32 if t.element_size() == 4 else torch.int16)  # noqa: E731
    assert torch.equal(bits(again()), bits(z))


@needs_kernels
def test_conv1_split_k_launches_and_batches(device, forced_split):
    """A split config is two launches (partials, then the sum); batch 0 launches nothing; batch 1 matches the
    unsplit kernel to rounding."""
    cfg = forced_split(3)
    x = _rand((1, 20, 3, 2), torch.float32, device)
    wt = _rand((8, 20, 3, 3), torch.float32, device, 0.1, seed=1)
    bias = _rand((8,), torch.float32, device, 0.3, seed=2)
    wp = conv.pack_weight(wt)
    z = torch.empty((1, 8, 3, 2), device=device).contiguous(memory_format=torch.channels_last)
    launches = conv.conv1_launches(x, wp, bias, z, cfg, "tf32x3")
    assert [la[0].fn.__name__ for la in launches] == ["conv_split_kernel", "split_sum_kernel"]
    assert launches[0][1][2] == 3
    with pytest.raises(ValueError, match="split-K"):
        conv.conv1_launch_args(x, wp, bias, z, cfg, "tf32x3")
    empty = conv.conv_bn_relu(x[:0], wt, bias)
    assert empty.shape == (0, 8, 3, 2)
    z1 = torch.full_like(z, float("nan"))
    _conv1(x, wp, bias, z1, _tile(16, 16, 16))
    torch.testing.assert_close(conv.conv_bn_relu(x, wt, bias), z1, rtol=1e-5, atol=1e-5)


def test_split_k_heuristic():
    """Split only under SPLIT_BELOW_WAVES estimated waves with long K loops, into equal splits; never into
    (1.0, 1.15] waves."""
    assert conv.split_k(400, 196, 132 * 6) == 4       # plain conv1 C256 40x40 B16 (0.51 waves): not 2 (1.01)
    assert conv.split_k(832, 196, 132 * 6) == 1       # >= 0.6 waves: unsplit
    assert conv.split_k(224, 392, 132 * 6) == 8       # C512 20x20 B16: 0.28 -> 2.26 waves (4: 1.13)
    assert conv.split_k(336, 441, 132 * 6) == 3       # C576 20x20 B16 (9 in-channel blocks): 0.42 -> 1.27
    assert conv.split_k(25, 196, 132 * 6) == 4        # one image: the most equal splits keeping 32 K steps
    assert conv.split_k(25, 40, 132 * 6) == 1         # a short K loop: unsplit
    assert all(s == 1 or not 1.0 < p * s / 792 <= 1.15
               for p in range(1, 800) for k in (49, 196, 392) for s in [conv.split_k(p, k, 792)])
    assert all(k % conv.split_k(p, k, 792) == 0 for p in range(1, 800, 7) for k in (49, 196, 392, 441))
    if not conv.HAS_TRITON:
        return
    cfg = conv.conv1_heuristic(256, 64, 1, 7, 16, 1600, torch.bfloat16, "tf32", sms=132, target="gpu")
    assert conv.resident_ctas(conv.heuristic(256, 64, 1600, torch.bfloat16, "gpu"), torch.bfloat16) == 6
    assert cfg.kwargs == dict(BLOCK_P=64, BLOCK_N=64, BLOCK_K=64, SPLIT=4)
    grouped = conv.conv1_heuristic(64, 16, 4, 7, 16, 1600, torch.bfloat16, "tf32", sms=132, target="gpu")
    assert "SPLIT" not in grouped.kwargs                # YOLO conv1 at C256 40x40: 1.05 waves already
    for prec in ("tf32", "tf32x3"):                     # fp32 never splits (its split kernel spilled)
        assert "SPLIT" not in conv.conv1_heuristic(256, 64, 1, 7, 16, 1600, torch.float32, prec, 132, "gpu").kwargs


def test_conv1_candidates_offer_splits_under_one_wave(monkeypatch):
    monkeypatch.setattr(conv, "TARGET", "gpu")
    gpu_heuristic = conv.heuristic
    monkeypatch.setattr(conv, "heuristic", lambda *a: gpu_heuristic(*a[:4], target="gpu"))
    cands = conv.conv1_candidates(256, 64, 1, 7, 16, 1600, torch.bfloat16)
    splits = [c.kwargs.get("SPLIT", 1) for c in cands]
    assert splits[:2] == [2, 4] and set(splits[2:]) == {1} and len(cands) <= _runtime.MAX_CANDIDATES
    tile = gpu_heuristic(256, 64, 1600, torch.bfloat16, target="gpu")
    assert _autotune.ident(tile) in {_autotune.ident(c) for c in cands}  # the unsplit heuristic tile too
    assert len({_autotune.ident(c) for c in cands}) == len(cands)
    assert all("SPLIT" not in c.kwargs for c in conv.conv1_candidates(64, 16, 4, 7, 16, 6400, torch.bfloat16))
    assert all("SPLIT" not in c.kwargs for c in conv.conv1_candidates(256, 64, 1, 7, 16, 1600, torch.float32))


GATE_CASES = [  # (B, CIN, C, groups, K, shuffle, H, W)
    (1, 12, 48, 4, 7, 4, 2, 3),   # GAM grouped conv2 at C = 48 (3 in, 12 out channels per group), shuffled
    (1, 5, 20, 1, 3, 0, 3, 5),    # plain, no shuffle
    (2, 8, 24, 1, 3, 4, 1, 2),    # plain with the shuffle, batch 2
    (1, 8, 32, 4, 3, 4, 3, 2),    # 2 in / 8 out per group: packed in pairs, shuffled
    (2, 32, 32, 2, 3, 4, 2, 2),   # 16 per group: not merged, 2 groups
]


@needs_kernels
@pytest.mark.parametrize("case", GATE_CASES, ids=lambda c: "B{}_I{}_C{}_g{}_k{}_s{}_{}x{}".format(*c))
@pytest.mark.parametrize("dtype,x1_cl,out_cl", [(torch.float32, True, False), (torch.float32, False, True),
                                                (torch.float16, True, True)],
                         ids=["fp32-nhwc-to-nchw", "fp32-nchw-to-nhwc", "fp16-nhwc"])
def test_conv_gate_kernel(case, dtype, x1_cl, out_cl, device):
    b, cin, c, g, k, sh, h, w = case
    z1 = _layout(_rand((b, cin, h, w), dtype, device).relu(), not x1_cl)  # z1's layout: the other one
    x1 = _layout(_rand((b, c, h, w), dtype, device, seed=3), x1_cl)
    wt = _rand((c, cin // g, k, k), dtype, device, 1.5 / (cin // g * k * k) ** 0.5, seed=4)
    bias = _rand((c,), dtype, device, 0.3, seed=5)
    scale = _rand((c,), torch.float32, device, 0.3, seed=6) + 1
    shift = _rand((c,), torch.float32, device, 0.3, seed=7)
    out = conv.conv_gate(z1, wt, bias, scale, shift, x1, g, sh, out_channels_last=out_cl)
    y2 = F.conv2d(z1.cpu().double(), wt.cpu().double(), bias.cpu().double(), padding=k // 2, groups=g)
    s = torch.sigmoid(y2 * scale.cpu().double().view(1, -1, 1, 1) + shift.cpu().double().view(1, -1, 1, 1))
    want = x1.cpu().double() * shuffle_map(s, sh)
    assert out.dtype == dtype
    assert out.is_contiguous(memory_format=torch.channels_last if out_cl else torch.contiguous_format)
    assert_close(out, want, dtype, what=f"conv_gate {case}")


# --- the packed layout: groups of fewer than 16 channels merged into block-diagonal ones -------------------------
@pytest.mark.parametrize("groups,cin_g,cout_g,merged", [
    (4, 16, 4, 4), (4, 4, 16, 4),     # YOLO C64 conv1 / conv2: dense (same MMA count as padding N or K to 16)
    (4, 32, 8, 2), (4, 8, 32, 2),     # YOLO C128: pairs
    (4, 64, 16, 1), (4, 16, 64, 1),   # YOLO C256: as is
    (1, 64, 16, 1), (4, 48, 12, 1), (4, 12, 3, 4), (8, 2, 2, 8), (2, 3, 5, 2),
])
def test_pack_weight_merges_narrow_groups_into_the_same_convolution(groups, cin_g, cout_g, merged):
    """The packed weight with G / S block-diagonal groups computes the grouped convolution exactly (float64)."""
    w = _rand((cout_g * groups, cin_g, 3, 3), torch.float64, "cpu")
    x = _rand((2, cin_g * groups, 4, 5), torch.float64, "cpu", seed=1)
    assert conv.merged_groups(groups, cin_g, cout_g) == merged
    wp = conv.pack_weight(w, groups)
    assert tuple(wp.shape) == (3, 3, merged * cin_g, cout_g * groups) and wp.is_contiguous()
    got = F.conv2d(x, conv.unpack_weight(wp), padding=1, groups=groups // merged)
    torch.testing.assert_close(got, F.conv2d(x, w, padding=1, groups=groups), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("c,groups,z1_per_group", [(48, 4, 16), (192, 4, 16), (320, 4, 32), (64, 4, 16),
                                                   (20, 1, 16), (256, 1, 64)])
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_pack_spatial_pads_z1_per_group_with_zeros(c, groups, z1_per_group, dtype):
    """conv1 packed with zero columns and biases, conv2 with zero rows: z1's pad channels are 0 and the branch
    computes conv2(relu(conv1(x))) exactly (in float64); in fp16 z1 has ``z1_per_group`` channels per (merged)
    group, in fp32 no padding."""
    cr = c // 4
    w1 = _rand((cr, c // groups, 3, 3), dtype, "cpu", seed=1)
    b1 = _rand((cr,), dtype, "cpu", seed=2)
    w2 = _rand((c, cr // groups, 3, 3), dtype, "cpu", seed=3)
    x = _rand((2, c, 4, 5), torch.float64, "cpu", seed=4)
    wp1, bp1, wp2 = (t.double() for t in conv.pack_spatial(w1, b1, w2, groups))
    w1, b1, w2 = w1.double(), b1.double(), w2.double()
    if dtype == torch.float32:
        z1_per_group = wp1.shape[3] * wp1.shape[2] // c
        assert wp1.shape[3] == cr
    g1, g2 = c // wp1.shape[2], wp1.shape[3] // wp2.shape[2]
    assert g1 == g2 and wp1.shape[3] == g1 * z1_per_group and bp1.shape == (wp1.shape[3],)
    z1 = torch.relu(F.conv2d(x, conv.unpack_weight(wp1), bp1, padding=1, groups=g1))
    want_z1 = torch.relu(F.conv2d(x, w1, b1, padding=1, groups=groups))
    pad = torch.ones(wp1.shape[3], dtype=torch.bool)
    pad.view(g1, -1)[:, : cr // g1] = False
    assert torch.equal(z1[:, pad], torch.zeros_like(z1[:, pad]))
    torch.testing.assert_close(z1[:, ~pad], want_z1, rtol=1e-12, atol=1e-12)
    got = F.conv2d(z1, conv.unpack_weight(wp2), padding=1, groups=g2)
    torch.testing.assert_close(got, F.conv2d(want_z1, w2, padding=1, groups=groups), rtol=1e-12, atol=1e-12)


# --- the GAM module under GAM_TRITON_CONV=triton ---------------------------------------------------------------
class OpLog(TorchDispatchMode):
    """The names of the ops dispatched (custom ops appear as themselves; their insides are not seen)."""

    def __init__(self):
        super().__init__()
        self.names = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(func.name())
        return func(*args, **(kwargs or {}))


# (form, C, layouts, maps): grouped + shuffle (yolo_grouped), plain + shuffle (yolo_plain), plain without
# shuffle with the channel sigmoid (paper) and without (seed); H != W (3x5) and a 1x1 map; batch 1.
MODULE_CASES = [
    ("yolo_grouped", 48, (1, 2, 3)),
    ("yolo_plain", 20, (1, 3, 5)),
    ("paper", 20, (1, 1, 1)),
    ("seed", 48, (1, 3, 5)),
]


@needs_kernels
@pytest.mark.parametrize("form,c,shape", MODULE_CASES, ids=[f"{f}-C{c}" for f, c, _ in MODULE_CASES])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_module_triton_convs_fp32(form, c, shape, channels_last, device, triton_convs):
    ref = make_ref(form, c).eval()
    gam = GAM.from_module(ref).to(device).eval()
    x = make_input(*shape[:1], c, *shape[1:], torch.float32, device, channels_last)
    with torch.no_grad():
        got = gam(x)
        want = f64(ref).eval()(x.cpu().double())
    assert got.shape == x.shape and got.dtype == x.dtype
    assert got.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    assert_close(got, want, torch.float32, what=f"{form} C={c} {shape}")


@needs_kernels
@pytest.mark.parametrize("form,c,dtype,channels_last", [
    ("yolo_grouped", 48, torch.float16, True),
    ("paper", 20, torch.float16, False),
    ("yolo_plain", 20, torch.bfloat16, True),
], ids=["yolo_grouped-fp16-nhwc", "paper-fp16-nchw", "yolo_plain-bf16-nhwc"])
@pytest.mark.gpu_check
def test_module_triton_convs_half(form, c, dtype, channels_last, device, triton_convs):
    ref = make_ref(form, c).eval()
    gam = GAM.from_module(ref).to(device=device, dtype=dtype).eval()
    x = make_input(1, c, 2, 3, dtype, device, channels_last)
    with torch.no_grad():
        got = gam(x)
    want = f64(ref).eval()(x.cpu().double())
    assert got.dtype == dtype
    assert_close(got, want, dtype, what=f"{form} {dtype}")


@needs_kernels
def test_module_triton_convs_c192(device, triton_convs):
    """C = 192 grouped (conv1: 48 in / 12 out channels per group; conv2: 12 in / 48 out), once."""
    ref = make_ref("yolo_grouped", 192).eval()
    gam = GAM.from_module(ref).to(device).eval()
    x = make_input(1, 192, 2, 3, torch.float32, device, True)
    with torch.no_grad():
        got = gam(x)
    assert_close(got, f64(ref).eval()(x.cpu().double()), torch.float32, what="yolo_grouped C=192")


@needs_kernels
def test_module_eval_runs_three_kernels_no_aten_convolution(device, triton_convs):
    gam = GAM.from_module(make_ref("yolo_plain", 20)).to(device).eval()
    x = make_input(1, 20, 2, 3, torch.float32, device, True)
    with torch.no_grad():
        gam(x)  # folds BN1 and packs the weights once
        with OpLog() as log:
            gam(x)
    kernels = [n for n in log.names if n.startswith("gam_triton::")]
    assert kernels == ["gam_triton::channel_gate", "gam_triton::conv_bn_relu", "gam_triton::conv_gate"]
    assert not [n for n in log.names if "convolution" in n or n.startswith("aten::relu")], log.names


@needs_kernels
def test_cudnn_mode_and_grad_keep_the_aten_convolutions(device, monkeypatch):
    gam = GAM.from_module(make_ref("yolo_grouped", 48)).to(device).eval()
    x = make_input(1, 48, 1, 2, torch.float32, device, True)
    monkeypatch.setenv("GAM_TRITON_CONV", "cudnn")
    with torch.no_grad(), OpLog() as log:
        gam(x)
    assert sum("convolution" in n for n in log.names) == 2
    assert "gam_triton::conv_gate" not in log.names
    monkeypatch.setenv("GAM_TRITON_CONV", "triton")  # a gradient is needed: cuDNN (the kernels have none)
    xg = x.clone().requires_grad_(True)
    with OpLog() as log:
        out = gam(xg)
    assert sum("convolution" in n for n in log.names) == 2
    out.sum().backward()
    assert xg.grad is not None and torch.isfinite(xg.grad).all()


def test_auto_mode_without_a_gpu_is_the_cudnn_path(device, monkeypatch):
    if torch.cuda.is_available() and not INTERPRET:
        pytest.skip("on a GPU auto mode times both paths; this checks the CPU / interpreter decision")
    monkeypatch.delenv("GAM_TRITON_CONV", raising=False)
    assert conv.conv_mode() == "auto"
    gam = GAM.from_module(make_ref("paper", 20)).to(device).eval()
    x = make_input(1, 20, 2, 3, torch.float32, device, False)
    with torch.no_grad(), OpLog() as log:
        gam(x)
    assert sum("convolution" in n for n in log.names) == 2


def test_bad_conv_mode(monkeypatch):
    monkeypatch.setenv("GAM_TRITON_CONV", "fast")
    with pytest.raises(ValueError, match="GAM_TRITON_CONV must be one of auto, triton, cudnn"):
        conv.conv_mode()


# --- selection: candidates that disagree with cuDNN are dropped ----------------------------------------------
@pytest.fixture
def gpu_mode(monkeypatch, tmp_path):
    """Pretend kernels can be timed here (a private tuning cache: choices must not leak between tests)."""
    monkeypatch.setattr(_runtime, "has_cuda", lambda: True)
    monkeypatch.setattr(_runtime, "device_name", lambda index=None: _runtime.CPU_DEVICE)
    monkeypatch.setenv("GAM_TRITON_CACHE_DIR", str(tmp_path / "tune_cache"))
    _autotune.reset()
    yield
    _autotune.reset()


def _fake_timer(monkeypatch, times):
    """``_autotune.do_bench`` replaced: runs fn once, returns the next of ``times`` (ms)."""
    it = iter(times)

    def fake(fn, **kwargs):
        fn()
        return next(it)

    monkeypatch.setattr(_autotune, "do_bench", fake)


def _select_checked(op, key, heur, cands, run, reference, tol):
    bench = conv.checked(op, _autotune.timed(run), run, reference, tol)
    return _autotune.select(op, key, lambda: heur, cands, bench)


def _tune_other_kernels(gam, x, monkeypatch):
    """Tune the channel gate and final gate first (cuDNN mode), so that the timer's made-up times go to the
    spatial paths afterwards."""
    monkeypatch.setenv("GAM_TRITON_CONV", "cudnn")
    monkeypatch.setattr(_autotune, "do_bench", lambda fn, **kw: (fn(), 1.0)[1])
    with torch.no_grad():
        gam(x)
    monkeypatch.delenv("GAM_TRITON_CONV")


def _mismatches(rec) -> list:
    return [str(w.message) for w in rec if issubclass(w.category, conv.CandidateMismatchWarning)]


def test_wrong_candidate_is_rejected_with_a_warning(gpu_mode, monkeypatch):
    ref = torch.arange(12.0)
    good_a, good_b, wrong = _tile(64, 16, 16), _tile(32, 16, 16), _tile(128, 16, 16, 3)
    outputs = {64: ref + 1e-6, 32: ref.clone(), 128: ref + 0.5}
    _fake_timer(monkeypatch, [3.0, 2.0, 0.1])  # the wrong candidate would be the fastest by far
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        cfg = _select_checked("test_conv_op", (1, 2, "k"), good_a, lambda: [good_b, wrong],
                              lambda c: outputs[c.kwargs["BLOCK_P"]], lambda: ref, (1e-3, 1e-3))
    assert _autotune.ident(cfg) == _autotune.ident(good_b)
    msgs = _mismatches(rec)
    assert len(msgs) == 1 and _autotune.describe(wrong) in msgs[0] and "test_conv_op" in msgs[0]


def test_nan_candidate_is_rejected(gpu_mode, monkeypatch):
    heur, nan = _tile(64, 16, 16), _tile(32, 16, 16)
    ref = torch.ones(4)
    _fake_timer(monkeypatch, [1.0, 0.1])
    with pytest.warns(conv.CandidateMismatchWarning, match="BLOCK_P=32"):
        cfg = _select_checked("test_conv_nan", (1,), heur, lambda: [nan],
                              lambda c: ref if c is heur else torch.full((4,), float("nan")), lambda: ref,
                              (1e-2, 1e-2))
    assert cfg is heur


@needs_kernels
def test_wrong_conv_tile_rejected_against_cudnn(gpu_mode, monkeypatch, device):
    """The real conv1 launch as candidates, one of them corrupted: cuDNN's conv (the reference) rejects it."""
    x = make_input(1, 20, 2, 3, torch.float32, device, True)
    wt = _rand((5, 20, 3, 3), torch.float32, device, 0.1, seed=1)
    bias = _rand((5,), torch.float32, device, 0.3, seed=2)
    wp = conv.pack_weight(wt)
    good, bad = _tile(16, 16, 32, 1), _tile(32, 16, 32, 1)
    z = torch.empty(1, 5, 2, 3, device=device).contiguous(memory_format=torch.channels_last)

    def run(cfg):
        _conv1(x, wp, bias, z, cfg)
        return z + 1.0 if cfg is bad else z  # the injected fault

    _fake_timer(monkeypatch, [2.0, 1.0])
    with pytest.warns(conv.CandidateMismatchWarning, match=r"conv_bn_relu candidate BLOCK_P=32"):
        cfg = _select_checked("conv_bn_relu", ("test",), good, lambda: [bad], run,
                              lambda: torch.relu(F.conv2d(x, wt, bias, padding=1)), (1e-3, 1e-3))
    assert cfg is good


@needs_kernels
def test_auto_mode_drops_a_wrong_triton_path(gpu_mode, monkeypatch, device):
    """Auto mode times both whole branches; a Triton path disagreeing with cuDNN is dropped even when faster,
    and the choice is remembered (not timed again)."""
    monkeypatch.delenv("GAM_TRITON_CONV", raising=False)
    monkeypatch.setattr(conv, "candidates", lambda *a: [])  # conv tiles: the heuristic only
    gam = GAM.from_module(make_ref("paper", 20)).to(device).eval()
    x = make_input(1, 20, 2, 3, torch.float32, device, False)
    real_conv_gate = conv.run_conv2
    monkeypatch.setattr(conv, "run_conv2", lambda *a: real_conv_gate(*a) * 1.5)
    _tune_other_kernels(gam, x, monkeypatch)
    _fake_timer(monkeypatch, [2.0, 0.1])  # cuDNN, then the (wrong) Triton path would win
    with torch.no_grad(), warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        got = gam(x)
        again = gam(x)
    msgs = _mismatches(rec)
    assert len(msgs) == 1 and "spatial candidate triton " in msgs[0]
    want = make_ref("paper", 20).eval().double()(x.cpu().double())
    assert_close(got, want, torch.float32)
    assert torch.equal(got, again)
    assert [r.choice for r in _autotune.drain_log() if r.op == "spatial"] == ["cudnn"]


@needs_kernels
def test_auto_mode_picks_a_faster_correct_triton_path(gpu_mode, monkeypatch, device):
    monkeypatch.delenv("GAM_TRITON_CONV", raising=False)
    gam = GAM.from_module(make_ref("paper", 20)).to(device).eval()
    x = make_input(1, 20, 2, 3, torch.float32, device, False)
    # conv tiles: only the heuristic is tuned (one candidate each), then cuDNN 2 ms against Triton 1 ms
    monkeypatch.setattr(conv, "candidates", lambda *a: [])
    _tune_other_kernels(gam, x, monkeypatch)
    _fake_timer(monkeypatch, [2.0, 1.0])
    with torch.no_grad():
        got = gam(x)  # tuned here (nothing is timed under a dispatch mode such as OpLog)
        with OpLog() as log:
            assert torch.equal(gam(x), got)
    assert "gam_triton::conv_gate" in log.names
    assert_close(got, make_ref("paper", 20).eval().double()(x.cpu().double()), torch.float32)
    assert [r.choice for r in _autotune.drain_log() if r.op == "spatial"] == ["triton"]


# --- bad input -----------------------------------------------------------------------------------------------
def _gate_args(**over):
    c, cr = 8, 2
    args = dict(z1=torch.randn(1, cr, 3, 3), weight=torch.randn(c, cr, 3, 3), bias=torch.randn(c),
                scale=torch.ones(c), shift=torch.zeros(c), x1=torch.randn(1, c, 3, 3), groups=1, shuffle=4)
    args.update(over)
    return args


@pytest.mark.parametrize("over,exc,match", [
    (dict(weight=torch.randn(8, 2, 4, 4)), ValueError, "K odd"),
    (dict(weight=torch.randn(8, 2, 3, 5)), ValueError, "K odd"),
    (dict(weight=torch.randn(8, 3, 3, 3)), ValueError, "does not fit 2 input channels"),
    (dict(weight=torch.randn(6, 2, 3, 3)), ValueError, "6 output channels, expected 8"),
    (dict(weight=torch.randn(8, 2, 3, 3, dtype=torch.float64)), TypeError, "dtype"),
    (dict(weight="w"), TypeError, "torch.Tensor"),
    (dict(groups=0), ValueError, "groups must be an int >= 1"),
    (dict(groups=2), ValueError, "does not fit"),
    (dict(shuffle=3), ValueError, "shuffle .3. must be 0"),
    (dict(scale=torch.ones(7)), ValueError, "scale must have shape"),
    (dict(shift=None), TypeError, "shift is required"),
    (dict(bias=torch.ones(8, dtype=torch.int32)), TypeError, "bias must be a floating-point"),
    (dict(x1=torch.randn(1, 8, 3, 4)), ValueError, "does not match x1"),
    (dict(x1=torch.randn(2, 8, 3, 3)), ValueError, "does not match x1"),
    (dict(z1=torch.randn(1, 2, 3, 3, dtype=torch.float64),
          weight=torch.randn(8, 2, 3, 3, dtype=torch.float64)), TypeError, "x1 dtype"),
    (dict(z1=torch.randn(2, 3, 3)), ValueError, "z1 must be 4-D"),
])
def test_conv_gate_bad_input(over, exc, match, monkeypatch):
    monkeypatch.setattr(_runtime, "launch", _no_launch)
    with pytest.raises(exc, match=match):
        conv.conv_gate(**_gate_args(**over))


def _no_launch(*a, **k):
    raise AssertionError("a kernel was launched for bad input")


@pytest.mark.parametrize("x,w,b,groups,exc,match", [
    (torch.randn(1, 8, 3, 3), torch.randn(2, 8, 2, 2), None, 1, ValueError, "K odd"),
    (torch.randn(1, 8, 3, 3), torch.randn(2, 4, 3, 3), None, 1, ValueError, "does not fit 8 input channels"),
    (torch.randn(1, 8, 3, 3), torch.randn(3, 2, 3, 3), None, 4, ValueError, "does not fit"),
    (torch.randn(1, 8, 3, 3), torch.randn(2, 8, 3, 3), torch.ones(3), 1, ValueError, "bias must have shape"),
    (torch.randn(8, 3, 3), torch.randn(2, 8, 3, 3), None, 1, ValueError, "x1 must be 4-D"),
    (torch.ones(1, 8, 3, 3, dtype=torch.int64), torch.randn(2, 8, 3, 3), None, 1, TypeError, "floating"),
    (torch.randn(1, 8, 3, 3), torch.randn(2, 8, 3, 3).half(), None, 1, TypeError, "dtype"),
])
def test_conv_bn_relu_bad_input(x, w, b, groups, exc, match, monkeypatch):
    monkeypatch.setattr(_runtime, "launch", _no_launch)
    with pytest.raises(exc, match=match):
        conv.conv_bn_relu(x, w, b, groups)


def test_spatial_eval_bad_input(monkeypatch):
    monkeypatch.setattr(_runtime, "launch", _no_launch)
    x1 = torch.randn(1, 8, 3, 3)
    w1, w2 = torch.randn(2, 8, 3, 3), torch.randn(8, 2, 3, 3)
    ok = dict(x1=x1, w1=w1, b1=None, w2=w2, b2=None, scale2=torch.ones(8), shift2=torch.zeros(8))
    with pytest.raises(ValueError, match="does not fit 2 input channels"):
        conv.spatial_eval(**dict(ok, w2=torch.randn(8, 1, 3, 3)))
    with pytest.raises(ValueError, match="shuffle"):
        conv.spatial_eval(**ok, shuffle=3)
    with pytest.raises(ValueError, match="w1 has 16 output channels"):
        conv.spatial_eval(**dict(ok, w1=torch.randn(16, 8, 3, 3), w2=torch.randn(8, 16, 3, 3)))
    monkeypatch.setenv("GAM_TRITON_CONV", "bogus")
    with pytest.raises(ValueError, match="GAM_TRITON_CONV"):
        conv.spatial_eval(**ok)


# --- traffic model: the fused path as counted on meta tensors and as the kernels run ---------------------------
def test_fused_traffic_standins_match_and_save_bytes():
    import os
    import sys

    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "perf"))
    import bench
    import traffic

    shape = bench.Shape(1, 16, 2, 3, 4, False)
    today = traffic.gam_triton_traffic(shape, torch.float32, conv="cudnn")
    fused = traffic.gam_triton_traffic(shape, torch.float32, conv="triton")
    assert fused.launches == 3 and today.launches == 5
    assert set(fused.by_op()) == {"gam_triton::channel_gate", "gam_triton::conv_bn_relu", "gam_triton::conv_gate"}
    big = bench.Shape(16, 256, 40, 40, 4, True)
    ratio = (traffic.gam_triton_traffic(big, torch.bfloat16, conv="triton").bytes
             / traffic.gam_triton_traffic(big, torch.bfloat16, conv="cudnn").bytes)
    assert ratio <= 0.8
    if KERNELS_RUN:
        real = traffic.gam_triton_traffic(shape, torch.float32, device="cpu" if INTERPRET else "cuda", conv="triton")
        assert real.by_op() == fused.by_op()
        assert (real.bytes_read, real.bytes_written) == (fused.bytes_read, fused.bytes_written)


# --- on a GPU: the kernels compiled for real at YOLO widths -------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or INTERPRET,
                    reason="needs a CUDA GPU with TRITON_INTERPRET unset to compile the kernels")
@pytest.mark.parametrize("form,c", [("yolo_grouped", 64), ("yolo_grouped", 192), ("yolo_plain", 256),
                                    ("paper", 320)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("conv", ["triton", "auto"])
def test_yolo_widths_compiled(form, c, dtype, conv, monkeypatch):
    monkeypatch.setenv("GAM_TRITON_CONV", conv)
    ref = make_ref(form, c).eval()
    gam = GAM.from_module(ref).to(device="cuda", dtype=dtype).eval()
    x = make_input(2, c, 20, 24, dtype, "cuda", True)
    with torch.no_grad():
        got = gam(x)
    assert_close(got, f64(ref).eval()(x.cpu().double()), dtype, what=f"{form} C={c} {dtype} {conv}")
