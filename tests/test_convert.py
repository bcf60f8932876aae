"""Drop-in behaviour: checkpoints load with strict=True, from_module finds the form by experiment,
convert swaps every GAM of a model without changing its outputs."""
import copy
import logging

import pytest
import torch
from torch import nn

from gam_cases import FORMS, assert_close, make_input, make_ref, randomise
from gam_triton import GAM, convert, revert
from gam_triton.reference import YoloGAM


EXPECTED = {  # form -> (channel_sigmoid, shuffle_groups, group)
    "yolo_grouped": (False, 4, True),
    "yolo_plain": (False, 4, False),
    "paper": (True, None, False),
    "seed": (False, None, False),
}


@pytest.mark.parametrize("form", list(FORMS))
def test_from_module_finds_the_form(form, device):
    ref = make_ref(form, 32).to(device).eval()
    gam = GAM.from_module(ref)
    assert (gam.channel_sigmoid, gam.shuffle_groups, gam.group) == EXPECTED[form]
    assert gam.training is False and gam.channel_attention[0].weight.device.type == device
    x = make_input(2, 32, 4, 5, torch.float32, device, False)
    with torch.no_grad():
        assert_close(gam(x), ref(x), torch.float32)


def test_from_module_keeps_mode_dtype_and_bn_settings(device):
    ref = make_ref("yolo_grouped", 32).to(device=device, dtype=torch.float16).train()
    ref.spatial_attention[1].eps, ref.spatial_attention[4].momentum = 1e-3, 0.03
    gam = GAM.from_module(ref)
    assert gam.training and gam.spatial_attention[0].weight.dtype == torch.float16
    assert gam.spatial_attention[1].eps == 1e-3 and gam.spatial_attention[4].momentum == 0.03


def test_from_module_does_not_touch_source_statistics():
    ref = make_ref("paper", 24).train()
    before = {k: v.clone() for k, v in ref.state_dict().items()}
    GAM.from_module(ref)
    for k, v in ref.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_from_module_handles_missing_biases():
    ref = make_ref("paper", 24).eval()
    ref.spatial_attention[0] = nn.Conv2d(24, 6, 7, padding=3, bias=False)
    randomise(ref, 3)
    gam = GAM.from_module(ref)
    assert gam.spatial_attention[0].bias is None
    x = torch.randn(1, 24, 3, 3)
    with torch.no_grad():
        assert_close(gam(x), ref(x), torch.float32)


