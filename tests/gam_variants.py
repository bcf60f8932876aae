"""A zoo of GAM blocks as they are written in public code, each with the outcome conversion must give.

Every class below is written for these tests (nothing is copied); its docstring says where the form is
seen. :data:`ZOO` maps a name to a :class:`Variant`: a factory, the channel count it is tested at, and the
expected outcome:

* ``converts``: ``GAM.from_module`` gives a GAM with ``config`` (channel_sigmoid, shuffle_groups, groups,
  rate) computing exactly what the block computes, in eval and in train mode;
* ``refused``: ``GAM.from_module`` raises ValueError whose message contains ``reason``; ``convert`` leaves
  the block alone with a WARNING (``warns``) or silently (a CBAM that merely shares GAM's child names).

Run ``TRITON_INTERPRET=1 python tests/gam_variants.py`` for the forms table (max |difference| against the
float64 source on the PyTorch path and under the Triton interpreter, eval and train).
"""
from __future__ import annotations

import copy
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from gam_cases import randomise
from gam_triton import GAM
from gam_triton.ops import _runtime
from gam_triton.forms import structure
from gam_triton.reference import SEQUENTIAL_PATHS, PaperGAM, SeedGAM, YoloGAM, channel_shuffle


# --- pieces the variants share ---------------------------------------------------------------------------
def _mlp(c: int, cr: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(c, cr), nn.ReLU(inplace=True), nn.Linear(cr, c))


