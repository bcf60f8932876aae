"""A pure-torch stand-in for the few torchvision pieces ultralytics touches, for test machines where the real
torchvision cannot be imported.

PyPI's torchvision wheel is built for PyPI's CUDA torch; beside the CPU torch this project installs
(``torch==2.13.0`` from a CPU index) ``import torchvision`` fails (``operator torchvision::nms does not exist``).
ultralytics imports it inside its validator, predictor and AutoBackend (to choose torchvision's NMS) and calls
``torchvision.ops.nms``. :func:`install` puts this stand-in into ``sys.modules`` only when the real package
fails to import; where torchvision works (a GPU machine with matching wheels) nothing is replaced.

The stand-in provides ``torchvision.__version__`` (the installed distribution's, else "0.0"), ``torchvision.ops``
with ``nms``, ``batched_nms`` and ``box_iou`` (greedy NMS: a box is dropped when its IoU with a kept box of
higher score is above the threshold, as torchvision does).
"""
from __future__ import annotations

import importlib.metadata
import sys
import types

import torch

__all__ = ["install", "box_iou", "nms", "batched_nms"]


def box_iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """IoU of every box of ``a`` (N x 4, x1 y1 x2 y2) with every box of ``b`` (M x 4): N x M."""
    area_a = (a[:, 2] - a[:, 0]).clamp(min=0) * (a[:, 3] - a[:, 1]).clamp(min=0)
    area_b = (b[:, 2] - b[:, 0]).clamp(min=0) * (b[:, 3] - b[:, 1]).clamp(min=0)
    lt = torch.max(a[:, None, :2], b[None, :, :2])
    rb = torch.min(a[:, None, 2:], b[None, :, 2:])
    inter = (rb - lt).clamp(min=0).prod(-1)
    return inter / (area_a[:, None] + area_b[None, :] - inter).clamp(min=torch.finfo(inter.dtype).tiny)


def nms(boxes: torch.Tensor, scores: torch.Tensor, iou_threshold: float) -> torch.Tensor:
    """Indices of the boxes kept by greedy non-maximum suppression, by decreasing score (torchvision.ops.nms)."""
    order = scores.argsort(descending=True)
    iou = box_iou(boxes[order].float(), boxes[order].float())
    keep = torch.ones(len(order), dtype=torch.bool, device=boxes.device)
    for i in range(len(order)):
        if keep[i]:
            keep[i + 1:] &= iou[i, i + 1:] <= iou_threshold
    return order[keep]


def batched_nms(boxes: torch.Tensor, scores: torch.Tensor, idxs: torch.Tensor, iou_threshold: float) -> torch.Tensor:
    """NMS within each category of ``idxs`` (torchvision.ops.batched_nms)."""
    if boxes.numel() == 0:
        return torch.empty(0, dtype=torch.long, device=boxes.device)
    offsets = idxs.to(boxes) * (boxes.max() + 1)
    return nms(boxes + offsets[:, None], scores, iou_threshold)


def install() -> bool:
    """Put the stand-in into ``sys.modules`` as ``torchvision`` and ``torchvision.ops`` if the real torchvision
    cannot be imported; True when the stand-in was installed (or already is)."""
    if getattr(sys.modules.get("torchvision"), "__gam_triton_standin__", False):
        return True
    try:
        import torchvision  # noqa: F401
        return False
    except Exception:  # ImportError, or the RuntimeError of a wheel built for another torch
        pass
    for name in [n for n in sys.modules if n == "torchvision" or n.startswith("torchvision.")]:
        del sys.modules[name]  # what the failed import left half-initialised
    try:
        version = importlib.metadata.version("torchvision")
    except importlib.metadata.PackageNotFoundError:
        version = "0.0"
    tv = types.ModuleType("torchvision", "pure-torch stand-in (tests/torchvision_standin.py)")
    ops = types.ModuleType("torchvision.ops", "pure-torch stand-in: nms, batched_nms, box_iou")
    ops.nms, ops.batched_nms, ops.box_iou = nms, batched_nms, box_iou
    tv.ops, tv.__version__, tv.__gam_triton_standin__ = ops, version, True
    sys.modules["torchvision"], sys.modules["torchvision.ops"] = tv, ops
    return True
