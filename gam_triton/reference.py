"""Everything about GAM in plain PyTorch: the public forms, how a block is recognised, BatchNorm's math.

A leaf module (it imports torch only); :mod:`gam_triton.module` builds on it.

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

Nothing in the forms is fast on purpose: the permutes and separate elementwise passes are what users pay.

Recognising a block (:func:`structure`, :func:`detect_form`): forms 1 and 2 have identical layers, so the
structure gives the weights but not the function. The function is found by experiment: a float64 copy of
the block, with random parameters and statistics (no trained weight can hide a difference), is run on a
probe input and compared with each candidate configuration built from the same copy. The block itself is
never run.

Also here: the channel shuffle and the gated multiply (:func:`shuffle`, :func:`unshuffle`,
:func:`gate_multiply`), BatchNorm2d as a per-channel affine exactly as ``nn.BatchNorm2d`` behaves
(:func:`uses_batch_stats`, :func:`bn_scale_shift`, :func:`fold_conv_bn`), GAM's function in standard ops for
deployment graphs (:func:`plain_forward`), the seed form's checkpoint names (:func:`rename_seed_keys`) and
what a replacement block takes over from the block it replaces (:func:`carry_over`).
"""
from __future__ import annotations

import copy
from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["YoloGAM", "PaperGAM", "SeedGAM", "PlainGAM", "channel_shuffle", "shuffle", "unshuffle",
           "gate_multiply", "uses_batch_stats", "bn_scale_shift", "fold_conv_bn", "plain_forward",
           "SEED_NAMES", "rename_seed_keys", "Structure", "layers", "structure", "detect_form", "HOOK_TABLES",
           "carry_over"]


