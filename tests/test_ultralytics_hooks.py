"""Hooks on a GAM's inner layers fire: while one is registered the block calls its layers (the public forms'
arithmetic, train-mode BatchNorm statistics included) and says so once; thop counts the block as the
unconverted one. No ultralytics needed (thop is ultralytics-thop, skipped where it is missing)."""
import copy
import logging

import pytest
import torch

import gam_triton
from gam_triton import module as gam_module
from gam_triton.reference import PaperGAM, YoloGAM

FORMS = {"yolo": lambda c: YoloGAM(c, c), "paper": lambda c: PaperGAM(c)}


def _pair(form: str, train: bool, device: str):
    torch.manual_seed(0)
    src = FORMS[form](32).to(device).train(train)
    for bn in (src.spatial_attention[1], src.spatial_attention[4]):  # statistics that are not the defaults
        bn.running_mean.uniform_(-0.5, 0.5)
        bn.running_var.uniform_(0.5, 2.0)
    ref = copy.deepcopy(src)
    return gam_triton.GAM.from_module(src), ref


@pytest.mark.parametrize("form", sorted(FORMS))
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
# A full backward hook on a layer followed by the forms' in-place ReLU (channel_attention.0, spatial_attention.1)
# fails in the public forms themselves (autograd refuses in-place ops on a hook's view): forward hooks there.
@pytest.mark.parametrize("where,backward", [("channel_attention.0", False), ("channel_attention.2", True),
                                            ("spatial_attention.1", False), ("spatial_attention.3", True),
                                            ("spatial_attention", True)])
def test_inner_layer_hooks_fire_with_the_source_numbers(form, train, where, backward, device, monkeypatch, caplog):
    monkeypatch.setattr(gam_module, "_layers_notice_given", False)
    gam, ref = _pair(form, train, device)
    layer = gam.get_submodule(where)
    calls = []
    handles = [layer.register_forward_pre_hook(lambda m, a: calls.append("pre")),
               layer.register_forward_hook(lambda m, a, o: calls.append("fwd"))]
    if backward:
        handles.append(layer.register_full_backward_hook(lambda m, gi, go: calls.append("bwd")))
    x = torch.randn(2, 32, 5, 6, device=device, requires_grad=True)
    xr = x.detach().clone().requires_grad_()
    with caplog.at_level(logging.WARNING, logger="gam_triton"):
        out = gam(x)
        gam(x.detach())
    ref_out = ref(xr)
    assert calls.count("pre") == 2 and calls.count("fwd") == 2, calls
    notices = [r for r in caplog.records if "carries hooks" in r.getMessage()]
    assert len(notices) == 1 and where in notices[0].getMessage(), "said once, naming the layer"
    torch.testing.assert_close(out, ref_out, rtol=1e-5, atol=1e-5)
    out.square().sum().backward()
    ref_out.square().sum().backward()
    assert ("bwd" in calls) == backward
    torch.testing.assert_close(x.grad, xr.grad, rtol=1e-4, atol=1e-5)
    for p, q in zip(gam.parameters(), ref.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-5)
    # gam ran twice (the second call without grad), ref once: one more update of ref gives the same statistics
    ref(xr.detach())
    for name in ("spatial_attention.1", "spatial_attention.4"):
        a, b = gam.get_submodule(name), ref.get_submodule(name)
        torch.testing.assert_close(a.running_mean, b.running_mean)
        torch.testing.assert_close(a.running_var, b.running_var)
    for h in handles:
        h.remove()
    assert gam._plan(x).path != "layers", "without hooks the block runs its fused path again"


def test_convert_moves_inner_layer_hooks_and_their_handles_still_work(device):
    gam, ref = _pair("yolo", False, device)
    src = copy.deepcopy(ref)
    seen = []
    handle = src.channel_attention[2].register_forward_hook(lambda m, a, o: seen.append(o.shape[-1]))
    model = gam_triton.convert(torch.nn.Sequential(src))
    assert isinstance(model[0], gam_triton.GAM)
    x = torch.randn(1, 32, 3, 4, device=device)
    torch.testing.assert_close(model(x), ref(x), rtol=1e-5, atol=1e-5)
    assert seen == [32], "the hook on the source's layer moved to the converted block's layer and fired"
    handle.remove()
    assert model[0]._plan(x).path != "layers"


def test_a_global_module_hook_sees_every_layer(device):
    gam, _ = _pair("paper", False, device)
    seen = []
    handle = torch.nn.modules.module.register_module_forward_hook(lambda m, a, o: seen.append(type(m).__name__))
    try:
        gam(torch.randn(1, 32, 3, 4, device=device))
    finally:
        handle.remove()
    assert seen.count("Conv2d") == 2 and seen.count("Linear") == 2 and seen.count("BatchNorm2d") == 2, seen


@pytest.mark.parametrize("form", sorted(FORMS))
def test_thop_counts_the_fused_block_as_the_source_block(form):
    thop = pytest.importorskip("thop", reason="thop (ultralytics-thop) is not installed")
    gam, ref = _pair(form, False, "cpu")
    x = torch.randn(1, 32, 20, 20)
    ops_ref, params_ref = thop.profile(ref, inputs=(x,), verbose=False)
    ops, params = thop.profile(gam, inputs=(x,), verbose=False)
    assert ops_ref > 0 and ops == ops_ref and params == params_ref
    assert not gam.channel_attention[0]._forward_hooks, "thop removed its hooks: the fused path again"
