"""Conversion never changes what a model computes (issue 16): the zoo of public GAM forms (tests/gam_variants.py)
converts exactly or is refused with its reason; per-layer training flags survive convert and revert; the probe
checks eval and train mode at two shapes and leaves the source and the RNG as they were; ``groups``; warnings.

Paths: "torch64" is the PyTorch path (float64 on the CPU); "triton" is fp32 through the Triton kernels (on the
CPU under TRITON_INTERPRET=1, on CUDA where a GPU runs the suite). Everything is compared with the float64
source block: outputs, gradients of the input and of every parameter, and the BatchNorm buffers.
"""
from __future__ import annotations

import copy
import logging
import time

import pytest
import torch
from torch import nn

import gam_variants as gv
from gam_cases import assert_close, f64, make_input, make_ref, randomise
from gam_triton import GAM, convert, revert
from gam_triton.ops import _runtime
from gam_triton import forms, reference
from gam_triton.inspect import attention_maps
from gam_triton.reference import PaperGAM, PlainGAM, YoloGAM

TRITON_RUNS = _runtime.HAS_TRITON and (_runtime.INTERPRET or torch.cuda.is_available())
TOLS = {"torch64": 1e-9, "triton": 2e-4}  # max |difference| (gradients relative to max(1, |reference|))


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """These tensors are tiny: one intra-op thread is faster, and steady on a loaded machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(params=["torch64", "triton"])
def path(request, device):
    """(name, dtype, device) of the path under test."""
    if request.param == "triton":
        if not TRITON_RUNS:
            pytest.skip("the Triton path needs a GPU or TRITON_INTERPRET=1")
        return "triton", torch.float32, device
    return "torch64", torch.float64, "cpu"


def _check(diffs: dict, tol: float, what: str) -> None:
    worst = max(diffs, key=diffs.get)
    assert diffs[worst] <= tol, f"{what}: {worst} differs by {diffs[worst]:.2e} (tolerance {tol:.0e})"


# --- the zoo -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", list(gv.ZOO))
def test_zoo_outcome(name):
    v = gv.ZOO[name]
    src = gv.build(name)
    if v.outcome == "converts":
        gam = GAM.from_module(src)
        assert (gam.channel_sigmoid, gam.shuffle_groups, gam.groups, gam.rate) == v.config
    else:
        with pytest.raises(ValueError) as err:
            GAM.from_module(src)
        assert v.reason in str(err.value)


@pytest.mark.parametrize("mode", ["eval", "train"])
@pytest.mark.parametrize("name", gv.CONVERTS)
def test_zoo_converts_exactly(name, mode, path):
    label, dtype, dev = path
    _check(gv.differences(gv.build(name), dtype, dev, mode), TOLS[label], f"{name} {mode} {label}")


@pytest.mark.parametrize("name", gv.CONVERTS)
def test_zoo_checkpoints_load_strictly(name):
    """A checkpoint of the form (whatever its parameter names) loads into the converted block."""
    src = gv.build(name).eval()
    gam = GAM.from_module(gv.build(name, seed=5)).eval()
    gam.load_state_dict(src.state_dict(), strict=True)
    x = make_input(2, gv.ZOO[name].channels, 5, 6, torch.float64, "cpu", False)
    with torch.no_grad():
        torch.testing.assert_close(gam.double()(x), f64(src)(x), rtol=1e-9, atol=1e-9)


def test_fresh_gam_loads_wrapped_and_seed_checkpoints():
    """A new GAM (not converted) reads the conv/bn-wrapper names and the seed names by default."""
    for name in ("wrapped_conv_bn", "seed"):
        src = gv.build(name).eval()
        gam = GAM(20, channel_sigmoid=name != "seed").eval()
        gam.load_state_dict(src.state_dict(), strict=True)
        x = make_input(2, 20, 4, 3, torch.float64, "cpu", False)
        with torch.no_grad():
            torch.testing.assert_close(gam.double()(x), f64(src)(x), rtol=1e-9, atol=1e-9)


def test_whole_model_checkpoint_loads_after_convert():
    """A detector checkpoint saved before conversion (wrapper names inside a bigger model) loads strictly."""
    model = nn.Sequential(nn.Conv2d(3, 16, 1), gv.build("wrapped_sequential_pairs"), gv.build("spatial_sigmoid_yolo"))
    ckpt = copy.deepcopy(model.state_dict())
    want = f64(model).eval()
    convert(model)
    assert isinstance(model[1], GAM) and isinstance(model[2], GAM)
    randomise(model, 9)
    model.load_state_dict(ckpt, strict=True)
    x = make_input(2, 3, 5, 4, torch.float64, "cpu", False)
    with torch.no_grad():
        torch.testing.assert_close(model.double().eval()(x), want(x), rtol=1e-9, atol=1e-9)


# --- convert's warnings --------------------------------------------------------------------------------------
class Zoo(nn.Module):
    """One of every zoo entry, plus a C2f_GAM container (its GAM converts, the container is not reported)."""

    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleDict({n: gv.build(n) for n in gv.ZOO})
        self.c2f = gv.C2f_GAM(16)


def test_convert_warns_for_every_gam_looking_block_left_alone(caplog):
    model = Zoo()
    with caplog.at_level(logging.INFO, logger="gam_triton"):
        convert(model)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    for name, v in gv.ZOO.items():
        block = model.blocks[name]
        mine = [w for w in warnings if f"left blocks.{name} as it is" in w]
        if v.outcome == "converts":
            assert isinstance(block, GAM) and not mine, name
        else:
            assert not isinstance(block, GAM), name
            assert len(mine) == (1 if v.warns else 0), (name, mine)
            if v.warns:
                assert v.reason in mine[0], (name, mine[0])
    assert isinstance(model.c2f.m, GAM) and not any("left c2f" in w for w in warnings)
    n_warn = sum(v.warns for v in gv.ZOO.values() if v.outcome == "refused")
    assert len(warnings) == n_warn
    assert f"replaced {len(gv.CONVERTS) + 1} GAM block(s), left {n_warn} GAM-looking" in caplog.text


def test_convert_strict_raises_and_replaces_nothing():
    model = nn.Sequential(gv.build("paper"), gv.build("silu_entries"), gv.build("cbam_named_children"))
    before = [type(m) for m in model]
    with pytest.raises(ValueError, match=r"strict=True\): 1 GAM-looking block.*\n  1: .*SiLU"):
        convert(model, strict=True)
    assert [type(m) for m in model] == before
    convert(nn.Sequential(gv.build("paper"), gv.build("cbam_named_children")), strict=True)  # CBAM: silent


# --- per-layer modes ---------------------------------------------------------------------------------------
def _bns(m: nn.Module) -> list:
    return [b for b in m.modules() if isinstance(b, nn.BatchNorm2d)]


MODE_CASES = {  # how detection code leaves the modes of a GAM block
    "norm_eval": lambda m: [b.eval() for b in _bns(m.train())],          # mmdet/mmyolo norm_eval=True
    "freeze_bn1": lambda m: _bns(m.train())[0].eval(),                   # one BatchNorm frozen
    "freeze_bn2": lambda m: _bns(m.train())[1].eval(),
    "bn2_training_in_eval": lambda m: _bns(m.eval())[1].train(),        # one left training in an eval block
}


@pytest.mark.parametrize("case", list(MODE_CASES))
@pytest.mark.parametrize("name", ["yolo_grouped", "paper", "wrapped_conv_bn"])
def test_mixed_modes_are_kept_and_computed(name, case, path):
    label, dtype, dev = path
    src = gv.build(name)
    MODE_CASES[case](src)
    _check(gv.differences(src, dtype, dev, "as-is"), TOLS[label], f"{name} {case} {label}")


@pytest.mark.parametrize("case,conv", [("norm_eval", "auto"), ("norm_eval", "triton"),
                                       ("bn2_training_in_eval", "auto"), ("freeze_bn2", "auto")])
def test_mixed_modes_without_autograd(case, conv, monkeypatch, device):
    """Inference in a mixed state (torch.no_grad): the eval kernels (and the Triton convolutions,
    GAM_TRITON_CONV=triton) where both BatchNorms are frozen in a training block, the final gate on batch
    statistics where one trains; output and statistics."""
    if not TRITON_RUNS:
        pytest.skip("the Triton path needs a GPU or TRITON_INTERPRET=1")
    monkeypatch.setenv("GAM_TRITON_CONV", conv)
    src = gv.build("yolo_grouped")
    MODE_CASES[case](src)
    want = f64(src)
    gam = GAM.from_module(src).to(device)
    shape = (1, 16, 3, 4) if conv == "triton" else (2, 16, 5, 6)  # interpreted Triton convolutions are slow
    for seed in (1, 2)[: 1 if conv == "triton" and _runtime.INTERPRET else 2]:  # the 2nd reads the eval cache
        x = make_input(*shape, torch.float32, device, False, seed=seed)
        with torch.no_grad():
            assert_close(gam(x), want(x.cpu().double()), torch.float32, what=f"{case} call {seed}")
    ours = dict(gam.named_buffers())
    for name, b in want.named_buffers():
        assert_close(ours[name].float(), b, torch.float32, what=name)


def test_freeze_bn_loop_survives_convert_refreeze_and_revert(path):
    """A fine-tuning script: model.train(), then freeze_bn() (every BatchNorm .eval()); convert; two steps; the
    same loop again; the running statistics stay put and the outputs equal the float64 original's."""
    label, dtype, dev = path

    def freeze_bn(model):
        model.train()
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.eval()

    torch.manual_seed(0)
    model = randomise(nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), YoloGAM(16, 16), PaperGAM(16)), 1)
    freeze_bn(model)
    want = f64(model)
    flags = [m.training for m in model.modules() if not isinstance(m, nn.Sequential)]
    convert(model).to(device=dev, dtype=dtype)
    assert all(isinstance(m, GAM) for m in model[1:])
    assert [m.training for m in model[1].modules()] == [m.training for m in want[1].modules()]
    stats = {k: v.clone() for k, v in model.state_dict().items() if "running" in k}
    for step in range(2):
        x = make_input(2, 3, 5, 6, torch.float64, "cpu", False, seed=step)
        got, ref = model(x.to(dev, dtype)), want(x)
        got.square().mean().backward()
        tol = TOLS[label]
        torch.testing.assert_close(got.detach().cpu().double(), ref.detach(), rtol=tol, atol=tol)
        freeze_bn(model)
        freeze_bn(want)
    for k, v in model.state_dict().items():
        if "running" in k:
            assert torch.equal(v, stats[k]), f"{k} moved although its BatchNorm is frozen"
    revert(model)
    assert [m.training for m in model.modules() if not isinstance(m, nn.Sequential)] == flags


