"""A GAM block with a module after GAM, its tail (a fork's adaptive ``GAMAttention(c1, c2)`` with c2 != c1 and
its ``channel_adjust``, a 1x1 Conv + BN + SiLU to c2 channels): convert gives a :class:`gam_triton.TailedGAM`
holding the very tail, revert a ``PlainTailedGAM``; checkpoints, copies, pickles, hooks on the tail, the
attention maps, ``bench``'s model without GAM and both ONNX exporters' graphs.

Exactness in eval and train mode (outputs, gradients of the input, of the six layers and of the tail, buffers)
on the PyTorch and Triton paths is tests/test_forms.py's zoo (``adaptive_projection``, ``extra_conv_child``);
the forms the tail rule still refuses are there too (``projection_before``, ``two_extra_children``).
"""
from __future__ import annotations

import copy
import pickle

import pytest
import torch
from torch import nn

import gam_variants as gv
from gam_cases import assert_close, f64, make_input, onnx_in_onnxruntime, randomise
from gam_triton import GAM, TailedGAM, bench, convert, revert
from gam_triton.inspect import attention_maps
from gam_triton.ops import _runtime
from gam_triton.forms import structure
from gam_triton.reference import PlainTailedGAM

TRITON_RUNS = _runtime.HAS_TRITON and (_runtime.INTERPRET or torch.cuda.is_available())


def make_net(seed: int = 0) -> nn.Module:
    """Stem conv to 16 channels, the adaptive block from 16 to 32, head conv; eval."""
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), gv.AdaptiveGAM(16, 32), nn.Conv2d(32, 4, 1))
    return randomise(net, seed).eval()


@pytest.fixture
def dev(device) -> str:
    """Where the Triton kernels run (the GPU, or the CPU under TRITON_INTERPRET=1)."""
    if not TRITON_RUNS:
        pytest.skip("the Triton path needs a GPU or TRITON_INTERPRET=1")
    return device


def test_convert_holds_the_very_tail_and_its_hooks_fire(dev):
    net = make_net().to(dev)
    want = f64(net)
    tail = net[1].channel_adjust
    calls = []
    tail.register_forward_hook(lambda m, a, o: calls.append(tuple(o.shape)))
    convert(net)
    gam = net[1]
    assert type(gam) is TailedGAM and gam.tail_name == "channel_adjust" and gam.channel_adjust is tail
    assert "tail_name='channel_adjust'" in repr(gam)
    x = make_input(2, 3, 5, 6, torch.float32, dev, False)
    with torch.no_grad():
        got = net(x)
    assert calls == [(2, 32, 5, 6)]
    assert_close(got, want(x.cpu().double()), torch.float32, what="converted net vs float64 source")


def test_gam_hooks_path_is_not_taken_for_a_hook_on_the_tail(dev):
    """A hook on the tail (outside GAM's two branches) leaves the fused kernels running."""
    gam = GAM.from_module(gv.build("adaptive_projection")).to(dev).eval()
    gam.channel_adjust.register_forward_hook(lambda *a: None)
    assert gam._hooked_layer() is None
    gam.spatial_attention[0].register_forward_hook(lambda *a: None)
    assert gam._hooked_layer() == "spatial_attention.0"


def test_revert_gives_the_plain_tailed_form_and_convert_comes_back(dev):
    net = make_net().to(dev)
    want = f64(net)
    keys = list(net.state_dict())
    convert(net)
    params = list(net[1].parameters())
    revert(net)
    back = net[1]
    assert type(back) is PlainTailedGAM and back.tail_name == "channel_adjust"
    assert all(p is q for p, q in zip(back.parameters(), params)), "revert shares the layers and the tail"
    assert structure(back).tail == "channel_adjust"
    assert [k for k in keys if ".conv1." not in k and ".conv2." not in k] == list(net.state_dict()), \
        "the source's keys, without its aliases of the two convolutions"
    x = make_input(2, 3, 5, 6, torch.float32, dev, False)
    with torch.no_grad():
        assert_close(net(x), want(x.cpu().double()), torch.float32, what="reverted vs source")
        convert(net)
        assert type(net[1]) is TailedGAM
        assert_close(net(x), want(x.cpu().double()), torch.float32, what="converted again vs source")


