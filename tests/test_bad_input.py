"""Bad input gets a clear ValueError or TypeError naming the problem, before any kernel runs."""
import pytest
import torch

from gam_triton import GAM
from gam_triton.ops import _runtime
from gam_triton.ops.channel_gate import channel_gate
from gam_triton.ops.elementwise import bn_relu, final_gate


@pytest.fixture
def no_kernel(monkeypatch):
    def fail(*a, **k):
        raise AssertionError("a kernel was launched for bad input")

    monkeypatch.setattr(_runtime, "launch", fail)


@pytest.mark.parametrize("kwargs,exc,match", [
    (dict(in_channels=3, rate=4), ValueError, "in_channels // rate is 0"),
    (dict(in_channels=24, out_channels=12), ValueError, "out_channels .* must equal in_channels"),
    (dict(in_channels=24, group=True), ValueError, "divisible by rate"),
    (dict(in_channels=24, kernel_size=6), ValueError, "kernel_size must be odd"),
    (dict(in_channels=22, shuffle_groups=4), ValueError, "shuffle_groups .* must divide"),
    (dict(in_channels=24, shuffle_groups=0), ValueError, "shuffle_groups must be >= 1"),
    (dict(in_channels=0), ValueError, "in_channels must be >= 1"),
    (dict(in_channels=24, rate=0), ValueError, "rate must be >= 1"),
    (dict(in_channels=24.0), TypeError, "in_channels must be an int"),
    (dict(in_channels=24, group="yes"), TypeError, "group must be a bool"),
    (dict(in_channels=24, channel_sigmoid=None), TypeError, "channel_sigmoid must be a bool"),
    (dict(in_channels=24, padding_mode=None), TypeError, "padding_mode must be a str"),
    (dict(in_channels=24, padding_mode="same"), ValueError, "padding_mode must be one of zeros, reflect"),
])
def test_bad_construction(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        GAM(**kwargs)


@pytest.mark.parametrize("make_x,exc,match", [
    (lambda: torch.randn(24, 5, 5), ValueError, "4-D input"),
    (lambda: torch.randn(1, 1, 24, 5, 5), ValueError, "4-D input"),
    (lambda: torch.randn(1, 20, 5, 5), ValueError, "expected 24 channels"),
    (lambda: torch.ones(1, 24, 5, 5, dtype=torch.int64), TypeError, "floating-point"),
    (lambda: torch.ones(1, 24, 5, 5, dtype=torch.bool), TypeError, "floating-point"),
    (lambda: torch.randn(1, 24, 5, 5, dtype=torch.float16), TypeError, "differs from the parameters"),
    (lambda: torch.randn(1, 24, 5, 5, device="meta"), ValueError, "is on meta"),
    (lambda: [[1.0]], TypeError, "expected a torch.Tensor"),
])
def test_bad_forward_input(make_x, exc, match, no_kernel):
    gam = GAM(24).eval()
    with pytest.raises(exc, match=match):
        gam(make_x())


@pytest.mark.parametrize("mode,least", [("reflect", 4), ("circular", 3)])
def test_maps_too_small_for_the_padding_mode(mode, least, no_kernel):
    """Reflect padding needs maps larger than the pad (3 for 7x7), circular at least as large: said before the
    channel gate runs, for H and for W; the least size runs (float64: the PyTorch path, no kernel)."""
    gam = GAM(24, padding_mode=mode).eval()
    for h, w in ((least - 1, 9), (9, least - 1)):
        with pytest.raises(ValueError, match=f"padding_mode '{mode}' needs H and W of at least {least}"):
            gam(torch.randn(1, 24, h, w))
    x = torch.randn(1, 24, least, least, dtype=torch.float64)
    with torch.no_grad():
        assert gam.double()(x).shape == x.shape


def _cg_args():
    return [torch.randn(1, 8, 3, 3), torch.randn(2, 8), torch.randn(2), torch.randn(8, 2), torch.randn(8)]


@pytest.mark.parametrize("i,bad,exc,match", [
    (0, torch.randn(8, 3, 3), ValueError, "x must be 4-D"),
    (0, torch.ones(1, 8, 3, 3, dtype=torch.int32), TypeError, "x must be floating-point"),
    (1, torch.randn(2, 6), ValueError, "weights do not fit"),
    (3, torch.randn(8, 3), ValueError, "weights do not fit"),
    (1, torch.randn(2, 8, dtype=torch.float64), TypeError, "share one floating dtype"),
    (2, torch.randn(3), ValueError, r"b1 must have shape \(2,\)"),
    (4, torch.randn(8, 1), ValueError, r"b2 must have shape \(8,\)"),
    (1, torch.randn(2, 8, device="meta"), ValueError, "w1 is on meta"),
])
def test_channel_gate_rejects_bad_arguments(i, bad, exc, match, no_kernel):
    args = _cg_args()
    args[i] = bad
    with pytest.raises(exc, match=match):
        channel_gate(*args, True)


@pytest.mark.parametrize("kwargs,exc,match", [
    (dict(y2=torch.randn(1, 8, 3, 4)), ValueError, "y2 must match the shape"),
    (dict(scale=torch.randn(7)), ValueError, r"scale must have shape \(8,\)"),
    (dict(shift=None), TypeError, "required"),
    (dict(groups=3), ValueError, r"groups \(3\) must be 0"),
    (dict(x1="x"), TypeError, "x1 must be a torch.Tensor"),
])
def test_final_gate_and_bn_relu_reject_bad_arguments(kwargs, exc, match, no_kernel):
    args = dict(x1=torch.randn(1, 8, 3, 3), y2=torch.randn(1, 8, 3, 3), scale=torch.ones(8),
                shift=torch.zeros(8), groups=4)
    args.update(kwargs)
    with pytest.raises(exc, match=match):
        final_gate(**args)
    if "scale" in kwargs or "shift" in kwargs:
        with pytest.raises(exc, match=match):
            bn_relu(torch.randn(1, 8, 2, 2), args["scale"], args["shift"])