def test_revert_keeps_per_layer_modes():
    for name in ("paper", "seed"):
        src = gv.build(name)
        MODE_CASES["norm_eval"](src)
        gam = GAM.from_module(src)
        back = gam.to_reference()
        assert [m.training for m in back.modules()] == [m.training for m in src.modules()], name


def test_from_module_carries_branch_and_layer_flags():
    src = make_ref("yolo_grouped", 16).eval()
    src.channel_attention[2].train()
    src.spatial_attention.train()
    src.spatial_attention[4].eval()
    gam = GAM.from_module(src)
    assert [m.training for m in gam.modules()] == [m.training for m in src.modules()]


# --- the probe ---------------------------------------------------------------------------------------------
class StatsTwice(PaperGAM):
    """Same output as the paper, but in train mode it runs the spatial branch twice (statistics move twice)."""

    def forward(self, x):
        if self.training:
            self.spatial_attention(x)
        return super().forward(x)


class OddWidthDiffers(PaperGAM):
    """The paper's function for even map widths only (the second probe shape, W = 3, tells it apart)."""

    def forward(self, x):
        out = super().forward(x)
        return out if x.shape[3] % 2 == 0 else out.tanh()


class BlockFlagBN(PaperGAM):
    """Normalises with the BLOCK's training flag, ignoring each BatchNorm's own: equal to the paper while all
    flags agree, different once a BatchNorm is frozen inside a training block."""

    def forward(self, x):
        x = x * gv._gate(self.channel_attention, x).sigmoid()
        conv1, bn1, _, conv2, bn2 = self.spatial_attention

        def bn(m, y):
            if self.training:
                m.num_batches_tracked.add_(1)
            return nn.functional.batch_norm(y, m.running_mean, m.running_var, m.weight, m.bias, self.training,
                                            m.momentum, m.eps)
        return x * torch.sigmoid(bn(bn2, conv2(torch.relu(bn(bn1, conv1(x))))))


