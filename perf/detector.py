"""A small detector-like network for the model-level figure of ``perf/gpu_check.py``: plain PyTorch, no new
dependency, the size of YOLOv8n with the GAM blocks where the tutorials put them.

What a user measures is a whole detector, not one block, so this is a YOLOv8n-shaped stand-in (not a
trainable detector: no loss, no box decoding; the timings only need its layers):

* backbone: Conv-BN-SiLU stems with stride 2 and C2f stages at the YOLOv8n widths 16 / 32 / 64 / 128 / 256
  (depths 1, 2, 2, 1), then SPPF: P3 (stride 8), P4 (stride 16), P5 (stride 32);
* neck: the YOLOv8 FPN + PAN (upsample, concatenate, C2f; stride-2 Conv, concatenate, C2f), outputs of
  64 / 128 / 256 channels at P3 / P4 / P5 (80x80, 40x40, 20x20 at a 640 input);
* GAM: one ``gam_triton.reference.YoloGAM`` (the YOLO repositories' ``GAM_Attention(c1, c2)``, grouped,
  rate 4) on each of the three neck outputs, right before the head: where the "add GAM to YOLOv8"
  tutorials insert it (after the P3/P4/P5 C2f layers, i.e. layers 15, 18 and 21 of yolov8.yaml);
* head: YOLOv8's decoupled Detect branches per level (box: two 3x3 Conv + 1x1 to 4 x 16 DFL bins;
  class: two 3x3 Conv + 1x1 to 80 classes).

    model = Detector()                      # YOLOv8n-sized, GAMs after P3/P4/P5
    fast = gam_triton.convert(copy.deepcopy(model))
    bare = without_gam(model)               # the same network with the GAMs replaced by nn.Identity

``without_gam`` is what the share of the model's time spent in the GAM blocks is measured against:
share = 1 - t(bare) / t(model).
"""
from __future__ import annotations

import copy
from typing import Sequence

import torch
from torch import nn

from gam_triton.reference import YoloGAM

#: YOLOv8n: width multiple 0.25 of (64, 128, 256, 512, 1024) capped at 1024 * 0.25; depth multiple 0.33 of
#: the C2f repeats (3, 6, 6, 3).
WIDTHS = (16, 32, 64, 128, 256)
DEPTHS = (1, 2, 2, 1)
NUM_CLASSES = 80
REG_MAX = 16


class Conv(nn.Module):
    """Conv2d (no bias) + BatchNorm2d + SiLU, ultralytics' ``Conv``."""

    def __init__(self, c1: int, c2: int, k: int = 1, s: int = 1) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c1, c2, k, s, k // 2, bias=False)
        self.bn = nn.BatchNorm2d(c2)
        self.act = nn.SiLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.bn(self.conv(x)))


class Bottleneck(nn.Module):
    def __init__(self, c: int, shortcut: bool = True) -> None:
        super().__init__()
        self.cv1 = Conv(c, c, 3)
        self.cv2 = Conv(c, c, 3)
        self.add = shortcut

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.cv2(self.cv1(x))
        return x + y if self.add else y


class C2f(nn.Module):
    """YOLOv8's C2f: 1x1 Conv to 2c, split, n bottlenecks each appended, concatenate, 1x1 Conv."""

    def __init__(self, c1: int, c2: int, n: int = 1, shortcut: bool = False) -> None:
        super().__init__()
        self.c = c2 // 2
        self.cv1 = Conv(c1, 2 * self.c, 1)
        self.cv2 = Conv((2 + n) * self.c, c2, 1)
        self.m = nn.ModuleList(Bottleneck(self.c, shortcut) for _ in range(n))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = list(self.cv1(x).chunk(2, 1))
        for m in self.m:
            y.append(m(y[-1]))
        return self.cv2(torch.cat(y, 1))


