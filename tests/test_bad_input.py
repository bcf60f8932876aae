"""Bad input gets a clear ValueError or TypeError naming the problem, before any kernel runs."""
import pytest
import torch

import gam_triton.channel_gate as cg_mod
from gam_triton import GAM


@pytest.fixture
def no_kernel(monkeypatch):
    def fail(*a, **k):
        raise AssertionError("a kernel was launched for bad input")

    monkeypatch.setattr(cg_mod, "_launch", fail)


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
