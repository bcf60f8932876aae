"""Padding modes other than zeros and the flat layout (dengbuqi/GAM_Pytorch ``CAM.py``: every layer a child of the
block, ``padding_mode='replicate'``): which path runs, revert and convert again, hooks and modes of a flat block,
and the ONNX graph of a replicate-padded GAM in onnxruntime.

Exactness in eval and train mode (outputs, gradients, buffers) on the PyTorch and Triton paths is the zoo of
tests/test_forms.py (``replicate_padding``, ``reflect_padding_yolo``, ``flat_replicate``, ``flat_gam_named``;
refused: ``mixed_padding``, ``flat_extra_conv``); bad ``padding_mode`` values and maps too small for reflect or
circular padding are in tests/test_bad_input.py.
"""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import gam_variants as gv
from gam_cases import assert_close, f64, make_input, onnx_in_onnxruntime, randomise
from gam_triton import GAM, convert, revert
from gam_triton.ops import _runtime, conv, train_block
from gam_triton.forms import structure
from gam_triton.reference import PlainGAM, YoloGAM

TRITON_RUNS = _runtime.HAS_TRITON and (_runtime.INTERPRET or torch.cuda.is_available())


@pytest.fixture
def dev(device) -> str:
    """Where the Triton kernels run (the GPU, or the CPU under TRITON_INTERPRET=1)."""
    if not TRITON_RUNS:
        pytest.skip("the Triton path needs a GPU or TRITON_INTERPRET=1")
    return device


@pytest.mark.gpu_check
@pytest.mark.parametrize("mode", ["zeros", "replicate"])
def test_the_fused_paths_run_for_zero_padding_only(mode, dev, monkeypatch):
    """Replicate padding runs the generic Triton path, its convolutions padded as the layers say; zeros keeps
    the fused eval branch and the fused train block. Both match the float64 PlainGAM."""
    calls = []
    for owner, name in ((conv, "spatial_run"), (train_block, "apply")):
        original = getattr(owner, name)
        monkeypatch.setattr(owner, name, lambda *a, _o=original, _n=name, **k: calls.append(_n) or _o(*a, **k))
    gam = randomise(GAM(16, group=True, channel_sigmoid=False, shuffle_groups=4, padding_mode=mode)).to(dev)
    ref = f64(gam.to_reference())
    assert type(ref) is (PlainGAM if mode == "replicate" else YoloGAM)
    assert ref.spatial_attention[0].padding_mode == mode
    x = make_input(2, 16, 5, 6, torch.float32, dev, False)
    for train in (False, True):
        gam.train(train)
        ref.train(train)
        with torch.no_grad():
            assert_close(gam(x), ref(x.cpu().double()), torch.float32, what=f"{mode} train={train}")
    assert calls == ([] if mode == "replicate" else ["spatial_run", "apply"])
    assert ("padding_mode='replicate'" in repr(gam)) == (mode == "replicate")


def test_revert_and_convert_again_keep_the_padding_mode(dev):
    src = gv.build("flat_replicate").to(dev).eval()
    want = f64(src)
    model = nn.Sequential(src)
    convert(model)
    gam = model[0]
    assert type(gam) is GAM and gam.padding_mode == "replicate"
    revert(model)
    back = model[0]
    assert type(back) is PlainGAM and back.spatial_attention[3].padding_mode == "replicate"
    assert structure(back).args["padding_mode"] == "replicate"
    x = make_input(2, 16, 6, 5, torch.float32, dev, False)
    with torch.no_grad():
        assert_close(model(x), want(x.cpu().double()), torch.float32, what="reverted")
        convert(model)
        assert type(model[0]) is GAM and model[0].padding_mode == "replicate"
        assert_close(model(x), want(x.cpu().double()), torch.float32, what="converted again")


def test_a_flat_block_keeps_its_modes_and_hooks():
    """The flat block's own flag goes to both branches; a frozen BatchNorm stays frozen; hooks on a layer move
    with it (convert), the block's own hooks go to the new block."""
    src = gv.build("flat_replicate").train()
    src.norm1.eval()
    fired = []
    src.conv2.register_forward_hook(lambda m, a, o: fired.append("conv2"))
    src.register_forward_hook(lambda m, a, o: fired.append("block"))
    model = convert(nn.Sequential(src))
    gam = model[0]
    assert gam.training and gam.channel_attention.training and gam.spatial_attention.training
    assert not gam.spatial_attention[1].training and gam.spatial_attention[4].training
    with torch.no_grad():
        model(torch.randn(2, 16, 5, 6))
    assert fired == ["conv2", "block"]


def test_flat_layout_is_read_only_in_blocks_named_gam():
    """Two Linear, two Conv2d and two BatchNorm2d children do not make any module a GAM: only a block whose
    class name says GAM is read as the flat layout (others are not probed, nor warned about)."""
    class Head(gv.FlatReplicateGAM):
        pass

    with pytest.raises(ValueError, match="no child channel_attention and spatial_attention"):
        structure(Head(16))
    model = nn.Sequential(Head(16))
    assert type(convert(model)[0]) is Head


def test_onnx_export_of_replicate_padding_runs_in_onnxruntime(dev):
    ref = gv.build("flat_replicate").eval()
    model = convert(nn.Sequential(copy.deepcopy(ref))).to(dev)
    x = make_input(2, 16, 5, 6, torch.float32, dev, False)
    with torch.no_grad():
        model(x)
    proto, got = onnx_in_onnxruntime(model, x)
    assert any(n.op_type == "Pad" for n in proto.graph.node)
    assert_close(got, f64(ref)(x.cpu().double()), torch.float32, what="onnxruntime vs float64 source")