def test_checkpoints_copies_and_pickles():
    """The source's checkpoint (with its aliases) loads strictly; deepcopy and a pickled whole module (what
    ultralytics saves) keep the tail and compute the same."""
    src = gv.build("adaptive_projection").eval()
    gam = GAM.from_module(gv.build("adaptive_projection", seed=5)).eval()
    gam.load_state_dict(src.state_dict(), strict=True)
    x = make_input(2, 16, 5, 6, torch.float32, "cpu", False)
    with torch.no_grad():
        want = src(x)
        for other in (copy.deepcopy(gam), pickle.loads(pickle.dumps(gam))):
            assert type(other) is TailedGAM and other.tail_name == "channel_adjust"
            assert other.channel_adjust is not gam.channel_adjust
            torch.testing.assert_close(other(x), want, rtol=1e-5, atol=1e-5)


def test_from_module_copies_the_tail_without_its_hooks():
    src = gv.build("adaptive_projection")
    src.channel_adjust.register_forward_hook(lambda *a: None)
    gam = GAM.from_module(src)
    assert gam.channel_adjust is not src.channel_adjust and not gam.channel_adjust._forward_hooks
    assert src.channel_adjust._forward_hooks, "the source keeps its hook"
    assert type(TailedGAM.from_module(gv.build("adaptive"))) is GAM, "no tail: a plain GAM"


@pytest.mark.parametrize("kwargs,exc,match", [
    (dict(tail="conv"), TypeError, "tail must be an nn.Module"),
    (dict(tail=nn.Identity(), tail_name=3), TypeError, "tail_name must be a str"),
    (dict(tail=nn.Identity(), tail_name="rate"), ValueError, "'rate' is not a free attribute name"),
    (dict(tail=nn.Identity(), tail_name="spatial_attention"), ValueError, "not a free attribute name"),
    (dict(tail=nn.Identity(), tail_name="1x1"), ValueError, "not a free attribute name"),
])
def test_constructor_rejects_bad_tails(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        TailedGAM(16, **kwargs)


def test_a_tailed_gam_built_directly():
    gam = randomise(TailedGAM(16, nn.Conv2d(16, 8, 1), group=True, channel_sigmoid=False, shuffle_groups=4))
    gam = gam.double().eval()
    assert gam.tail_name == "tail" and "tail.weight" in gam.state_dict() and gam.out_channels is None
    x = make_input(2, 16, 5, 6, torch.float64, "cpu", False)
    with torch.no_grad():
        want = gam.tail(GAM.forward(gam, x))
        assert want.shape == (2, 8, 5, 6)
        torch.testing.assert_close(gam(x), want)
        torch.testing.assert_close(gam.to_reference()(x), want)


def test_attention_maps_apply_the_tail(dev):
    src = gv.build("adaptive_projection").eval()
    x = make_input(2, 16, 5, 6, torch.float32, "cpu", False)
    maps = attention_maps(src, x)
    assert maps.out.shape == (2, 32, 5, 6) and maps.residual < 1e-5
    maps = attention_maps(GAM.from_module(src).to(dev), x.to(dev))
    assert maps.residual < 1e-4


def test_bench_without_gam_keeps_the_tail():
    net = make_net()
    paths = bench.gam_paths(convert(copy.deepcopy(net)))
    assert paths == ["1"]
    for model in (net, convert(copy.deepcopy(net))):
        rest = bench.without(model, paths)
        assert type(rest[1]) is gv.ConvBNAct
        x = make_input(2, 3, 5, 6, torch.float32, "cpu", False)
        with torch.no_grad():
            assert rest(x).shape == (2, 4, 5, 6)


def test_onnx_export_runs_in_onnxruntime(dev):
    ref = make_net()
    model = convert(copy.deepcopy(ref)).to(dev)
    x = make_input(2, 3, 5, 6, torch.float32, dev, False)
    with torch.no_grad():
        model(x)
    _, got = onnx_in_onnxruntime(model, x)
    assert_close(got, f64(ref)(x.cpu().double()), torch.float32, what="onnxruntime vs float64 source")


def test_compiles_in_one_graph(dev):
    """torch.compile(fullgraph=True) traces GAM's custom ops and the tail's modules together (aot_eager: the
    tracing, not Inductor's code generation, is what a tail could break)."""
    src = gv.build("adaptive_projection").eval()
    gam = GAM.from_module(src).to(dev).eval()
    compiled = torch.compile(gam, fullgraph=True, dynamic=False, backend="aot_eager")
    x = make_input(2, 16, 5, 6, torch.float32, dev, False)
    with torch.no_grad():
        assert_close(compiled(x), f64(src)(x.cpu().double()), torch.float32, what="compiled vs source")
