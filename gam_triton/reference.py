"""Everything about GAM in plain PyTorch: the public forms, the shuffle, BatchNorm's math, GAM's function in
standard ops.

A leaf module (it imports torch only); :mod:`gam_triton.forms` (reading other blocks) and
:mod:`gam_triton.module` build on it.

The forms found in public code (``shared/GAM_NOTES.md``), layer for layer and name for name as users have
them; they are the references gam_triton is checked against (tests), timed against (perf) and converted
from (:func:`gam_triton.convert`):

* :class:`YoloGAM`  - form 1, ``GAM_Attention(c1, c2, group=True, rate=4)`` of the YOLO repositories:
  no sigmoid on the channel branch, grouped 7x7 convolutions, spatial map shuffled in 4 groups.
* :class:`PaperGAM` - form 2, the paper: sigmoid on both branches, no grouping, no shuffle.
* :class:`SeedGAM`  - form 3, the blog post the project was seeded from: children ``fc1``/``fc2`` and
  ``conv1``/``bn``/``conv2``/``bn1``; its channel sigmoid is built but never applied.
* :class:`PlainGAM` - not a public form: the same layers and names as forms 1 and 2 with every option of
  :class:`gam_triton.GAM`; what :func:`gam_triton.revert` gives for a configuration no public form has.
  :class:`PlainTailedGAM` is PlainGAM followed by another module (a block's tail, see
  :class:`gam_triton.forms.Structure`).

Nothing in the forms is fast on purpose: the permutes and separate elementwise passes are what users pay.

Also here: the channel shuffle and the gated multiply (:func:`shuffle`, :func:`unshuffle`,
:func:`gate_multiply`), BatchNorm2d as a per-channel affine exactly as ``nn.BatchNorm2d`` behaves
(:func:`uses_batch_stats`, :func:`bn_scale_shift`, :func:`fold_conv_bn`), the convolutions' padding modes
(:data:`PADDING_MODES`, :func:`min_map_size`, :func:`conv_like`), GAM's function in standard ops for
deployment graphs (:func:`plain_forward`, :func:`layer_forward`) and the other forms' checkpoint names
(:data:`KEY_PREFIXES`, :func:`rename_seed_keys`, :class:`KeyMap`: load-state-dict hooks every GAM holds, so
pickled models refer to them here).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["YoloGAM", "PaperGAM", "SeedGAM", "PlainGAM", "PlainTailedGAM", "channel_shuffle", "shuffle", "unshuffle",
           "gate_multiply", "uses_batch_stats", "bn_scale_shift", "fold_conv_bn", "PADDING_MODES", "min_map_size",
           "conv_like", "plain_forward", "layer_forward", "SEQUENTIAL_PATHS", "SEED_NAMES", "WRAPPED_NAMES",
           "KEY_PREFIXES", "rename_keys", "rename_seed_keys", "KeyMap"]


# --- the public forms ----------------------------------------------------------------------------------------
def channel_shuffle(x: torch.Tensor, groups: int) -> torch.Tensor:
    """Shuffle the channels of a B x C x H x W tensor in ``groups`` groups (the YOLO form's way)."""
    b, c, h, w = x.shape
    out = x.view(b, groups, c // groups, h, w).permute(0, 2, 1, 3, 4).contiguous()
    return out.view(b, c, h, w)


def _sequential_layers(c1: int, c2: int, rate: int, group: bool, kernel_size: int = 7,
                       groups: Optional[int] = None,
                       padding_mode: str = "zeros") -> tuple[nn.Sequential, nn.Sequential]:
    cr = c1 // rate
    if groups is None:
        groups = rate if group else 1
    k = kernel_size
    channel = nn.Sequential(nn.Linear(c1, cr), nn.ReLU(inplace=True), nn.Linear(cr, c1))
    spatial = nn.Sequential(
        nn.Conv2d(c1, cr, kernel_size=k, padding=k // 2, groups=groups, padding_mode=padding_mode),
        nn.BatchNorm2d(cr),
        nn.ReLU(inplace=True),
        nn.Conv2d(cr, c2, kernel_size=k, padding=k // 2, groups=groups, padding_mode=padding_mode),
        nn.BatchNorm2d(c2),
    )
    return channel, spatial


class YoloGAM(nn.Module):
    """Form 1: the YOLO repositories' ``GAM_Attention``; identity channel gate, shuffled spatial map."""

    def __init__(self, c1: int, c2: int, group: bool = True, rate: int = 4) -> None:
        super().__init__()
        self.channel_attention, self.spatial_attention = _sequential_layers(c1, c2, rate, group)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        x_permute = x.permute(0, 2, 3, 1).reshape(b, h * w, c)
        x_att_permute = self.channel_attention(x_permute).view(b, h, w, c)
        x_channel_att = x_att_permute.permute(0, 3, 1, 2)
        x = x * x_channel_att
        x_spatial_att = self.spatial_attention(x).sigmoid()
        x_spatial_att = channel_shuffle(x_spatial_att, 4)
        return x * x_spatial_att


class PaperGAM(nn.Module):
    """Form 2: the paper's GAM; sigmoid on both branches, plain convolutions, no shuffle."""

    def __init__(self, in_channels: int, out_channels: int | None = None, rate: int = 4) -> None:
        super().__init__()
        out_channels = in_channels if out_channels is None else out_channels
        self.channel_attention, self.spatial_attention = _sequential_layers(
            in_channels, out_channels, rate, False
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        x_permute = x.permute(0, 2, 3, 1).reshape(b, h * w, c)
        x_att_permute = self.channel_attention(x_permute).view(b, h, w, c)
        x_channel_att = x_att_permute.permute(0, 3, 1, 2).sigmoid()
        x = x * x_channel_att
        x_spatial_att = self.spatial_attention(x).sigmoid()
        return x * x_spatial_att


class _SeedChannelAttention(nn.Module):
    def __init__(self, in_channel: int, out_channel: int, ratio: int = 4) -> None:
        super().__init__()
        self.fc1 = nn.Linear(in_channel, in_channel // ratio)
        self.relu = nn.ReLU()
        self.fc2 = nn.Linear(in_channel // ratio, in_channel)
        self.sig = nn.Sigmoid()  # built, never applied: that is the seed's behaviour

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        inp = x.permute(0, 3, 2, 1)
        out = self.fc2(self.relu(self.fc1(inp)))
        return out.permute(0, 3, 2, 1) * x


class _SeedSpatial(nn.Module):
    def __init__(self, in_channel: int, out_channel: int, ratio: int, kernel_size: int = 7) -> None:
        super().__init__()
        padding = kernel_size // 2
        self.conv1 = nn.Conv2d(in_channel, in_channel // ratio, kernel_size=7, padding=padding)
        self.bn = nn.BatchNorm2d(in_channel // ratio)
        self.act = nn.ReLU()
        self.conv2 = nn.Conv2d(in_channel // ratio, in_channel, kernel_size=kernel_size, padding=padding)
        self.bn1 = nn.BatchNorm2d(in_channel)
        self.sig = nn.Sigmoid()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        conv1 = self.act(self.bn(self.conv1(x)))
        conv2 = self.bn1(self.conv2(conv1))
        return x * self.sig(conv2)


class SeedGAM(nn.Module):
    """Form 3: the seed document's ``GAM(in_channel, out_channel, ratio=4, kernel_size=7)``."""

    def __init__(self, in_channel: int, out_channel: int, ratio: int = 4, kernel_size: int = 7) -> None:
        super().__init__()
        self.channel_attention = _SeedChannelAttention(in_channel, out_channel, ratio)
        self.spatial_attention = _SeedSpatial(in_channel, out_channel, ratio, kernel_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.spatial_attention(self.channel_attention(x))


class PlainGAM(nn.Module):
    """Every configuration of :class:`gam_triton.GAM` in plain PyTorch (forms 1 and 2 are special cases).

    Same layers and parameter names as forms 1 and 2; ``shuffle_groups`` None or 0 means no shuffle;
    ``groups`` (the convolutions' group count, any divisor of C and C/r) overrides ``group`` (groups = rate);
    ``padding_mode`` is both convolutions' (``nn.Conv2d``'s: zeros, replicate, reflect, circular).
    """

    def __init__(self, in_channels: int, rate: int = 4, kernel_size: int = 7, group: bool = False,
                 channel_sigmoid: bool = True, shuffle_groups: int | None = None,
                 groups: int | None = None, padding_mode: str = "zeros") -> None:
        super().__init__()
        self.channel_sigmoid = channel_sigmoid
        self.shuffle_groups = shuffle_groups
        self.channel_attention, self.spatial_attention = _sequential_layers(
            in_channels, in_channels, rate, group, kernel_size, groups, padding_mode
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return layer_forward(self.channel_attention, self.spatial_attention, self.channel_sigmoid,
                             self.shuffle_groups, x)


class PlainTailedGAM(PlainGAM):
    """:class:`PlainGAM` whose output then runs through one more module, its tail, registered under
    ``tail_name``: what :func:`gam_triton.revert` gives for a :class:`gam_triton.TailedGAM` (a fork's adaptive
    ``GAMAttention(c1, c2)`` with c2 != c1 holds its 1x1 Conv + BN + SiLU as ``channel_adjust``)."""

    def __init__(self, in_channels: int, tail: nn.Module, tail_name: str = "tail", **kwargs) -> None:
        super().__init__(in_channels, **kwargs)
        self.tail_name = tail_name
        self.add_module(tail_name, tail)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._modules[self.tail_name](super().forward(x))


def layer_forward(channel_attention: nn.Module, spatial_attention: nn.Module, channel_sigmoid: bool,
                  shuffle_groups: Optional[int], x: torch.Tensor) -> torch.Tensor:
    """GAM's function calling its two branches as modules, as forms 1 and 2 do (``PlainGAM``'s forward, and
    :class:`gam_triton.GAM`'s while hooks sit on its inner layers): every layer's hooks fire, thop counts each
    layer, BatchNorm normalises and moves its statistics itself."""
    b, c, h, w = x.shape
    x_permute = x.permute(0, 2, 3, 1).reshape(b, h * w, c)
    x_att_permute = channel_attention(x_permute).view(b, h, w, c)
    x_channel_att = x_att_permute.permute(0, 3, 1, 2)
    if channel_sigmoid:
        x_channel_att = x_channel_att.sigmoid()
    x = x * x_channel_att
    x_spatial_att = spatial_attention(x).sigmoid()
    if shuffle_groups:
        x_spatial_att = channel_shuffle(x_spatial_att, shuffle_groups)
    return x * x_spatial_att


# --- shuffle and the gated multiply --------------------------------------------------------------------------
def shuffle(t: torch.Tensor, groups: int) -> torch.Tensor:
    """The YOLO form's channel shuffle: out[:, c] = t[:, (c % G) * (C // G) + c // G]; 0 or None: none."""
    if not groups:
        return t
    b, c, h, w = t.shape
    return t.reshape(b, groups, c // groups, h, w).transpose(1, 2).reshape(b, c, h, w)


def unshuffle(t: torch.Tensor, groups: int) -> torch.Tensor:
    """Inverse of :func:`shuffle`."""
    if not groups:
        return t
    b, c, h, w = t.shape
    return t.reshape(b, c // groups, groups, h, w).transpose(1, 2).reshape(b, c, h, w)


def gate_multiply(x1: torch.Tensor, s: torch.Tensor, groups: int) -> torch.Tensor:
    """x1 * shuffle(s, groups), the shuffle taken as a strided view of s rather than a copy."""
    if not groups:
        return x1 * s
    b, c, h, w = x1.shape
    s_view = s.view(b, groups, c // groups, h, w).transpose(1, 2)  # [b, c/G, G, h, w], no copy
    return (x1.view(b, c // groups, groups, h, w) * s_view).reshape(b, c, h, w)


# --- BatchNorm2d as a per-channel affine ---------------------------------------------------------------------
def uses_batch_stats(bn: nn.Module) -> bool:
    """True when ``bn`` normalises with the statistics of the batch (as nn.BatchNorm2d decides)."""
    return bn.training or bn.running_mean is None or bn.running_var is None


def _stat_dtype(y: torch.Tensor) -> torch.dtype:
    return torch.float64 if y.dtype == torch.float64 else torch.float32


def bn_scale_shift(bn: nn.BatchNorm2d, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel (scale, shift) with bn(y) == scale * y + shift, in fp32 (fp64 for fp64 ``y``).

    From the running statistics in eval mode; from the batch statistics in train mode (or when ``bn`` tracks
    none), updating the running ones as ``nn.BatchNorm2d`` does (momentum or cumulative average, unbiased
    variance, ``num_batches_tracked``). Differentiable through the batch statistics.
    """
    acc = _stat_dtype(y)
    if uses_batch_stats(bn):
        n = y.shape[0] * y.shape[2] * y.shape[3]
        if bn.training and n <= 1:
            raise ValueError(f"Expected more than 1 value per channel when training, got input size "
                             f"{tuple(y.shape)}")
        var, mean = torch.var_mean(y.to(acc), dim=(0, 2, 3), correction=0)
        if bn.training and bn.track_running_stats and bn.running_mean is not None:
            _update_running_stats(bn, mean.detach(), var.detach(), n)
    else:
        mean, var = bn.running_mean.to(acc), bn.running_var.to(acc)
    return _affine(bn, mean, var)


def _affine(bn: nn.BatchNorm2d, mean: torch.Tensor, var: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    scale = torch.rsqrt(var + bn.eps)
    if bn.weight is not None:
        scale = scale * bn.weight.to(mean.dtype)
    shift = -mean * scale
    if bn.bias is not None:
        shift = shift + bn.bias.to(mean.dtype)
    return scale, shift


@torch.no_grad()
def _update_running_stats(bn: nn.BatchNorm2d, mean: torch.Tensor, var: torch.Tensor, n: int) -> None:
    bn.num_batches_tracked.add_(1)
    factor = 1.0 / float(bn.num_batches_tracked) if bn.momentum is None else bn.momentum
    unbiased = var * (n / (n - 1))
    bn.running_mean.mul_(1 - factor).add_(mean.to(bn.running_mean.dtype), alpha=factor)
    bn.running_var.mul_(1 - factor).add_(unbiased.to(bn.running_var.dtype), alpha=factor)


def fold_conv_bn(weight: torch.Tensor, bias: Optional[torch.Tensor],
                 bn: nn.BatchNorm2d) -> tuple[torch.Tensor, torch.Tensor]:
    """Weight and bias of the convolution equal to ``bn(conv(x))`` with running statistics."""
    acc = torch.float64 if weight.dtype == torch.float64 else torch.float32
    scale, shift = _affine(bn, bn.running_mean.to(acc), bn.running_var.to(acc))
    w = weight.to(acc) * scale.view(-1, 1, 1, 1)
    b = shift if bias is None else bias.to(acc) * scale + shift
    return w.to(weight.dtype), b.to(weight.dtype)


# --- GAM's function in standard ops (deployment graphs) --------------------------------------------------
#: ``nn.Conv2d``'s padding modes; GAM's convolutions take any of them (both the same).
PADDING_MODES = ("zeros", "reflect", "replicate", "circular")


def min_map_size(padding_mode: str, kernel_size: int) -> int:
    """The smallest H and W the convolutions take: reflect padding needs more rows than it pads, circular as
    many (``F.pad``'s rules), zeros and replicate any."""
    pad = kernel_size // 2
    return {"reflect": pad + 1, "circular": pad}.get(padding_mode, 1)


def conv_like(conv: nn.Conv2d, x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    """``F.conv2d`` of ``x`` with ``weight`` and ``bias`` (the layer's own, or with a BatchNorm folded in) and
    ``conv``'s padding, padding mode and groups: a padding mode other than zeros pads first (``F.pad``, as
    ``nn.Conv2d`` does), then convolves unpadded. ``conv.padding`` is a pair of ints (GAM's layers)."""
    if conv.padding_mode == "zeros":
        return F.conv2d(x, weight, bias, padding=conv.padding, groups=conv.groups)
    ph, pw = conv.padding
    return F.conv2d(F.pad(x, (pw, pw, ph, ph), mode=conv.padding_mode), weight, bias, groups=conv.groups)


def _conv_bn(x: torch.Tensor, conv: nn.Conv2d, bn: nn.Module) -> torch.Tensor:
    """bn(conv(x)): folded into one convolution when ``bn`` uses its running statistics."""
    if uses_batch_stats(bn):
        return bn(conv_like(conv, x, conv.weight, conv.bias))
    w, b = fold_conv_bn(conv.weight, conv.bias, bn)
    return conv_like(conv, x, w, b)


def plain_forward(gam_layers: tuple, channel_sigmoid: bool, shuffle_groups: Optional[int],
                  x: torch.Tensor) -> torch.Tensor:
    """GAM's function in standard aten ops, written for the graphs deployment tools fuse well.

    ``gam_layers`` = (fc1, fc2, conv1, bn1, conv2, bn2). The channel MLP runs as two 1x1 convolutions; a
    BatchNorm on running statistics is folded into its 7x7 convolution (no BatchNormalization node), one on
    batch statistics runs as the module itself (running statistics update, ``nn.SyncBatchNorm`` synchronises
    exactly as in the reference); the YOLO shuffle is reshape/transpose/reshape with the batch left free
    (-1) for dynamic-batch export. Reads no cache: two traces of one module give the same graph.
    """
    fc1, fc2, conv1, bn1, conv2, bn2 = gam_layers
    c, cr = fc1.in_features, fc1.out_features
    hid = torch.relu(F.conv2d(x, fc1.weight.reshape(cr, c, 1, 1), fc1.bias))
    a = F.conv2d(hid, fc2.weight.reshape(c, cr, 1, 1), fc2.bias)
    x1 = x * (torch.sigmoid(a) if channel_sigmoid else a)
    z1 = torch.relu(_conv_bn(x1, conv1, bn1))
    s = torch.sigmoid(_conv_bn(z1, conv2, bn2))
    g = shuffle_groups
    if g:  # out[:, c] = s[:, (c % G) * (C / G) + c // G]
        h, w = s.shape[2], s.shape[3]
        s = s.reshape(-1, g, c // g, h, w).transpose(1, 2).reshape(-1, c, h, w)
    return x1 * s


# --- checkpoint names of the other forms ---------------------------------------------------------------------
#: Where the six layers (fc1, fc2, conv1, bn1, conv2, bn2) sit in the Sequential forms and in gam_triton.GAM.
SEQUENTIAL_PATHS = ("channel_attention.0", "channel_attention.2", "spatial_attention.0", "spatial_attention.1",
                    "spatial_attention.3", "spatial_attention.4")

#: Seed-form parameter prefixes and the Sequential forms' names for the same tensors.
SEED_NAMES = {
    "channel_attention.fc1.": "channel_attention.0.",
    "channel_attention.fc2.": "channel_attention.2.",
    "spatial_attention.conv1.": "spatial_attention.0.",
    "spatial_attention.bn.": "spatial_attention.1.",
    "spatial_attention.conv2.": "spatial_attention.3.",
    "spatial_attention.bn1.": "spatial_attention.4.",
}

#: The conv+BatchNorm wrapper form (``spatial_attention = Sequential(ConvBN, ReLU, ConvBN)``) with the
#: wrappers' children called ``conv`` and ``bn``; wrappers naming them otherwise get their own table when
#: converted (:attr:`gam_triton.forms.Structure.names`).
WRAPPED_NAMES = {
    "spatial_attention.0.conv.": "spatial_attention.0.",
    "spatial_attention.0.bn.": "spatial_attention.1.",
    "spatial_attention.2.conv.": "spatial_attention.3.",
    "spatial_attention.2.bn.": "spatial_attention.4.",
}

#: Form -> {its checkpoint prefix: the Sequential forms' prefix}. Forms not listed (the trailing-Sigmoid
#: Sequentials) have the Sequential forms' names already.
KEY_PREFIXES = {"seed": SEED_NAMES, "wrapped": WRAPPED_NAMES}


def rename_keys(table: dict, state_dict, prefix: str) -> None:
    """Rename, in place, the keys of ``state_dict`` under ``prefix`` that start with a prefix of ``table``
    (the longest that matches) to ``table``'s name for it. Keys outside ``prefix`` are left alone."""
    for key in list(state_dict.keys()):
        if not key.startswith(prefix):
            continue
        rest = key[len(prefix):]
        old = max((o for o in table if rest.startswith(o)), key=len, default=None)
        if old is not None:
            state_dict[prefix + table[old] + rest[len(old):]] = state_dict.pop(key)


def rename_seed_keys(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                     error_msgs) -> None:
    """Load-state-dict pre-hook: rename the seed form's parameter names to the Sequential forms', in place."""
    rename_keys(SEED_NAMES, state_dict, prefix)


class KeyMap:
    """Load-state-dict pre-hook renaming another form's checkpoint prefixes (``table``: {theirs: ours}) to the
    Sequential forms' names, as :func:`rename_seed_keys` does for the seed form; picklable."""

    def __init__(self, table: dict) -> None:
        self.table = dict(table)

    def __call__(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                 error_msgs) -> None:
        rename_keys(self.table, state_dict, prefix)

    def __repr__(self) -> str:
        return f"KeyMap({self.table!r})"
