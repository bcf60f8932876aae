"""GAM in train mode: outputs, gradients of the input and of every parameter, and the BatchNorm running
statistics, against the float64 reference, for each form, both layouts and the kernel dtypes."""
import pytest
import torch

from gam_cases import FORMS, assert_close, channels_ok, f64, make_input, make_ref
from gam_triton import GAM


def _run(module, x, gout):
    x = x.detach().clone().requires_grad_(True)
    out = module(x)
    out.backward(gout)
    grads = {n: p.grad for n, p in module.named_parameters()}
    return out, x.grad, grads


def _canonical(name: str) -> str:
    """Seed parameter names -> the Sequential names our GAM uses."""
    for old, new in (("fc1", "0"), ("fc2", "2"), ("conv1", "0"), ("bn1", "4"), ("bn", "1"), ("conv2", "3")):
        name = name.replace(f".{old}.", f".{new}.")
    return name


@pytest.mark.gpu_check
@pytest.mark.parametrize("form", list(FORMS))
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_train_outputs_grads_and_running_stats(form, channels_last, dtype, device):
    c = 48 if form == "yolo_grouped" else 24
    assert channels_ok(form, c)
    ref = make_ref(form, c).train()
    gam = GAM.from_module(ref).to(device=device, dtype=dtype).train()
    want_mod = f64(ref).train()
    x = make_input(2, c, 5, 3, dtype, device, channels_last)
    gout = make_input(2, c, 5, 3, dtype, device, channels_last, seed=7)
    got, gx, gp = _run(gam, x, gout)
    want, wx, wp = _run(want_mod, x.cpu().double(), gout.cpu().double())
    scale = 1.0 if dtype == torch.float32 else 2.0
    assert_close(got, want, dtype, scale, "output")
    assert_close(gx, wx, dtype, 5 * scale, "grad x")
    assert set(gp) == {_canonical(n) for n in wp}
    for name, g in wp.items():
        ref_norm = max(g.abs().max().item(), 1.0)  # grads sum over pixels: relative when large
        assert_close(gp[_canonical(name)] / ref_norm, g / ref_norm, dtype, 5 * scale, f"grad {name}")
    ours = dict(gam.named_buffers())
    for name, buf in want_mod.named_buffers():
        assert_close(ours[_canonical(name)].float(), buf, torch.float32 if dtype == torch.float32 else dtype,
                     what=f"buffer {name}")


def test_train_momentum_none_and_eps_are_honoured(device):
    ref = make_ref("paper", 20).train()
    for bn in (ref.spatial_attention[1], ref.spatial_attention[4]):
        bn.momentum, bn.eps = None, 1e-3
    gam = GAM.from_module(ref).to(device).train()
    want_mod = f64(ref).train()
    for seed in (1, 2):
        x = make_input(2, 20, 4, 4, torch.float32, device, False, seed=seed)
        got = gam(x)
        want = want_mod(x.cpu().double())
        assert_close(got, want, torch.float32)
    for (name, a), (_, b) in zip(gam.named_buffers(), want_mod.named_buffers()):
        assert_close(a.double(), b, torch.float32, what=name)
    assert int(gam.spatial_attention[1].num_batches_tracked) == 2


def test_train_single_value_per_channel_raises(device):
    gam = GAM(20).to(device).train()
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        gam(torch.randn(1, 20, 1, 1, device=device))


def test_eval_mode_gradients_flow(device):
    """Eval mode with grad enabled (fine-tuning with frozen BN): gradients match the reference."""
    ref = make_ref("yolo_grouped", 32).eval()
    gam = GAM.from_module(ref).to(device).eval()
    want_mod = f64(ref).eval()
    x = make_input(1, 32, 4, 5, torch.float32, device, True)
    gout = make_input(1, 32, 4, 5, torch.float32, device, True, seed=3)
    got, gx, gp = _run(gam, x, gout)
    want, wx, wp = _run(want_mod, x.cpu().double(), gout.cpu().double())
    assert_close(got, want, torch.float32)
    assert_close(gx, wx, torch.float32, 5)
    for name, g in wp.items():
        n = max(g.abs().max().item(), 1.0)
        assert_close(gp[name] / n, g / n, torch.float32, 5, name)