class TanhGAM(YoloGAM):
    """GAM's layers, a forward that is none of the forms (tanh gate)."""

    def forward(self, x):
        a = self.channel_attention(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        x = x * torch.tanh(a)
        return x * self.spatial_attention(x).sigmoid()


def test_from_module_refuses_unknown_function():
    with pytest.raises(ValueError, match="computes none of the GAM forms"):
        GAM.from_module(TanhGAM(32, 32, group=False))


@pytest.mark.parametrize("bad", [nn.Linear(3, 3), nn.Sequential(), 42])
def test_from_module_refuses_non_gam(bad):
    with pytest.raises((ValueError, TypeError), match="GAM block|nn.Module"):
        GAM.from_module(bad)


@pytest.mark.parametrize("form", list(FORMS))
def test_state_dict_loads_strictly(form):
    ref = make_ref(form, 32)
    gam = GAM.from_module(make_ref(form, 32, seed=5))
    gam.load_state_dict(ref.state_dict(), strict=True)
    x = torch.randn(2, 32, 3, 4)
    with torch.no_grad():
        assert_close(gam.eval()(x), ref.eval()(x), torch.float32)
    if not form.startswith("seed"):
        assert list(gam.state_dict()) == list(ref.state_dict())


def test_state_dict_with_prefix_and_seed_names_inside_a_model():
    """Seed names are renamed only under the module's own prefix, inside a bigger checkpoint."""
    src = nn.Sequential(nn.Conv2d(3, 24, 1), make_ref("seed", 24))
    dst = nn.Sequential(nn.Conv2d(3, 24, 1), GAM(24, channel_sigmoid=False))
    dst.load_state_dict(src.state_dict(), strict=True)
    x = torch.randn(1, 3, 4, 4)
    with torch.no_grad():
        assert_close(dst.eval()(x), src.eval()(x), torch.float32)


def test_state_dict_strict_still_reports_missing_keys():
    sd = make_ref("paper", 24).state_dict()
    del sd["channel_attention.0.bias"]
    with pytest.raises(RuntimeError, match="Missing key"):
        GAM(24).load_state_dict(sd, strict=True)


class Detector(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 32, 3, padding=1)
        self.p3 = nn.Sequential(YoloGAM(32, 32, group=True), nn.SiLU())
        self.neck = nn.ModuleDict({"a": make_ref("paper", 32), "b": make_ref("seed", 32)})
        self.odd = TanhGAM(32, 32, group=False)

    def forward(self, x):
        x = self.p3(self.stem(x))
        return self.odd(self.neck["b"](self.neck["a"](x)))


def test_convert_model_with_several_gams(caplog, device):
    torch.manual_seed(0)
    model = randomise(Detector(), 2).to(device).eval()
    original = copy.deepcopy(model)
    x = make_input(2, 3, 6, 5, torch.float32, device, False)
    with caplog.at_level(logging.INFO, logger="gam_triton"):
        out_model = convert(model)
    assert out_model is model
    assert isinstance(model.p3[0], GAM) and isinstance(model.neck["a"], GAM) and isinstance(model.neck["b"], GAM)
    assert isinstance(model.odd, TanhGAM), "a block of no known form is left alone"
    assert "replaced 3 GAM" in caplog.text and "left odd as it is" in caplog.text
    warning = next(r for r in caplog.records if r.levelno == logging.WARNING)
    assert "TanhGAM has GAM's layers but computes none of the GAM forms" in warning.getMessage()
    with torch.no_grad():
        assert_close(model(x), original(x), torch.float32)


def test_convert_rejects_non_module():
    with pytest.raises(TypeError, match="nn.Module"):
        convert("model")


def test_convert_keeps_each_layers_mode_and_revert_gives_it_back():
    """mmdet-style norm_eval: the model trains, every BatchNorm is frozen; convert and revert keep that."""
    model = randomise(Detector(), 2).train()
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.eval()
    flags = [(type(m).__name__, m.training) for m in model.modules() if isinstance(m, (nn.BatchNorm2d, nn.Linear))]
    convert(model)
    assert isinstance(model.p3[0], GAM) and model.p3[0].training
    assert [m.training for m in model.p3[0].spatial_attention] == [True, False, True, True, False]
    assert [(type(m).__name__, m.training) for m in model.modules()
            if isinstance(m, (nn.BatchNorm2d, nn.Linear))] == flags
    revert(model)
    assert [(type(m).__name__, m.training) for m in model.modules()
            if isinstance(m, (nn.BatchNorm2d, nn.Linear))] == flags


@pytest.mark.parametrize("built_in_inference_mode", [False, True])
def test_convert_and_revert_inside_inference_mode(built_in_inference_mode):
    """ultralytics' predictor and validator run in torch.inference_mode; a callback converting there gets the
    same blocks, even for a model whose tensors were made in inference mode (no version counters)."""
    model = randomise(Detector(), 2).eval()
    original = copy.deepcopy(model)
    if built_in_inference_mode:
        with torch.inference_mode():
            model = copy.deepcopy(model)
        assert all(p.is_inference() for p in model.parameters())
    x = make_input(2, 3, 6, 5, torch.float32, "cpu", False)
    with torch.inference_mode():
        convert(model)
        assert isinstance(model.p3[0], GAM) and isinstance(model.neck["a"], GAM)
        assert_close(model(x), original(x), torch.float32)
        revert(model)
        assert not any(isinstance(m, GAM) for m in model.modules())
        assert_close(model(x), original(x), torch.float32)