def _conv(cin: int, cout: int, k: int = 7, groups: int = 1, **kw) -> nn.Conv2d:
    kw.setdefault("padding", k // 2)
    return nn.Conv2d(cin, cout, k, groups=groups, **kw)


def _spatial(c: int, cr: int, groups: int = 1, norm=nn.BatchNorm2d, act=nn.ReLU, **conv_kw) -> list:
    return [_conv(c, cr, groups=groups, **conv_kw), norm(cr), act(inplace=True) if act is nn.ReLU else act(),
            _conv(cr, c, groups=groups, **conv_kw), norm(c)]


def _gate(ca: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The channel MLP applied per pixel (the permute the paper calls 3D permutation)."""
    b, c, h, w = x.shape
    return ca(x.permute(0, 2, 3, 1).reshape(b, h * w, c)).view(b, h, w, c).permute(0, 3, 1, 2)


class _Branches(nn.Module):
    """channel_attention + spatial_attention with the paper's (sigmoid, no shuffle) or the YOLO arithmetic."""

    def __init__(self, channel: nn.Module, spatial: nn.Module, yolo: bool = False,
                 spatial_sigmoid_inside: bool = False, channel_sigmoid_inside: bool = False) -> None:
        super().__init__()
        self.channel_attention, self.spatial_attention = channel, spatial
        self.yolo, self.s_in, self.c_in = yolo, spatial_sigmoid_inside, channel_sigmoid_inside

    def forward(self, x):
        a = _gate(self.channel_attention, x)
        x = x * (a if self.yolo or self.c_in else a.sigmoid())
        s = self.spatial_attention(x)
        s = s if self.s_in else s.sigmoid()
        return x * (channel_shuffle(s, 4) if self.yolo else s)


class ConvBN(nn.Module):
    """A conv and its BatchNorm in one module (children ``conv``, ``bn``): repositories that wrap every
    convolution (mmcv-style ConvModule without activation, 'conv_bn' helpers)."""

    def __init__(self, cin: int, cout: int, k: int = 7, groups: int = 1) -> None:
        super().__init__()
        self.conv = _conv(cin, cout, k, groups)
        self.bn = nn.BatchNorm2d(cout)

    def forward(self, x):
        return self.bn(self.conv(x))


class ConvBNAct(nn.Module):
    """ultralytics-style ``Conv``: conv, BatchNorm, SiLU (``act`` an Identity when act=False)."""

    def __init__(self, cin: int, cout: int, k: int = 7, act: bool = True) -> None:
        super().__init__()
        self.conv = _conv(cin, cout, k, bias=False)
        self.bn = nn.BatchNorm2d(cout)
        self.act = nn.SiLU() if act else nn.Identity()

    def forward(self, x):
        return self.act(self.bn(self.conv(x)))


# --- forms that convert -------------------------------------------------------------------------------------
def spatial_sigmoid_paper(c: int) -> nn.Module:
    """Paper arithmetic, the spatial sigmoid built as a sixth ``nn.Sigmoid()`` entry of spatial_attention
    (attention-module collections; YOLOv5/v8 forks that write every op as a layer)."""
    return _Branches(_mlp(c, c // 4), nn.Sequential(*_spatial(c, c // 4), nn.Sigmoid()),
                     spatial_sigmoid_inside=True)


def spatial_sigmoid_yolo(c: int) -> nn.Module:
    """YOLO arithmetic (identity channel gate, grouped convolutions, shuffle 4) with the trailing Sigmoid
    entry (a YOLOv8 fork of GAM_Attention)."""
    return _Branches(_mlp(c, c // 4), nn.Sequential(*_spatial(c, c // 4, groups=4), nn.Sigmoid()), yolo=True,
                     spatial_sigmoid_inside=True)


def channel_sigmoid_entry(c: int) -> nn.Module:
    """Paper arithmetic, the channel sigmoid a fourth entry of channel_attention (segmentation code)."""
    return _Branches(nn.Sequential(*_mlp(c, c // 4), nn.Sigmoid()), nn.Sequential(*_spatial(c, c // 4)),
                     channel_sigmoid_inside=True)


def wrapped_conv_bn(c: int) -> nn.Module:
    """spatial_attention = Sequential(ConvBN, ReLU, ConvBN), paper arithmetic (codebases wrapping conv+BN)."""
    return _Branches(_mlp(c, c // 4), nn.Sequential(ConvBN(c, c // 4), nn.ReLU(inplace=True), ConvBN(c // 4, c)))


def wrapped_sequential_pairs(c: int) -> nn.Module:
    """The wrappers as plain ``nn.Sequential(conv, bn)`` pairs, YOLO arithmetic (a detector fork building
    its layers from a list)."""
    cr = c // 4
    pair = lambda a, b: nn.Sequential(_conv(a, b, groups=4), nn.BatchNorm2d(b))  # noqa: E731
    return _Branches(_mlp(c, cr), nn.Sequential(pair(c, cr), nn.ReLU(), pair(cr, c)), yolo=True)


def named_sequential(c: int) -> nn.Module:
    """spatial_attention an ``nn.Sequential(OrderedDict(conv1=..., bn1=..., relu=..., conv2=..., bn2=...))``,
    paper arithmetic (code naming the Sequential's entries; ``bn1`` is NOT the seed form's second BatchNorm)."""
    layers = _spatial(c, c // 4)
    spatial = nn.Sequential(OrderedDict(zip(("conv1", "bn1", "relu", "conv2", "bn2"), layers)))
    return _Branches(_mlp(c, c // 4), spatial)


def fork_groups4_rate8(c: int) -> nn.Module:
    """A C2f_GAM fork's GAM: rate 8 (hidden width C/8) but convolutions in 4 groups, YOLO arithmetic."""
    cr = c // 8
    return _Branches(_mlp(c, cr), nn.Sequential(*_spatial(c, cr, groups=4)), yolo=True)


def padding_same(c: int) -> nn.Module:
    """Paper arithmetic with ``padding='same'`` (code ported from Keras' ``padding='same'``)."""
    return _Branches(_mlp(c, c // 4), nn.Sequential(*_spatial(c, c // 4, padding="same")))


def padding_tuple(c: int) -> nn.Module:
    """YOLO arithmetic with explicit ``padding=(3, 3)``."""
    return _Branches(_mlp(c, c // 4), nn.Sequential(*_spatial(c, c // 4, groups=4, padding=(3, 3))), yolo=True)


# --- forms that are refused -----------------------------------------------------------------------------------
class DropoutInForward(PaperGAM):
    """The paper's layers, dropout on the spatial map in forward (train mode only): eval matches the paper."""

    def forward(self, x):
        a = _gate(self.channel_attention, x).sigmoid()
        x = x * a
        return x * F.dropout(self.spatial_attention(x).sigmoid(), 0.2, self.training)


def silu_entries(c: int) -> nn.Module:
    """YOLO fork with SiLU in place of the spatial ReLU (the detector's default activation)."""
    return _Branches(_mlp(c, c // 4), nn.Sequential(*_spatial(c, c // 4, groups=4, act=nn.SiLU)), yolo=True)


def ultralytics_conv(c: int) -> nn.Module:
    """YOLOv8 fork building spatial_attention from ultralytics ``Conv`` (conv+BN+SiLU) blocks."""
    cr = c // 4
    return _Branches(_mlp(c, cr), nn.Sequential(ConvBNAct(c, cr), ConvBNAct(cr, c, act=False)), yolo=True)


def replicate_padding(c: int) -> nn.Module:
    """Convolutions with ``padding_mode='replicate'`` (a YOLOv8 GAM variant)."""
    return _Branches(_mlp(c, c // 4), nn.Sequential(*_spatial(c, c // 4, padding_mode="replicate")))


def reflect_padding_yolo(c: int) -> nn.Module:
    """The YOLO arithmetic (grouped, shuffled) with ``padding_mode='reflect'``."""
    return _Branches(_mlp(c, c // 4), nn.Sequential(*_spatial(c, c // 4, groups=4, padding_mode="reflect")),
                     yolo=True)


def mixed_padding(c: int) -> nn.Module:
    """conv1 padded with replicate, conv2 with zeros."""
    layers = _spatial(c, c // 4)
    layers[0] = _conv(c, c // 4, padding_mode="replicate")
    return _Branches(_mlp(c, c // 4), nn.Sequential(*layers))


class FlatReplicateGAM(nn.Module):
    """dengbuqi/GAM_Pytorch ``CAM.py``'s ``GAM(in_channels, out_channels, rate=4)``: every layer a direct
    child (``linear1``, ``relu``, ``linear2``, ``conv1``, ``conv2``, ``norm1``, ``norm2``, ``sigmoid``),
    ``padding_mode='replicate'``, no channel sigmoid."""

    def __init__(self, c: int, rate: int = 4) -> None:
        super().__init__()
        cr = c // rate
        self.linear1, self.relu, self.linear2 = nn.Linear(c, cr), nn.ReLU(inplace=True), nn.Linear(cr, c)
        self.conv1 = _conv(c, cr, padding_mode="replicate")
        self.conv2 = _conv(cr, c, padding_mode="replicate")
        self.norm1, self.norm2, self.sigmoid = nn.BatchNorm2d(cr), nn.BatchNorm2d(c), nn.Sigmoid()

    def forward(self, x):
        x = x * _gate(nn.Sequential(self.linear1, self.relu, self.linear2), x)
        s = self.relu(self.norm1(self.conv1(x)))
        return x * self.sigmoid(self.norm2(self.conv2(s)))


class FlatExtraConvGAM(FlatReplicateGAM):
    """The flat layout with a third convolution among the block's children."""

    def __init__(self, c: int) -> None:
        super().__init__(c)
        self.proj = nn.Conv2d(c, c, 1)

    def forward(self, x):
        return self.proj(super().forward(x))


def instance_norm(c: int) -> nn.Module:
    """InstanceNorm2d in place of BatchNorm2d (segmentation / restoration code, batch size 1)."""
    return _Branches(_mlp(c, c // 4), nn.Sequential(*_spatial(c, c // 4, norm=nn.InstanceNorm2d)))


def extra_conv_entry(c: int) -> nn.Module:
    """A third convolution appended to spatial_attention."""
    return _Branches(_mlp(c, c // 4), nn.Sequential(*_spatial(c, c // 4), _conv(c, c, 1)))


class ExtraConvChild(PaperGAM):
    """The paper's block followed by a 1x1 projection held as another child (a tail)."""

    def __init__(self, c: int) -> None:
        super().__init__(c)
        self.proj = nn.Conv2d(c, c, 1)

    def forward(self, x):
        return self.proj(super().forward(x))


class ProjectionBefore(ExtraConvChild):
    """The same layers, the 1x1 projection run before GAM instead of after it."""

    def forward(self, x):
        return PaperGAM.forward(self, self.proj(x))


class TwoExtraChildren(ExtraConvChild):
    """A projection after GAM and a learnt scale beside it: weights outside GAM's six in two children."""

    def __init__(self, c: int) -> None:
        super().__init__(c)
        self.scale = nn.Conv2d(c, c, 1, groups=c, bias=False)

    def forward(self, x):
        return self.scale(super().forward(x))


def dropout_layer(c: int) -> nn.Module:
    """nn.Dropout between the two Linear layers of the channel MLP."""
    cr = c // 4
    return _Branches(nn.Sequential(nn.Linear(c, cr), nn.ReLU(), nn.Dropout(0.1), nn.Linear(cr, c)),
                     nn.Sequential(*_spatial(c, cr)))


class DoubleSigmoid(nn.Module):
    """Trailing Sigmoid entry AND ``.sigmoid()`` in forward (a copy-paste seen in forks): sigmoid twice."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.channel_attention = _mlp(c, c // 4)
        self.spatial_attention = nn.Sequential(*_spatial(c, c // 4), nn.Sigmoid())

    def forward(self, x):
        x = x * _gate(self.channel_attention, x).sigmoid()
        return x * self.spatial_attention(x).sigmoid()


class ResidualGAM(PaperGAM):
    """The paper's block with a residual connection, out = x + GAM(x)."""

    def forward(self, x):
        return x + super().forward(x)


class ParallelGAM(PaperGAM):
    """Both attentions computed from x and multiplied together (BAM-like parallel arrangement)."""

    def forward(self, x):
        return x * _gate(self.channel_attention, x).sigmoid() * self.spatial_attention(x).sigmoid()


class TanhGate(YoloGAM):
    """GAM's layers with a tanh channel gate."""

    def forward(self, x):
        x = x * torch.tanh(_gate(self.channel_attention, x))
        return x * self.spatial_attention(x).sigmoid()


class _ChannelGate(nn.Module):
    def __init__(self, c: int, r: int = 4) -> None:
        super().__init__()
        self.mlp = nn.Sequential(nn.Conv2d(c, c // r, 1), nn.ReLU(), nn.Conv2d(c // r, c, 1))

    def forward(self, x):
        return torch.sigmoid(self.mlp(F.adaptive_avg_pool2d(x, 1)) + self.mlp(F.adaptive_max_pool2d(x, 1)))


class _SpatialGate(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 1, 7, padding=3)

    def forward(self, x):
        return torch.sigmoid(self.conv(torch.cat([x.mean(1, keepdim=True), x.amax(1, keepdim=True)], 1)))


class CBAM(nn.Module):
    """CBAM (Woo et al. 2018) with children named channel_attention/spatial_attention, as YOLO forks name
    them: not a GAM, and convert must stay silent about it."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.channel_attention = _ChannelGate(c)
        self.spatial_attention = _SpatialGate()

    def forward(self, x):
        x = x * self.channel_attention(x)
        return x * self.spatial_attention(x)


class PooledGAM(nn.Module):
    """A block named GAM with pooled channel attention (``channel_att``) and a one-channel spatial map
    (image-restoration code): not GAM's structure, convert warns."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.channel_att = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Conv2d(c, c // 4, 1), nn.ReLU(),
                                         nn.Conv2d(c // 4, c, 1), nn.Sigmoid())
        self.spatial_att = nn.Sequential(nn.Conv2d(c, 1, 7, padding=3), nn.Sigmoid())

    def forward(self, x):
        x = x * self.channel_att(x)
        return x * self.spatial_att(x)


class FlatGAM(nn.Module):
    """The paper's arithmetic with every layer a direct child (linear1, linear2, conv1, bn1, ...)."""

    def __init__(self, c: int) -> None:
        super().__init__()
        cr = c // 4
        self.linear1, self.linear2 = nn.Linear(c, cr), nn.Linear(cr, c)
        self.conv1, self.bn1 = _conv(c, cr), nn.BatchNorm2d(cr)
        self.conv2, self.bn2 = _conv(cr, c), nn.BatchNorm2d(c)

    def forward(self, x):
        x = x * _gate(nn.Sequential(self.linear1, nn.ReLU(), self.linear2), x).sigmoid()
        return x * torch.sigmoid(self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x))))))


class GAM_SpatialOnly(nn.Module):  # noqa: N801 - the class name matters: it contains "GAM"
    """Only GAM's spatial branch (an encoder's 'GAM_SA' module)."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.spatial_attention = nn.Sequential(*_spatial(c, c // 4))

    def forward(self, x):
        return x * self.spatial_attention(x).sigmoid()


class C2f_GAM(nn.Module):  # noqa: N801
    """A container named after GAM (a C2f block with a GAM inside, YOLOv8 forks): convert searches it and
    converts the GAM inside; it says nothing about the container."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.cv1 = nn.Conv2d(c, c, 1)
        self.m = YoloGAM(c, c, group=True)

    def forward(self, x):
        return self.m(self.cv1(x))


class AdaptiveGAM(nn.Module):
    """A YOLOv8/v11 fork's ``GAMAttention(c1, c2, group=True, rate=4)`` that adapts to narrow inputs: rate
    c1 // 8 up to 32 channels, hidden width at least 8, groups min(4, c1 // 4) where they divide, a channel
    sigmoid, shuffle min(4, C); its two convolutions are direct children as well (``conv1``, ``conv2``: each layer
    registered twice); with c2 != c1 a 1x1 conv + BN + SiLU (``channel_adjust``) follows the gated output."""

    def __init__(self, c1: int, c2: int, group: bool = True, rate: int = 4) -> None:
        super().__init__()
        rate = max(1, c1 // 8) if c1 <= 32 else rate
        hidden = max(8, c1 // rate)
        g = min(4, c1 // 4) if group else 1
        g = g if g and c1 % g == 0 and hidden % g == 0 else 1
        self.channel_attention = _mlp(c1, hidden)
        self.conv1, self.conv2 = _conv(c1, hidden, groups=g), _conv(hidden, c1, groups=g)
        self.spatial_attention = nn.Sequential(self.conv1, nn.BatchNorm2d(hidden), nn.ReLU(inplace=True),
                                               self.conv2, nn.BatchNorm2d(c1))
        self.channel_adjust = ConvBNAct(c1, c2, 1) if c1 != c2 else None

    def forward(self, x):
        x = x * _gate(self.channel_attention, x).sigmoid()
        s = self.spatial_attention(x).sigmoid()
        out = x * (channel_shuffle(s, min(4, x.shape[1])) if x.shape[1] >= 4 else s)
        return out if self.channel_adjust is None else self.channel_adjust(out)


# --- the zoo -----------------------------------------------------------------------------------------------
@dataclass
class Variant:
    make: Callable[[int], nn.Module]
    channels: int
    outcome: str                      # "converts" or "refused"
    config: Optional[tuple] = None    # converts: (channel_sigmoid, shuffle_groups, groups, rate)
    reason: str = ""                  # refused: a fragment of the ValueError's message
    warns: bool = True                # refused: convert logs a WARNING for it
    note: str = field(default="")

    def __post_init__(self):
        if not self.note:
            doc = (getattr(self.make, "__doc__", None) or "").strip()
            self.note = " ".join(doc.split())


ZOO = {
    "yolo_grouped": Variant(lambda c: YoloGAM(c, c, group=True), 16, "converts", (False, 4, 4, 4),
                            note="YOLO GAM_Attention(c1, c2, group=True, rate=4) (YOLOv5/v8/v11 forks)"),
    "yolo_plain": Variant(lambda c: YoloGAM(c, c, group=False), 16, "converts", (False, 4, 1, 4),
                          note="YOLO GAM_Attention with group=False"),
    "paper": Variant(PaperGAM, 20, "converts", (True, None, 1, 4), note="the paper's form (attention collections)"),
    "seed": Variant(lambda c: SeedGAM(c, c), 20, "converts", (False, None, 1, 4),
                    note="the seed blog post's GAM(in_channel, out_channel) with fc1/fc2, conv1/bn/conv2/bn1"),
    "spatial_sigmoid_paper": Variant(spatial_sigmoid_paper, 20, "converts", (True, None, 1, 4)),
    "spatial_sigmoid_yolo": Variant(spatial_sigmoid_yolo, 16, "converts", (False, 4, 4, 4)),
    "channel_sigmoid_entry": Variant(channel_sigmoid_entry, 20, "converts", (True, None, 1, 4)),
    "wrapped_conv_bn": Variant(wrapped_conv_bn, 20, "converts", (True, None, 1, 4)),
    "wrapped_sequential_pairs": Variant(wrapped_sequential_pairs, 16, "converts", (False, 4, 4, 4)),
    "named_sequential": Variant(named_sequential, 20, "converts", (True, None, 1, 4)),
    "fork_groups4_rate8": Variant(fork_groups4_rate8, 64, "converts", (False, 4, 4, 8)),
    "adaptive_narrow": Variant(lambda c: AdaptiveGAM(c, c), 16, "converts", (True, 4, 4, 2),
                               note="AdaptiveGAM at 16 channels (rate 2, hidden 8, groups 4)"),
    "adaptive": Variant(lambda c: AdaptiveGAM(c, c), 64, "converts", (True, 4, 4, 4),
                        note="AdaptiveGAM with c2 == c1 (no channel_adjust)"),
    "padding_same": Variant(padding_same, 20, "converts", (True, None, 1, 4)),
    "padding_tuple": Variant(padding_tuple, 16, "converts", (False, 4, 4, 4)),
    "dropout_in_forward": Variant(DropoutInForward, 20, "refused", reason="train-mode probe"),
    "silu_entries": Variant(silu_entries, 16, "refused", reason="spatial_attention[2] is SiLU, expected ReLU"),
    "ultralytics_conv": Variant(ultralytics_conv, 16, "refused", reason="spatial_attention has 2 entries"),
    "replicate_padding": Variant(replicate_padding, 20, "converts", (True, None, 1, 4)),
    "reflect_padding_yolo": Variant(reflect_padding_yolo, 16, "converts", (False, 4, 4, 4)),
    "flat_replicate": Variant(FlatReplicateGAM, 16, "converts", (False, None, 1, 4)),
    "mixed_padding": Variant(mixed_padding, 20, "refused", reason="padding_mode 'zeros' and conv1 'replicate'"),
    "flat_extra_conv": Variant(FlatExtraConvGAM, 16, "refused", reason="no child channel_attention and spatial"),
    "instance_norm": Variant(instance_norm, 20, "refused",
                             reason="spatial_attention[1] is InstanceNorm2d, expected BatchNorm2d"),
    "extra_conv_entry": Variant(extra_conv_entry, 20, "refused", reason="spatial_attention has 6 entries"),
    "extra_conv_child": Variant(ExtraConvChild, 20, "converts", (True, None, 1, 4)),
    "adaptive_projection": Variant(lambda c: AdaptiveGAM(c, 2 * c), 16, "converts", (True, 4, 4, 2),
                                   note="AdaptiveGAM with c2 != c1: GAM, then a 1x1 conv + BN + SiLU (its tail)"),
    "projection_before": Variant(ProjectionBefore, 20, "refused", reason="computes none of the GAM forms"),
    "two_extra_children": Variant(TwoExtraChildren, 20, "refused",
                                  reason="proj.weight, proj.bias, scale.weight outside GAM's six layers"),
    "dropout_layer": Variant(dropout_layer, 20, "refused", reason="channel_attention has 4 entries"),
    "double_sigmoid": Variant(DoubleSigmoid, 20, "refused", reason="computes none of the GAM forms"),
    "residual": Variant(ResidualGAM, 20, "refused", reason="computes none of the GAM forms"),
    "parallel_branches": Variant(ParallelGAM, 20, "refused", reason="computes none of the GAM forms"),
    "tanh_gate": Variant(lambda c: TanhGate(c, c, group=False), 16, "refused", reason="computes none",
                         note="GAM's layers with a tanh channel gate"),
    "cbam_named_children": Variant(CBAM, 16, "refused", reason="not a GAM block", warns=False),
    "pooled_gam_named": Variant(PooledGAM, 16, "refused", reason="no child channel_attention and spatial"),
    "flat_gam_named": Variant(FlatGAM, 16, "converts", (True, None, 1, 4)),
    "gam_spatial_only": Variant(GAM_SpatialOnly, 16, "refused", reason="no child channel_attention"),
}
CONVERTS = [n for n, v in ZOO.items() if v.outcome == "converts"]
REFUSED = [n for n, v in ZOO.items() if v.outcome == "refused"]


def build(name: str, seed: int = 0) -> nn.Module:
    """The variant ``name`` with random weights and BatchNorm statistics (seeded)."""
    torch.manual_seed(seed)
    return randomise(ZOO[name].make(ZOO[name].channels), seed)


# --- comparing a converted block with its source ----------------------------------------------------------------
def run(module: nn.Module, x: torch.Tensor, gout: torch.Tensor, layer_paths: tuple, tail: Optional[str]) -> dict:
    """Output, grad of x, grads of the six layers' parameters (by Sequential name) and their buffers, and the
    grads and buffers of the tail (the module after GAM, at path ``tail``) if there is one."""
    x = x.detach().clone().requires_grad_(True)
    out = module(x)
    out.backward(gout)
    res = {"out": out.detach(), "grad x": x.grad}
    if tail is not None:
        for n, p in module.get_submodule(tail).named_parameters():
            res[f"grad tail.{n}"] = p.grad
        for n, b in module.get_submodule(tail).named_buffers():
            res[f"tail.{n}"] = b.detach().clone()
    for theirs, ours in zip(layer_paths, SEQUENTIAL_PATHS):
        layer = module.get_submodule(theirs)
        for n, p in layer.named_parameters(recurse=False):
            res[f"grad {ours}.{n}"] = p.grad
        for n, b in layer.named_buffers(recurse=False):
            res[f"{ours}.{n}"] = b.detach().clone()
    return res


def differences(source: nn.Module, dtype: torch.dtype, device: str, mode: str, b: int = 2, h: int = 5,
                w: int = 6) -> dict:
    """{quantity: max |difference|} between ``GAM.from_module(source)`` run in ``dtype`` on ``device`` and the
    float64 source, outputs, gradients (of x and of the six layers' and the tail's parameters, relative to
    max(1, |ref|)) and the six layers' and the tail's buffers after one forward and backward. ``mode``: "eval"
    or "train" (set on the source before the conversion) or "as-is" (the source's own per-layer modes, carried
    by the conversion).
    Which path runs follows dtype, device and ``gam_triton.ops._runtime.INTERPRET`` (float64: PyTorch)."""
    source = copy.deepcopy(source)
    if mode != "as-is":
        source.train(mode == "train")
    ref = copy.deepcopy(source).to(torch.float64)
    gam = GAM.from_module(source).to(device=device, dtype=dtype)
    flags = [(n, m.training) for n, m in zip(SEQUENTIAL_PATHS, gam._layers())]
    assert flags == [(n, source.get_submodule(p).training) for n, p in zip(SEQUENTIAL_PATHS, structure(source).names)]
    assert gam.training == source.training
    found = structure(ref)
    c = found.args["in_channels"]
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(b, c, h, w, generator=gen, dtype=torch.float64)
    with torch.no_grad():  # a tail may change the channel count
        out_shape = copy.deepcopy(ref)(x).shape
    gout = torch.randn(out_shape, generator=gen, dtype=torch.float64)
    want = run(ref, x, gout, found.names, found.tail)
    got = run(gam, x.to(device, dtype), gout.to(device, dtype), SEQUENTIAL_PATHS, getattr(gam, "tail_name", None))
    assert set(got) == set(want), set(got) ^ set(want)
    diffs = {}
    for k, v in want.items():
        g = got[k].detach().to("cpu", torch.float64)
        d = (g - v.double()).abs().max().item() if v.numel() else 0.0
        diffs[k] = d / max(1.0, v.double().abs().max().item()) if k.startswith("grad ") else d
    return diffs


def _freeze_first(m: nn.Module) -> None:
    m.train()
    next(b for b in m.modules() if isinstance(b, nn.BatchNorm2d)).eval()


def _train_second(m: nn.Module) -> None:
    m.eval()
    [b for b in m.modules() if isinstance(b, nn.BatchNorm2d)][1].train()


def _norm_eval(m: nn.Module) -> None:
    m.train()
    for b in m.modules():
        if isinstance(b, nn.BatchNorm2d):
            b.eval()


#: Mode set-ups of detection code, applied to a zoo entry for the table (tests/test_forms.py has them too).
MODE_ROWS = {"norm_eval (block train, both BN eval)": _norm_eval,
             "freeze_bn1 (block train, BN1 eval)": _freeze_first,
             "BN2 training in an eval block": _train_second}


def _table() -> str:
    """The forms table: max over outputs, gradients and buffers of |difference| against the float64 source."""
    def cell(src, mode, path):
        dtype = torch.float64 if path == "torch64" else torch.float32
        keep = _runtime.INTERPRET
        _runtime.INTERPRET = keep and path == "triton"
        try:
            return f"{max(differences(src, dtype, 'cpu', mode).values()):.1e}"
        finally:
            _runtime.INTERPRET = keep

    paths = ("torch64", "torch32", "triton")
    rows = ["| form | where seen | outcome | " + " | ".join(f"{p} {m}" for p in paths for m in ("eval", "train"))
            + " |", "| --- | --- | --- |" + " --- |" * 6]
    for name, v in ZOO.items():
        src = build(name)
        if v.outcome == "converts":
            gam = GAM.from_module(src)
            what = (f"converts: sigmoid={gam.channel_sigmoid}, shuffle={gam.shuffle_groups}, groups={gam.groups}, "
                    f"rate={gam.rate}")
            cells = [cell(src, m, p) for p in paths for m in ("eval", "train")]
        else:
            try:
                GAM.from_module(src)
                what = "CONVERTED (unexpected)"
            except ValueError as e:
                what = f"refused: {e}"
            cells = ["-"] * 6
        rows.append(f"| {name} | {v.note} | {what} | " + " | ".join(cells) + " |")
    for base in ("yolo_grouped", "paper"):
        for label, setup in MODE_ROWS.items():
            src = build(base)
            setup(src)
            block_trains = src.training  # the values go in the block's mode's columns
            cells = [c for p in paths for c in (("-", cell(src, "as-is", p)) if block_trains
                                                 else (cell(src, "as-is", p), "-"))]
            rows.append(f"| {base} + {label} | mmdet/mmyolo norm_eval, freeze_bn() scripts | converts, per-layer "
                        "modes kept | " + " | ".join(cells) + " |")
    return "\n".join(rows)


if __name__ == "__main__":  # the forms table (the script's folder, tests/, is on sys.path: gam_cases imports)
    print(_table())
