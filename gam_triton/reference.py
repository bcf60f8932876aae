"""The three forms of GAM found in public code, written in plain PyTorch.

These are the references gam_triton is checked against (tests), timed against (perf sweep) and
converted from (:func:`gam_triton.convert`). They reproduce, layer for layer and name for name, what
users already have in their models (see ``shared/GAM_NOTES.md``):

* :class:`YoloGAM`  - form 1, ``GAM_Attention(c1, c2, group=True, rate=4)`` of the YOLO repositories:
  no sigmoid on the channel branch, grouped 7x7 convolutions, spatial map shuffled in 4 groups.
* :class:`PaperGAM` - form 2, the paper: sigmoid on both branches, no grouping, no shuffle.
* :class:`SeedGAM`  - form 3, the blog post the project was seeded from: children ``fc1``/``fc2`` and
  ``conv1``/``bn``/``conv2``/``bn1``; its channel sigmoid is built but never applied.
* :class:`PlainGAM` - not a public form: the same layers and names as forms 1 and 2 with every option of
  :class:`gam_triton.GAM` (kernel size, grouping, channel sigmoid, shuffle groups); what
  :func:`gam_triton.revert` gives for a configuration no public form has.

Nothing here is fast on purpose: the permutes and separate elementwise passes are what users pay today.
"""
from __future__ import annotations

import torch
from torch import nn

__all__ = ["YoloGAM", "PaperGAM", "SeedGAM", "PlainGAM", "channel_shuffle"]


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
