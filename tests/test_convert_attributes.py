"""convert() in detector code: the new block keeps what a framework attached to the old layer (issue 12).

The model below builds its layers the way ultralytics' yaml parser does: an ``nn.Sequential`` of layers that
carry ``f`` (where the input comes from), ``i`` (index), ``type`` and ``np``, and a forward that routes
inputs by ``m.f`` and saves outputs by ``m.i``. One layer is a public-form GAM with hooks on it.
"""
import copy

import pytest
import torch
from torch import nn

from gam_cases import assert_close, make_input, randomise
from gam_triton import GAM, convert
from gam_triton.reference import YoloGAM


class Concat(nn.Module):
    def forward(self, xs):
        return torch.cat(xs, 1)


class YamlModel(nn.Module):
    """Layers routed by ``m.f`` / saved by ``m.i``, as ultralytics' BaseModel._predict_once does."""

    def __init__(self, c: int = 32):
        super().__init__()
        layers = [(nn.Conv2d(3, c, 3, padding=1), -1), (YoloGAM(c, c, group=True), -1),
                  (nn.Conv2d(c, c, 1), -1), (Concat(), [-1, 1]), (nn.Conv2d(2 * c, 4, 1), -1)]
        self.save = {1}
        mods = []
        for i, (m, f) in enumerate(layers):
            m.f, m.i, m.type = f, i, f"{type(m).__module__}.{type(m).__name__}"
            m.np = sum(p.numel() for p in m.parameters())
            mods.append(m)
        self.model = nn.Sequential(*mods)

    def forward(self, x):
        y = []
        for m in self.model:
            if m.f != -1:
                x = y[m.f] if isinstance(m.f, int) else [x if j == -1 else y[j] for j in m.f]
            x = m(x)
            y.append(x if m.i in self.save else None)
        return x


def _model(device):
    torch.manual_seed(0)
    return randomise(YamlModel(), 4).to(device).eval()


def test_convert_keeps_yaml_attributes_hooks_and_names(device):
    model = _model(device)
    ref = copy.deepcopy(model)
    fired = {"pre": 0, "fwd": 0}

    def pre_hook(mod, args):
        fired["pre"] += 1

    def fwd_hook(mod, args, out):
        fired["fwd"] += 1
        return out * 2  # a hook that changes the output must keep doing so

    model.model[1].register_forward_pre_hook(pre_hook)
    handle = model.model[1].register_forward_hook(fwd_hook)
    ref.model[1].register_forward_hook(lambda m, a, o: o * 2)
    names_before = [n for n, _ in model.named_modules()]
    old = model.model[1]
    convert(model)
    gam = model.model[1]
    assert isinstance(gam, GAM) and gam is not old
    assert (gam.f, gam.i, gam.np) == (-1, 1, old.np) and gam.type == old.type
    assert [n for n, _ in model.named_modules()][:3] == names_before[:3]
    assert "model.1" in dict(model.named_modules())
    x = make_input(2, 3, 6, 5, torch.float32, device, False)
    with torch.no_grad():
        assert_close(model(x), ref(x), torch.float32, what="converted model")
    assert fired == {"pre": 1, "fwd": 1}
    handle.remove()  # the user's handle still removes the hook from the converted block
    with torch.no_grad():
        model(x)
    assert fired == {"pre": 2, "fwd": 1}


def test_convert_shares_parameters_so_an_existing_optimizer_trains_the_new_block(device):
    model = _model(device).train()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    old_w = model.model[1].channel_attention[0].weight
    convert(model)
    new = model.model[1]
    assert new.channel_attention[0].weight is old_w
    assert new.spatial_attention[1].running_mean is not None
    before = old_w.detach().clone()
    x = make_input(2, 3, 6, 5, torch.float32, device, False)
    model(x).square().mean().backward()
    opt.step()
    assert not torch.equal(new.channel_attention[0].weight.detach(), before)


def test_convert_keeps_state_dict_hooks_and_training_flag():
    model = _model("cpu").train()
    seen = []
    model.model[1]._register_state_dict_hook(lambda mod, sd, prefix, local: seen.append(prefix))
    model.model[1].custom_flag = {"prune": True}
    convert(model)
    assert model.model[1].training and model.model[1].custom_flag == {"prune": True}
    keys = model.state_dict().keys()
    assert seen == ["model.1."] and "model.1.channel_attention.0.weight" in keys


def test_convert_keeps_per_layer_training_flags_in_a_yaml_model():
    """A frozen BatchNorm inside a training model stays frozen after convert (not reset by the block's flag)."""
    model = _model("cpu").train()
    model.model[1].spatial_attention[4].eval()  # e.g. a fine-tuning script's freeze_bn() on one layer
    model.model[1].channel_attention.eval()     # and a branch set to eval by hand
    before = [m.training for m in model.model[1].modules()]
    convert(model)
    assert isinstance(model.model[1], GAM)
    assert [m.training for m in model.model[1].modules()] == before


def test_from_module_copies_attributes_but_not_hooks():
    src = randomise(YoloGAM(32, 32), 1)
    src.f, src.i = -1, 7
    src.register_forward_hook(lambda m, a, o: o * 0)
    gam = GAM.from_module(src)
    assert (gam.f, gam.i) == (-1, 7)
    assert not gam._forward_hooks, "from_module leaves the hooks on the source block"
    assert gam.channel_attention[0].weight is not src.channel_attention[0].weight
    assert gam.in_channels == 32 and gam.rate == 4, "the block's own attributes are its own"


@pytest.mark.parametrize("old, new", [(1, "gam"), ("gam", None)])
def test_carry_over_rejects_non_modules(old, new):
    from gam_triton.forms import carry_over

    gam = GAM(8)
    with pytest.raises(TypeError, match="two nn.Modules"):
        carry_over(gam if old == "gam" else old, gam if new == "gam" else new)
