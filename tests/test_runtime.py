"""Runtime helpers (issue 8): the fp32 dot precision read through the legacy and the new PyTorch APIs, and
the device context the launch functions run under.

Every precision test restores PyTorch's global settings afterwards (the ``precision_state`` fixture).
"""
import types

import pytest
import torch

from gam_triton.ops import _runtime
from gam_triton.ops._runtime import dot_precision, fp32_matmul_allows_tf32, on_device

MATMUL = torch.backends.cuda.matmul
HAS_NEW_API = hasattr(torch.backends, "fp32_precision")
needs_new_api = pytest.mark.skipif(not HAS_NEW_API, reason=f"torch {torch.__version__} has no fp32_precision API "
                                                           "(added in torch 2.9)")


def _read_legacy():
    try:
        return MATMUL.allow_tf32
    except RuntimeError:  # the new API was used: the legacy flag cannot be read
        return None


@pytest.fixture(autouse=True)
def precision_state():
    """Save and restore every fp32 precision setting this file changes."""
    legacy = _read_legacy()
    new = (torch.backends.fp32_precision, MATMUL.fp32_precision) if HAS_NEW_API else None
    yield
    if legacy is not None:
        MATMUL.allow_tf32 = legacy
    if new is not None:
        torch.backends.fp32_precision, MATMUL.fp32_precision = new
    assert _read_legacy() == legacy  # the legacy flag reads as before (and does not raise)


@pytest.mark.parametrize("allow", [False, True])
def test_legacy_flag(allow):
    MATMUL.allow_tf32 = allow
    assert dot_precision(torch.float32) == ("tf32" if allow else "ieee")
    assert dot_precision(torch.float16) == dot_precision(torch.bfloat16) == "tf32"  # not an fp32 dot


@pytest.mark.parametrize("mode,want", [("highest", "ieee"), ("high", "tf32"), ("medium", "tf32")])
def test_legacy_float32_matmul_precision(mode, want):
    torch.set_float32_matmul_precision(mode)
    assert dot_precision(torch.float32) == want


@needs_new_api
@pytest.mark.parametrize("value,want", [("ieee", "ieee"), ("tf32", "tf32")])
def test_new_matmul_setting(value, want):
    MATMUL.fp32_precision = value
    if value == "tf32":
        with pytest.raises(RuntimeError):  # what broke the old dot_precision
            MATMUL.allow_tf32  # noqa: B018
    assert dot_precision(torch.float32) == want


@needs_new_api
@pytest.mark.parametrize("generic,matmul,want", [
    ("tf32", "none", "tf32"),   # the matmul setting inherits the generic one
    ("ieee", "none", "ieee"),
    ("tf32", "ieee", "ieee"),   # the specific setting wins
    ("ieee", "tf32", "tf32"),
    ("none", "none", "ieee"),   # PyTorch's default
])
def test_new_generic_and_matmul_settings(generic, matmul, want):
    torch.backends.fp32_precision = generic
    MATMUL.fp32_precision = matmul
    assert dot_precision(torch.float32) == want


@needs_new_api
def test_legacy_then_new_api_mixed():
    """A user who set the legacy flag, then the new API: the new API's value counts, nothing raises."""
    MATMUL.allow_tf32 = True
    MATMUL.fp32_precision = "none"
    torch.backends.fp32_precision = "ieee"
    assert dot_precision(torch.float32) == "ieee"
    MATMUL.fp32_precision = "tf32"
    assert dot_precision(torch.float32) == "tf32"


def _fake_backends(matmul):
    """A stand-in for ``torch.backends`` of torch 2.6 - 2.8: no generic ``fp32_precision``."""
    return types.SimpleNamespace(cuda=types.SimpleNamespace(matmul=matmul))


def test_torch_without_the_new_api(monkeypatch):
    """torch 2.6 - 2.8: only ``allow_tf32`` exists."""
    monkeypatch.setattr(_runtime, "_FP32_GETTER", None)
    monkeypatch.setattr(torch, "backends", _fake_backends(types.SimpleNamespace(allow_tf32=True)))
    assert fp32_matmul_allows_tf32() and dot_precision(torch.float32) == "tf32"
    monkeypatch.setattr(torch, "backends", _fake_backends(types.SimpleNamespace(allow_tf32=False)))
    assert dot_precision(torch.float32) == "ieee"


def test_unreadable_settings_mean_ieee(monkeypatch):
    class Broken:
        def __getattr__(self, name):
            raise RuntimeError("mixed legacy and new APIs")

    monkeypatch.setattr(torch, "backends", _fake_backends(Broken()))
    monkeypatch.setattr(_runtime, "_FP32_GETTER", None)
    assert dot_precision(torch.float32) == "ieee"


@needs_new_api
@pytest.mark.parametrize("generic,matmul", [("none", "none"), ("tf32", "none"), ("ieee", "tf32"), ("tf32", "ieee")])
def test_fast_getter_agrees_with_the_public_attributes(monkeypatch, generic, matmul):
    torch.backends.fp32_precision, MATMUL.fp32_precision = generic, matmul
    fast = fp32_matmul_allows_tf32()
    monkeypatch.setattr(_runtime, "_FP32_GETTER", None)
    assert fp32_matmul_allows_tf32() == fast


# -- the device context of the launches --------------------------------------------------------------------
def test_on_device_is_a_no_op_on_cpu(monkeypatch):
    def boom(*a, **k):
        raise AssertionError("torch.cuda.device must not be entered for CPU tensors")

    monkeypatch.setattr(torch.cuda, "device", boom)
    with on_device(torch.empty(1)):
        pass
    assert on_device(torch.empty(1)) is on_device(torch.empty(2))  # one shared no-op: nothing allocated


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_on_device_switches_to_the_tensors_device():
    last = torch.cuda.device_count() - 1
    t = torch.empty(1, device=f"cuda:{last}")
    before = torch.cuda.current_device()
    with on_device(t):
        assert torch.cuda.current_device() == last
    assert torch.cuda.current_device() == before
    assert _runtime.device_index(t) == last


@pytest.mark.parametrize("values, want", [((8,), 8), ((24, 64), 8), ((196, 196 * 64), 4), ((49,), 1), ((0,), 16),
                                          ((), 16), ((32, 48), 16), ((-24,), 8), ((6400, 1), 1)])
def test_alignment_is_the_power_of_two_dividing_every_value(values, want):
    assert _runtime.alignment(*values) == want
    assert all(v % want == 0 for v in values)


def test_view_alignment_per_layout():
    """Positive for NCHW views (HW and the batch and channel strides), negative for channels_last ones (C and the
    batch and pixel strides), 1 where nothing is known; always a power of two dividing what it claims to."""
    nchw = torch.empty(2, 8, 14, 14)
    cl = nchw.to(memory_format=torch.channels_last)
    for t, want in ((nchw, 4), (cl, -8), (cl[:, :4], -4), (nchw[:, :, :7], 2), (torch.empty(2, 8, 7, 7), 1),
                    (torch.empty(2, 8, 1, 1), 1), (torch.empty(2, 64, 8, 8), 16)):
        _, sb, sc, sp = _runtime.bchw_view(t)
        a = _runtime.view_alignment(t.shape[2] * t.shape[3], t.shape[1], sb, sc, sp)
        assert a == want, (tuple(t.shape), t.stride(), a)
        claimed = (t.shape[2] * t.shape[3], sb, sc) if a > 1 else (t.shape[1], sb, sp) if a < -1 else ()
        assert all(v % abs(a) == 0 for v in claimed)