def test_probe_refuses_different_statistics():
    with pytest.raises(ValueError, match="moves its buffers differently .*train-mode probe.*running_mean"):
        GAM.from_module(randomise(StatsTwice(16)))


def test_probe_uses_the_second_shape():
    with pytest.raises(ValueError, match=r"eval-mode probe at input \(3, 16, 7, 3\)"):
        GAM.from_module(randomise(OddWidthDiffers(16)))


def test_probe_checks_the_blocks_own_mixed_modes():
    src = randomise(BlockFlagBN(16))
    GAM.from_module(src.train())  # flags agree: the paper's function
    GAM.from_module(src.eval())
    MODE_CASES["norm_eval"](src)
    with pytest.raises(ValueError, match="own per-layer-mode probe"):
        GAM.from_module(src)


def _snapshot(m: nn.Module) -> tuple:
    return ({k: v.clone() for k, v in m.state_dict(keep_vars=True).items()},
            [x.training for x in m.modules()], [id(p) for p in m.parameters()])


def test_probe_leaves_source_hooks_and_rng_untouched():
    src = make_ref("paper", 16)
    MODE_CASES["freeze_bn1"](src)
    calls = []
    src.register_forward_hook(lambda *a: calls.append("block"))
    src.spatial_attention[0].register_forward_pre_hook(lambda *a: calls.append("conv1"))
    state, flags, ids = _snapshot(src)
    torch.set_num_threads(2)  # the probe's own one-thread switch must restore this
    rng, threads = torch.get_rng_state(), torch.get_num_threads()
    GAM.from_module(src)
    convert(nn.Sequential(copy.deepcopy(src)))  # a deep copy keeps the hooks: their calls count too
    assert calls == [], "the probe ran the source's hooks"
    assert torch.equal(torch.get_rng_state(), rng), "the global RNG state moved"
    assert torch.get_num_threads() == threads
    torch.set_num_threads(1)
    state2, flags2, ids2 = _snapshot(src)
    assert flags2 == flags and ids2 == ids
    for k, v in state.items():
        assert v.dtype == state2[k].dtype and torch.equal(v, state2[k]), k