# --- the public forms ----------------------------------------------------------------------------------------
def channel_shuffle(x: torch.Tensor, groups: int) -> torch.Tensor:
    """Shuffle the channels of a B x C x H x W tensor in ``groups`` groups (the YOLO form's way)."""
    b, c, h, w = x.shape
    out = x.view(b, groups, c // groups, h, w).permute(0, 2, 1, 3, 4).contiguous()
    return out.view(b, c, h, w)


def _sequential_layers(c1: int, c2: int, rate: int, group: bool,
                       kernel_size: int = 7) -> tuple[nn.Sequential, nn.Sequential]:
    cr = c1 // rate
    groups = rate if group else 1
    k = kernel_size
    channel = nn.Sequential(nn.Linear(c1, cr), nn.ReLU(inplace=True), nn.Linear(cr, c1))
    spatial = nn.Sequential(
        nn.Conv2d(c1, cr, kernel_size=k, padding=k // 2, groups=groups),
        nn.BatchNorm2d(cr),
        nn.ReLU(inplace=True),
        nn.Conv2d(cr, c2, kernel_size=k, padding=k // 2, groups=groups),
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

    Same layers and parameter names as forms 1 and 2; ``shuffle_groups`` None or 0 means no shuffle.
    """

    def __init__(self, in_channels: int, rate: int = 4, kernel_size: int = 7, group: bool = False,
                 channel_sigmoid: bool = True, shuffle_groups: int | None = None) -> None:
        super().__init__()
        self.channel_sigmoid = channel_sigmoid
        self.shuffle_groups = shuffle_groups
        self.channel_attention, self.spatial_attention = _sequential_layers(
            in_channels, in_channels, rate, group, kernel_size
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        x_permute = x.permute(0, 2, 3, 1).reshape(b, h * w, c)
        x_att_permute = self.channel_attention(x_permute).view(b, h, w, c)
        x_channel_att = x_att_permute.permute(0, 3, 1, 2)
        if self.channel_sigmoid:
            x_channel_att = x_channel_att.sigmoid()
        x = x * x_channel_att
        x_spatial_att = self.spatial_attention(x).sigmoid()
        if self.shuffle_groups:
            x_spatial_att = channel_shuffle(x_spatial_att, self.shuffle_groups)
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
def _conv_bn(x: torch.Tensor, conv: nn.Conv2d, bn: nn.Module) -> torch.Tensor:
    """bn(conv(x)): folded into one convolution when ``bn`` uses its running statistics."""
    if uses_batch_stats(bn):
        return bn(F.conv2d(x, conv.weight, conv.bias, padding=conv.padding, groups=conv.groups))
    w, b = fold_conv_bn(conv.weight, conv.bias, bn)
    return F.conv2d(x, w, b, padding=conv.padding, groups=conv.groups)


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


# --- the seed form's checkpoint names ------------------------------------------------------------------------
#: Seed-form parameter prefixes and the Sequential forms' names for the same tensors.
SEED_NAMES = {
    "channel_attention.fc1.": "channel_attention.0.",
    "channel_attention.fc2.": "channel_attention.2.",
    "spatial_attention.conv1.": "spatial_attention.0.",
    "spatial_attention.bn.": "spatial_attention.1.",
    "spatial_attention.conv2.": "spatial_attention.3.",
    "spatial_attention.bn1.": "spatial_attention.4.",
}


def rename_seed_keys(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                     error_msgs) -> None:
    """Load-state-dict pre-hook: rename the seed form's parameter names to the Sequential forms', in place."""
    for key in list(state_dict.keys()):
        if not key.startswith(prefix):
            continue
        rest = key[len(prefix):]
        for old, new in SEED_NAMES.items():
            if rest.startswith(old):
                state_dict[prefix + new + rest[len(old):]] = state_dict.pop(key)
                break


# --- recognising a GAM block ---------------------------------------------------------------------------------
class Structure(NamedTuple):
    """What the layers of a GAM-shaped block say: the layers, whether it is the seed form, and the
    :class:`gam_triton.GAM` constructor arguments (in_channels, rate, kernel_size, group)."""

    layers: tuple
    seed: bool
    args: dict


def layers(module: nn.Module) -> Optional[tuple[tuple, bool]]:
    """((fc1, fc2, conv1, bn1, conv2, bn2), seed form?) of a GAM-shaped module, None for anything else."""
    ca = getattr(module, "channel_attention", None)
    sa = getattr(module, "spatial_attention", None)
    if not isinstance(ca, nn.Module) or not isinstance(sa, nn.Module):
        return None
    if isinstance(ca, nn.Sequential) and isinstance(sa, nn.Sequential):
        if len(ca) != 3 or len(sa) != 5:
            return None
        found, seed = (ca[0], ca[2], sa[0], sa[1], sa[3], sa[4]), False
        if not isinstance(ca[1], nn.ReLU) or not isinstance(sa[2], nn.ReLU):
            return None
    else:
        names = [(ca, "fc1"), (ca, "fc2"), (sa, "conv1"), (sa, "bn"), (sa, "conv2"), (sa, "bn1")]
        found, seed = tuple(getattr(parent, n, None) for parent, n in names), True
    kinds = (nn.Linear, nn.Linear, nn.Conv2d, nn.BatchNorm2d, nn.Conv2d, nn.BatchNorm2d)
    if not all(type(m) is k for m, k in zip(found, kinds)):
        return None
    return found, seed


def structure(module: nn.Module) -> Structure:
    """The :class:`Structure` of a GAM block; ValueError naming the mismatch for anything else."""
    found = layers(module)
    if found is None:
        raise ValueError(f"{type(module).__name__} is not a GAM block: expected children channel_attention "
                         "(Linear, ReLU, Linear) and spatial_attention (Conv2d, BatchNorm2d, ReLU, Conv2d, "
                         "BatchNorm2d), or the seed form's fc1/fc2 and conv1/bn/conv2/bn1")
    found_layers, seed = found
    fc1, fc2, conv1, bn1, conv2, bn2 = found_layers
    c, cr = fc1.in_features, fc1.out_features
    k = conv1.kernel_size[0]
    ok = (fc2.in_features == cr and fc2.out_features == c and conv1.in_channels == c
          and conv1.out_channels == cr and conv2.in_channels == cr and conv2.out_channels == c
          and bn1.num_features == cr and bn2.num_features == c and conv1.groups == conv2.groups
          and all(cv.kernel_size == (k, k) and cv.padding == (k // 2, k // 2) and cv.stride == (1, 1)
                  and cv.dilation == (1, 1) and cv.padding_mode == "zeros" for cv in (conv1, conv2)))
    if not ok:
        raise ValueError(f"{type(module).__name__} has GAM's layers but not GAM's shapes (C={c}, C/r={cr}, "
                         f"conv kernel {conv1.kernel_size}, padding {conv1.padding}, groups {conv1.groups}); "
                         "gam_triton supports same-size odd square kernels, stride 1, no dilation")
    groups = conv1.groups
    rate = groups if groups > 1 else max(1, c // cr)
    if c // rate != cr:
        raise ValueError(f"{type(module).__name__}: hidden width {cr} is not in_channels // rate for any "
                         f"rate gam_triton can express (C={c}, groups={groups})")
    return Structure(found_layers, seed, dict(in_channels=c, rate=rate, kernel_size=k, group=groups > 1))


# (channel_sigmoid, shuffle_groups), most common first.
_SEQUENTIAL_FORMS = [(False, 4), (True, None), (False, None), (True, 4)]
_SEED_FORMS = [(False, None), (True, None), (False, 4), (True, 4)]


def _randomise(module: nn.Module, gen: torch.Generator) -> None:
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * 0.5)
        for name, b in module.named_buffers():
            if name.endswith("running_mean"):
                b.copy_(torch.randn(b.shape, generator=gen, dtype=b.dtype) * 0.5)
            elif name.endswith("running_var"):
                b.copy_(torch.rand(b.shape, generator=gen, dtype=b.dtype) + 0.5)


def _without_hooks(module: nn.Module) -> nn.Module:
    """``module`` with every hook table of it and its children emptied (a copy's: the block's own function)."""
    for m in module.modules():
        for table in HOOK_TABLES:
            if getattr(m, table, None):
                object.__setattr__(m, table, type(getattr(m, table))())
    return module


def _candidate(found_layers: tuple, args: dict, sigmoid: bool, shuffle_groups: Optional[int]) -> nn.Module:
    """A :class:`PlainGAM` of this configuration computing with ``found_layers`` themselves."""
    with torch.device("meta"):
        cand = PlainGAM(args["in_channels"], rate=args["rate"], kernel_size=args["kernel_size"],
                        group=args["group"], channel_sigmoid=sigmoid, shuffle_groups=shuffle_groups)
    fc1, fc2, conv1, bn1, conv2, bn2 = found_layers
    cand.channel_attention = nn.Sequential(fc1, nn.ReLU(), fc2)
    cand.spatial_attention = nn.Sequential(conv1, bn1, nn.ReLU(), conv2, bn2)
    return cand


def detect_form(module: nn.Module, found: Optional[Structure] = None) -> tuple[bool, Optional[int]]:
    """(channel_sigmoid, shuffle_groups) of the GAM block ``module``, found by the float64 probe (see the
    module docstring); ValueError when its function is none of the forms gam_triton computes."""
    found = found or structure(module)
    args = found.args
    probe_src = _without_hooks(copy.deepcopy(module)).to(device="cpu", dtype=torch.float64).eval()
    gen = torch.Generator().manual_seed(1234)
    _randomise(probe_src, gen)
    x = torch.randn(2, args["in_channels"], 5, 6, generator=gen, dtype=torch.float64)
    with torch.no_grad():
        try:
            want = probe_src(x)
        except Exception as e:  # the source's own forward failed: nothing to compare against
            raise ValueError(f"{type(module).__name__}: running it on a probe input failed ({e!r})") from e
        if not isinstance(want, torch.Tensor) or want.shape != x.shape:
            raise ValueError(f"{type(module).__name__} returns {getattr(want, 'shape', type(want))} for "
                             f"input {tuple(x.shape)}: not a GAM block")
        probe_layers = structure(probe_src).layers
        for sigmoid, groups in (_SEED_FORMS if found.seed else _SEQUENTIAL_FORMS):
            if groups and args["in_channels"] % groups:
                continue
            got = _candidate(probe_layers, args, sigmoid, groups).eval()(x)
            if torch.allclose(got, want, rtol=1e-9, atol=1e-10):
                return sigmoid, groups
    raise ValueError(f"{type(module).__name__} has GAM's layers but computes none of the GAM forms "
                     "gam_triton implements (channel gate sigmoid or identity, spatial map shuffled in 4 "
                     "groups or not): refusing to convert it into a different function")


# --- what a replacement block takes over -----------------------------------------------------------------
#: Hook tables of nn.Module that move with a layer when a block is replaced. A table the new block does not
#: use itself is shared (the same dict object, so a RemovableHandle the user holds still removes the hook);
#: one the block fills in its own constructor gets the old entries added in front of its own.
HOOK_TABLES = (
    "_forward_hooks", "_forward_hooks_with_kwargs", "_forward_hooks_always_called",
    "_forward_pre_hooks", "_forward_pre_hooks_with_kwargs",
    "_backward_hooks", "_backward_pre_hooks",
    "_state_dict_hooks", "_state_dict_pre_hooks", "_load_state_dict_pre_hooks", "_load_state_dict_post_hooks",
)
_MODULE_INTERNALS = frozenset(vars(nn.Module())) | {"_is_full_backward_hook"}


def _plain_attributes(old: nn.Module, new: nn.Module) -> dict:
    """The instance attributes of ``old`` that a framework or user set on it: not nn.Module's internals,
    not attributes the new block defines itself (its own construction, its class's attributes and properties;
    nn.Module's method names such as ``type`` stay free, as they were on ``old``)."""
    mine = set(vars(new))
    for cls in type(new).__mro__:
        if cls is nn.Module:
            break
        mine.update(vars(cls))
    return {k: v for k, v in vars(old).items() if k not in _MODULE_INTERNALS and k not in mine}


def carry_over(old: nn.Module, new: nn.Module, hooks: bool = True) -> nn.Module:
    """Give ``new`` what ``old`` held beyond its parameters and buffers; return ``new``.

    Copied: the plain instance attributes (by reference, see :func:`_plain_attributes`: ultralytics' ``f``,
    ``i``, ``type``, ``np``, names, pruning or quantisation flags), the training flag and, with ``hooks``,
    every hook table in :data:`HOOK_TABLES` (and whether backward hooks are "full"). Not copied: attributes
    the new block defines itself (``in_channels``, ``rate``, ...), class-level monkeypatches of ``type(old)``,
    and hooks registered globally (``nn.modules.module.register_module_*`` apply to every module anyway).
    """
    if not isinstance(old, nn.Module) or not isinstance(new, nn.Module):
        raise TypeError(f"carry_over expects two nn.Modules, got {type(old).__name__} and {type(new).__name__}")
    for k, v in _plain_attributes(old, new).items():
        object.__setattr__(new, k, v)
    if hooks:
        for table in HOOK_TABLES:
            theirs = getattr(old, table, None)
            if theirs is None:  # older torch without this table
                continue
            own = getattr(new, table)
            if not own:
                object.__setattr__(new, table, theirs)
            elif theirs:
                merged = type(own)(theirs)
                merged.update(own)
                object.__setattr__(new, table, merged)
        if getattr(old, "_is_full_backward_hook", None) is not None:
            new._is_full_backward_hook = old._is_full_backward_hook
    new.train(old.training)
    return new