class SPPF(nn.Module):
    def __init__(self, c1: int, c2: int, k: int = 5) -> None:
        super().__init__()
        c_ = c1 // 2
        self.cv1 = Conv(c1, c_, 1)
        self.cv2 = Conv(c_ * 4, c2, 1)
        self.m = nn.MaxPool2d(k, 1, k // 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = [self.cv1(x)]
        for _ in range(3):
            y.append(self.m(y[-1]))
        return self.cv2(torch.cat(y, 1))


class Detect(nn.Module):
    """YOLOv8's decoupled head, raw outputs per level (no anchors, no decoding)."""

    def __init__(self, ch: Sequence[int], nc: int = NUM_CLASSES) -> None:
        super().__init__()
        c2 = max(16, ch[0] // 4, 4 * REG_MAX)
        c3 = max(ch[0], min(nc, 100))
        self.box = nn.ModuleList(nn.Sequential(Conv(c, c2, 3), Conv(c2, c2, 3), nn.Conv2d(c2, 4 * REG_MAX, 1))
                                 for c in ch)
        self.cls = nn.ModuleList(nn.Sequential(Conv(c, c3, 3), Conv(c3, c3, 3), nn.Conv2d(c3, nc, 1)) for c in ch)

    def forward(self, xs: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        return [torch.cat((b(x), c(x)), 1) for x, b, c in zip(xs, self.box, self.cls)]


class Detector(nn.Module):
    """YOLOv8n-sized backbone + FPN/PAN neck + Detect head, a YOLO-form GAM on each of P3/P4/P5 (``gam=False``:
    none). ``forward`` returns the three raw head outputs."""

    def __init__(self, widths: Sequence[int] = WIDTHS, depths: Sequence[int] = DEPTHS, nc: int = NUM_CLASSES,
                 gam: bool = True) -> None:
        super().__init__()
        w1, w2, w3, w4, w5 = widths
        d2, d3, d4, d5 = depths
        self.stem = nn.Sequential(Conv(3, w1, 3, 2), Conv(w1, w2, 3, 2), C2f(w2, w2, d2, True))   # P2/4
        self.p3 = nn.Sequential(Conv(w2, w3, 3, 2), C2f(w3, w3, d3, True))                        # P3/8
        self.p4 = nn.Sequential(Conv(w3, w4, 3, 2), C2f(w4, w4, d4, True))                        # P4/16
        self.p5 = nn.Sequential(Conv(w4, w5, 3, 2), C2f(w5, w5, d5, True), SPPF(w5, w5))          # P5/32
        self.up = nn.Upsample(scale_factor=2, mode="nearest")
        self.top4 = C2f(w5 + w4, w4, 1)       # FPN: P5 up + P4
        self.out3 = C2f(w4 + w3, w3, 1)       # FPN: P4 up + P3 -> P3 out (stride 8)
        self.down3 = Conv(w3, w3, 3, 2)
        self.out4 = C2f(w3 + w4, w4, 1)       # PAN: P3 down + P4 -> P4 out (stride 16)
        self.down4 = Conv(w4, w4, 3, 2)
        self.out5 = C2f(w4 + w5, w5, 1)       # PAN: P4 down + P5 -> P5 out (stride 32)
        make = (lambda c: YoloGAM(c, c, group=True, rate=4)) if gam else (lambda c: nn.Identity())
        self.gam3, self.gam4, self.gam5 = make(w3), make(w4), make(w5)
        self.detect = Detect((w3, w4, w5), nc)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        p3 = self.p3(self.stem(x))
        p4 = self.p4(p3)
        p5 = self.p5(p4)
        t4 = self.top4(torch.cat((self.up(p5), p4), 1))
        o3 = self.out3(torch.cat((self.up(t4), p3), 1))
        o4 = self.out4(torch.cat((self.down3(o3), t4), 1))
        o5 = self.out5(torch.cat((self.down4(o4), p5), 1))
        return self.detect([self.gam3(o3), self.gam4(o4), self.gam5(o5)])


GAM_NAMES = ("gam3", "gam4", "gam5")


def without_gam(model: Detector) -> Detector:
    """A copy of ``model`` with its three GAM blocks replaced by ``nn.Identity`` (same mode, device, dtype)."""
    bare = copy.deepcopy(model)
    for name in GAM_NAMES:
        setattr(bare, name, nn.Identity())
    return bare


def gam_shapes(batch: int, size: int, widths: Sequence[int] = WIDTHS) -> list[tuple[int, int, int, int]]:
    """The (B, C, H, W) each GAM block sees at a ``size`` x ``size`` input."""
    return [(batch, widths[2], size // 8, size // 8), (batch, widths[3], size // 16, size // 16),
            (batch, widths[4], size // 32, size // 32)]


def param_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