def test_probe_cost(capsys):
    """convert on a 20-block model (C = 16..128) stays far below a second or two on a CPU."""
    model = nn.Sequential(*[YoloGAM(c, c) if i % 2 else PaperGAM(c) for i, c in
                            enumerate([16, 32, 64, 128] * 5)])
    start = time.perf_counter()
    convert(model)
    took = time.perf_counter() - start
    assert all(isinstance(m, GAM) for m in model)
    with capsys.disabled():
        print(f"\n[probe cost] convert of 20 GAM blocks (C 16..128): {took * 1e3:.0f} ms, "
              f"{took * 1e3 / 20:.1f} ms per block")
    assert took < 10.0


# --- groups ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs,exc,match", [
    (dict(in_channels=16, group=True, groups=2), ValueError, "disagree"),
    (dict(in_channels=16, group=False, groups=4), ValueError, "disagree"),
    (dict(in_channels=24, groups=4), ValueError, r"groups \(4\) must divide"),
    (dict(in_channels=16, groups=0), ValueError, "groups must be >= 1"),
    (dict(in_channels=16, groups=2.0), TypeError, "groups must be an int"),
])
def test_groups_validation(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        GAM(**kwargs)


def test_groups_and_group_agree():
    assert (GAM(16).group, GAM(16).groups) == (False, 1)
    assert (GAM(16, group=True).group, GAM(16, group=True).groups) == (True, 4)
    assert (GAM(16, groups=4).group, GAM(16, group=True, groups=4).groups) == (True, 4)
    g = GAM(64, rate=8, groups=4)
    assert (g.group, g.groups, g.spatial_attention[0].groups, g.spatial_attention[3].groups) == (False, 4, 4, 4)
    assert "groups=4" in repr(g)


GROUPED = [dict(rate=4, groups=2, channel_sigmoid=True),                            # groups != rate, paper gate
           dict(rate=8, groups=4, channel_sigmoid=False, shuffle_groups=4)]         # the C2f_GAM fork


@pytest.mark.parametrize("mode", ["eval", "train"])
@pytest.mark.parametrize("kwargs", GROUPED, ids=["g2r4", "g4r8"])
def test_groups_on_every_path(kwargs, mode, path):
    """A group count independent of the rate reaches every forward path through the conv layers."""
    label, dtype, dev = path
    c = 32
    plain = randomise(PlainGAM(c, **kwargs), 2)
    assert plain.spatial_attention[0].groups == kwargs["groups"]
    gam = GAM.from_module(plain)
    assert gam.groups == kwargs["groups"] and type(gam.to_reference()) is PlainGAM
    _check(gv.differences(plain, dtype, dev, mode), TOLS[label], f"groups {kwargs} {mode} {label}")


def test_groups_triton_convolutions(monkeypatch, device):
    """GAM_TRITON_CONV=triton: the eval spatial branch as Triton implicit GEMMs with groups != rate (the fork's
    groups 4, rate 8, shuffle 4; one small call, the interpreted convolutions are slow)."""
    if not TRITON_RUNS:
        pytest.skip("the Triton path needs a GPU or TRITON_INTERPRET=1")
    monkeypatch.setenv("GAM_TRITON_CONV", "triton")
    kwargs = GROUPED[1]
    plain = randomise(PlainGAM(32, **kwargs), 3).eval()
    gam = GAM.from_module(plain).to(device).eval()
    x = make_input(1, 32, 3, 4, torch.float32, device, False)
    with torch.no_grad():
        assert_close(gam(x), f64(plain)(x.cpu().double()), torch.float32, what=f"{kwargs}")


def test_groups_revert_and_reconvert():
    gam = randomise(GAM(64, rate=8, groups=4, channel_sigmoid=False, shuffle_groups=4), 4).eval()
    back = gam.to_reference()
    assert type(back) is PlainGAM and back.spatial_attention[0].groups == 4
    assert type(randomise(GAM(16, groups=4, channel_sigmoid=False, shuffle_groups=4)).to_reference()) is YoloGAM
    again = GAM.from_module(back)
    assert (again.rate, again.groups, again.group) == (8, 4, False)
    x = make_input(2, 64, 4, 5, torch.float64, "cpu", False)
    with torch.no_grad():
        torch.testing.assert_close(again.double()(x), f64(gam)(x), rtol=1e-9, atol=1e-9)


# --- inspect ---------------------------------------------------------------------------------------------
def test_attention_maps_of_a_wrapped_form_and_a_training_layer():
    src = gv.build("wrapped_conv_bn").eval()
    x = make_input(2, 20, 5, 6, torch.float32, "cpu", False)
    assert attention_maps(src, x).residual < 1e-5
    src.spatial_attention[0].bn.train()
    with pytest.raises(ValueError, match=r"spatial_attention.0.bn of the module is in train mode"):
        attention_maps(src, x)


def test_structure_reports_the_layer_paths():
    found = forms.structure(gv.build("wrapped_conv_bn"))
    assert found.names == ("channel_attention.0", "channel_attention.2", "spatial_attention.0.conv",
                           "spatial_attention.0.bn", "spatial_attention.2.conv", "spatial_attention.2.bn")
    assert forms.key_table(found.names) == reference.WRAPPED_NAMES
    assert forms.structure(gv.build("seed")).names[0] == "channel_attention.fc1"
    assert forms.key_table(forms.structure(gv.build("seed")).names) == reference.SEED_NAMES
    assert forms.key_table(reference.SEQUENTIAL_PATHS) == {}
