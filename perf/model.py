"""The detector-like network ``perf/bench.py`` times as the ``model`` kind: plain PyTorch, YOLOv8n-sized, with the
GAM blocks where the "add GAM to YOLOv8" tutorials put them. Not a trainable detector (no loss, no box decoding).

* backbone: Conv-BN-SiLU stems with stride 2 and C2f stages at the YOLOv8n widths 16 / 32 / 64 / 128 / 256
  (depths 1, 2, 2, 1), then SPPF: P3 (stride 8), P4 (stride 16), P5 (stride 32);
* neck: YOLOv8's FPN + PAN, outputs of 64 / 128 / 256 channels (80x80, 40x40, 20x20 at a 640 input);
* GAM: a ``gam_triton.reference.YoloGAM`` (grouped, rate 4) on each neck output, right before the head
  (after layers 15, 18 and 21 of yolov8.yaml);
* head: YOLOv8's decoupled Detect branches (box: two 3x3 Conv + 1x1 to 4 x 16 DFL bins; class: to 80 classes).

:func:`without_gam` (the GAMs replaced by ``nn.Identity``) gives the share of the time spent in the GAM blocks:
1 - t(without) / t(model).
"""
from __future__ import annotations

import copy
from typing import Sequence

import torch
from torch import nn

from gam_triton.reference import YoloGAM

WIDTHS = (16, 32, 64, 128, 256)   # YOLOv8n: width multiple 0.25
DEPTHS = (1, 2, 2, 1)             # depth multiple 0.33 of the C2f repeats (3, 6, 6, 3)
GAM_NAMES = ("gam3", "gam4", "gam5")


class Conv(nn.Sequential):
    """Conv2d (no bias) + BatchNorm2d + SiLU, ultralytics' ``Conv``."""

    def __init__(self, c1: int, c2: int, k: int = 1, s: int = 1) -> None:
        super().__init__(nn.Conv2d(c1, c2, k, s, k // 2, bias=False), nn.BatchNorm2d(c2), nn.SiLU(inplace=True))


class Bottleneck(nn.Module):
    def __init__(self, c: int, shortcut: bool) -> None:
        super().__init__()
        self.cv = nn.Sequential(Conv(c, c, 3), Conv(c, c, 3))
        self.add = shortcut

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.cv(x) if self.add else self.cv(x)


class C2f(nn.Module):
    """YOLOv8's C2f: 1x1 Conv to 2c, split, n bottlenecks each appended, concatenate, 1x1 Conv."""

    def __init__(self, c1: int, c2: int, n: int = 1, shortcut: bool = False) -> None:
        super().__init__()
        self.c = c2 // 2
        self.cv1, self.cv2 = Conv(c1, 2 * self.c), Conv((2 + n) * self.c, c2)
        self.m = nn.ModuleList(Bottleneck(self.c, shortcut) for _ in range(n))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = list(self.cv1(x).chunk(2, 1))
        for m in self.m:
            y.append(m(y[-1]))
        return self.cv2(torch.cat(y, 1))


class SPPF(nn.Module):
    def __init__(self, c1: int, c2: int, k: int = 5) -> None:
        super().__init__()
        self.cv1, self.cv2, self.m = Conv(c1, c1 // 2), Conv(c1 // 2 * 4, c2), nn.MaxPool2d(k, 1, k // 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = [self.cv1(x)]
        for _ in range(3):
            y.append(self.m(y[-1]))
        return self.cv2(torch.cat(y, 1))


def _branch(c1: int, c2: int, out: int) -> nn.Sequential:
    return nn.Sequential(Conv(c1, c2, 3), Conv(c2, c2, 3), nn.Conv2d(c2, out, 1))


class Detector(nn.Module):
    """Backbone + FPN/PAN neck + Detect head, a YOLO-form GAM on each of P3/P4/P5; ``forward`` returns the three
    raw head outputs."""

    def __init__(self, widths: Sequence[int] = WIDTHS, depths: Sequence[int] = DEPTHS, nc: int = 80) -> None:
        super().__init__()
        w1, w2, w3, w4, w5 = widths
        d2, d3, d4, d5 = depths
        self.stem = nn.Sequential(Conv(3, w1, 3, 2), Conv(w1, w2, 3, 2), C2f(w2, w2, d2, True))
        self.p3 = nn.Sequential(Conv(w2, w3, 3, 2), C2f(w3, w3, d3, True))
        self.p4 = nn.Sequential(Conv(w3, w4, 3, 2), C2f(w4, w4, d4, True))
        self.p5 = nn.Sequential(Conv(w4, w5, 3, 2), C2f(w5, w5, d5, True), SPPF(w5, w5))
        self.up = nn.Upsample(scale_factor=2, mode="nearest")
        self.top4, self.out3 = C2f(w5 + w4, w4), C2f(w4 + w3, w3)      # FPN
        self.down3, self.out4 = Conv(w3, w3, 3, 2), C2f(w3 + w4, w4)    # PAN
        self.down4, self.out5 = Conv(w4, w4, 3, 2), C2f(w4 + w5, w5)
        self.gam3, self.gam4, self.gam5 = (YoloGAM(c, c, group=True, rate=4) for c in (w3, w4, w5))
        c2, c3 = max(16, w3 // 4, 64), max(w3, min(nc, 100))
        self.box = nn.ModuleList(_branch(c, c2, 64) for c in (w3, w4, w5))
        self.cls = nn.ModuleList(_branch(c, c3, nc) for c in (w3, w4, w5))

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        p3 = self.p3(self.stem(x))
        p4 = self.p4(p3)
        p5 = self.p5(p4)
        t4 = self.top4(torch.cat((self.up(p5), p4), 1))
        o3 = self.out3(torch.cat((self.up(t4), p3), 1))
        o4 = self.out4(torch.cat((self.down3(o3), t4), 1))
        o5 = self.out5(torch.cat((self.down4(o4), p5), 1))
        feats = (self.gam3(o3), self.gam4(o4), self.gam5(o5))
        return [torch.cat((b(f), c(f)), 1) for f, b, c in zip(feats, self.box, self.cls)]


def without_gam(model: Detector) -> Detector:
    """A copy of ``model`` with its GAM blocks replaced by ``nn.Identity`` (same mode, device, dtype)."""
    bare = copy.deepcopy(model)
    for name in GAM_NAMES:
        setattr(bare, name, nn.Identity())
    return bare


def case(shape, dtype: torch.dtype, mode: str, provider: str, device: str):
    """``perf/bench.py``'s ``model`` rows: the detector at batch x 3 x height x width, eval in ``dtype``; train: one
    step of fp32 weights (under autocast for fp16/bf16) on a stand-in loss. Providers: eager, gam_triton
    (``gam_triton.convert``), no_gam (:func:`without_gam`)."""
    import gam_triton
    from bench import Case

    torch.manual_seed(0)
    net = Detector()
    net = {"eager": net, "gam_triton": gam_triton.convert(net), "no_gam": without_gam(net)}[provider]
    train = mode == "train"
    net = net.to(device).train() if train else net.to(device, dtype).eval()
    x = torch.randn(shape.batch, 3, shape.height, shape.width, device=device, dtype=torch.float32 if train else dtype)
    amp = torch.autocast(device, dtype=dtype, enabled=train and dtype != torch.float32)
    if not train:
        return Case(lambda: net(x), 0, 0)

    def step():
        with amp:
            outs = net(x)
        sum(o.float().square().mean() for o in outs).backward()
    return Case(step, 0, 0, list(net.parameters()))
