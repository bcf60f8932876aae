"""GAM forward (eval mode) against the float64 reference of each public form.

Odd channel counts, H != W, 1x1 maps, batch 0 and 1, both memory layouts, fp32/fp16/bf16. Under
TRITON_INTERPRET=1 the Triton kernels run on the CPU (bf16 dots are upcast to fp32 in the interpreter,
which is why bf16 is correct there); on a GPU the same tests run the compiled kernels.
"""
import pytest
import torch

from gam_cases import FORMS, assert_close, channels_ok, f64, make_input, make_ref
from gam_triton import GAM

SHAPES = [(2, 5, 7), (1, 1, 1), (1, 3, 2), (0, 4, 4)]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


# Grouped convolutions need C and C/4 divisible by 4, so yolo_grouped is tested at C = 48 only.
FORM_CHANNELS = [(form, c) for form in FORMS for c in (20, 24, 48) if channels_ok(form, c)]


@pytest.mark.parametrize("form,c", FORM_CHANNELS)
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_forward_matches_reference_fp32(form, c, channels_last, device):
    ref = make_ref(form, c).eval()
    gam = GAM.from_module(ref).to(device).eval()
    want_mod = f64(ref).eval()
    for b, h, w in SHAPES:
        x = make_input(b, c, h, w, torch.float32, device, channels_last)
        with torch.no_grad():
            got = gam(x)
            want = want_mod(x.cpu().double())
        assert got.shape == x.shape and got.dtype == x.dtype
        assert got.is_contiguous(memory_format=torch.channels_last if channels_last and c > 1
                                 else torch.contiguous_format)
        assert_close(got, want, torch.float32, what=f"{form} C={c} {(b, h, w)}")


@pytest.mark.gpu_check
@pytest.mark.parametrize("form", ["yolo_grouped", "paper", "seed"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_forward_half_dtypes(form, dtype, channels_last, device):
    c = 48
    ref = make_ref(form, c).eval()
    gam = GAM.from_module(ref).to(device=device, dtype=dtype).eval()
    x = make_input(2, c, 6, 5, dtype, device, channels_last)
    with torch.no_grad():
        got = gam(x)
        want = f64(ref).eval()(x.cpu().double())
    assert got.dtype == dtype
    assert_close(got, want, dtype, what=f"{form} {dtype}")


def test_empty_batch_returns_empty(device):
    gam = GAM(24).to(device).eval()
    x = torch.randn(0, 24, 5, 5, device=device)
    out = gam(x)
    assert out.shape == (0, 24, 5, 5) and out.dtype == x.dtype


def test_eval_fold_cache_follows_parameter_changes(device):
    """BN1 is folded into conv1 in eval mode; in-place changes and mode switches must be seen."""
    ref = make_ref("paper", 24).eval()
    gam = GAM.from_module(ref).to(device).eval()
    x = make_input(1, 24, 4, 6, torch.float32, device, False)
    with torch.no_grad():
        before = gam(x)
        gam.spatial_attention[1].running_mean.add_(0.5)
        gam.spatial_attention[0].weight.mul_(1.5)
        after = gam(x)
        ref.spatial_attention[1].running_mean.add_(0.5)
        ref.spatial_attention[0].weight.mul_(1.5)
        want = f64(ref).eval()(x.cpu().double())
    assert not torch.allclose(before, after)
    assert_close(after, want, torch.float32)


def test_non_contiguous_input(device):
    """A sliced input whose H and W cannot be merged is handled (copied), not misread."""
    ref = make_ref("yolo_plain", 24).eval()
    gam = GAM.from_module(ref).to(device).eval()
    big = make_input(2, 24, 9, 11, torch.float32, device, False)
    x = big[:, :, 1:8:2, 2:9]
    with torch.no_grad():
        got = gam(x)
        want = f64(ref).eval()(x.cpu().double())
    assert_close(got, want, torch.float32)


def test_autocast_matches_reference_dtype_and_values(device):
    """Under torch.autocast the output dtype is the reference's, the values agree at that precision."""
    ref = make_ref("yolo_grouped", 32).eval()
    gam = GAM.from_module(ref).to(device).eval()
    ref = ref.to(device)
    x = make_input(2, 32, 5, 4, torch.float32, device, False)
    dtype = torch.bfloat16 if device == "cpu" else torch.float16
    with torch.no_grad(), torch.autocast(device, dtype=dtype):
        got = gam(x)
        want = ref(x)
    assert got.dtype == want.dtype
    exact = f64(ref).eval()(x.cpu().double())
    assert_close(got, exact, dtype, scale=2.0, what="autocast")


def test_eval_constants_are_cached_under_no_grad(device, monkeypatch):
    """Under no_grad the folded convolutions and BN2's scale/shift are computed once, not per forward."""
    import gam_triton.module as module_mod

    calls = {"fold": 0}
    real = module_mod.fold_conv_bn

    def counting(*a, **k):
        calls["fold"] += 1
        return real(*a, **k)

    monkeypatch.setattr(module_mod, "fold_conv_bn", counting)
    gam = GAM(24).to(device).eval()
    x = make_input(1, 24, 3, 3, torch.float32, device, False)
    with torch.no_grad():
        first = gam(x)
        folds = calls["fold"]  # conv1 (and conv2 on the PyTorch path)
        second = gam(x)
    assert folds >= 1 and calls["fold"] == folds and torch.equal(first, second)
    gam(x)  # grad enabled and parameters require grad: recomputed, differentiable
    assert calls["fold"] == 2 * folds
