"""The two fused components of GAM alone: eager functions, gam_triton calls, their bytes and FLOPs.

* channel gate (YOLO form: no sigmoid): ``x1 = x * (W2 relu(W1 x + b1) + b2)`` per pixel. Eager is the
  reference's permute + Linear + ReLU + Linear + permute + multiply; gam_triton is
  ``gam_triton.ops.channel_gate.channel_gate`` (one kernel).
* final gate (YOLO form): ``out = x1 * shuffle_4(sigmoid(BN2(y2)))``. Eager is BatchNorm (running
  statistics) + sigmoid + the reference's ``channel_shuffle`` + multiply; gam_triton is
  ``gam_triton.ops.elementwise.final_gate`` with BN2 folded into a per-channel scale and shift computed once
  outside the timed call (the kernel alone, held against its roofline).

Bytes are what the op must move (each input read once, each output written once; GAM_NOTES.md), so
GB/s over them is comparable across providers and against the copy bandwidth.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from common import Shape

SHUFFLE_GROUPS = 4  # the YOLO form's channel shuffle


def channel_gate_eager(x: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor, w2: torch.Tensor,
                       b2: torch.Tensor) -> torch.Tensor:
    """The YOLO reference's channel branch and gate, op for op."""
    b, c, h, w = x.shape
    x_permute = x.permute(0, 2, 3, 1).reshape(b, -1, c)
    att = F.linear(torch.relu(F.linear(x_permute, w1, b1)), w2, b2).view(b, h, w, c)
    return x * att.permute(0, 3, 1, 2)


def final_gate_eager(x1: torch.Tensor, y2: torch.Tensor, bn: nn.BatchNorm2d) -> torch.Tensor:
    """The YOLO reference's last steps: BN2 (eval), sigmoid, shuffle in 4 groups, multiply."""
    from gam_triton.reference import channel_shuffle

    return x1 * channel_shuffle(torch.sigmoid(bn(y2)), SHUFFLE_GROUPS)


def channel_gate_bytes(shape: Shape, dtype: torch.dtype) -> int:
    """Read x and W1, b1, W2, b2; write x1."""
    elt = torch.empty((), dtype=dtype).element_size()
    c, cr = shape.channels, shape.hidden
    return 2 * shape.numel * elt + (2 * c * cr + c + cr) * elt


def channel_gate_flops(shape: Shape) -> int:
    """4 * B*H*W * C * C/r (the two matmuls; GAM_NOTES.md)."""
    return 4 * shape.batch * shape.pixels * shape.channels * shape.hidden


def final_gate_bytes(shape: Shape, dtype: torch.dtype) -> int:
    """Read x1 and y2, write out (activations) + the per-channel scale and shift (fp32)."""
    elt = torch.empty((), dtype=dtype).element_size()
    return 3 * shape.numel * elt + 2 * shape.channels * 4


def final_gate_flops(shape: Shape) -> int:
    """About 5 per element: scale, shift, sigmoid (counted as 2), multiply."""
    return 5 * shape.numel


def make_channel_gate(shape: Shape, dtype: torch.dtype, device: str, seed: int = 0):
    """(x, W1, b1, W2, b2) for the channel gate, initialised as nn.Linear does."""
    gen = torch.Generator().manual_seed(seed)
    c, cr = shape.channels, shape.hidden
    lin1, lin2 = nn.Linear(c, cr), nn.Linear(cr, c)
    # Parameters keep requires_grad as in a model: PyTorch's matmul picks its kernels by it (a 3-D input
    # with a weight that requires grad is folded into one mm, as the reference's nn.Linear does).
    w1, b1, w2, b2 = (t.detach().to(device=device, dtype=dtype).requires_grad_(True)
                      for t in (lin1.weight, lin1.bias, lin2.weight, lin2.bias))
    x = torch.randn(shape.batch, c, shape.height, shape.width, generator=gen).to(device=device, dtype=dtype)
    return (x, w1, b1, w2, b2)


def channel_gate_triton(x, w1, b1, w2, b2) -> torch.Tensor:
    from gam_triton.ops.channel_gate import channel_gate

    return channel_gate(x, w1, b1, w2, b2, False, out_channels_last=False)


def make_final_gate(shape: Shape, dtype: torch.dtype, device: str, seed: int = 0):
    """(x1, y2, bn) with BN2 in eval mode and non-trivial running statistics."""
    gen = torch.Generator().manual_seed(seed)
    c = shape.channels
    size = (shape.batch, c, shape.height, shape.width)
    bn = nn.BatchNorm2d(c).eval()
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5, generator=gen)
        bn.bias.uniform_(-0.5, 0.5, generator=gen)
        bn.running_mean.uniform_(-0.5, 0.5, generator=gen)
        bn.running_var.uniform_(0.5, 1.5, generator=gen)
    bn = bn.to(device=device, dtype=dtype)
    x1 = torch.randn(size, generator=gen).to(device=device, dtype=dtype)
    y2 = torch.randn(size, generator=gen).to(device=device, dtype=dtype)
    return (x1, y2, bn)


def final_gate_scale_shift(bn: nn.BatchNorm2d, y2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """BN2 as gam_triton folds it (fp32 per-channel scale and shift), computed outside the timing."""
    from gam_triton.reference import bn_scale_shift

    with torch.no_grad():
        return bn_scale_shift(bn, y2)


def final_gate_triton(x1, y2, scale, shift) -> torch.Tensor:
    from gam_triton.ops.elementwise import final_gate

    return final_gate(x1, y2, scale, shift, SHUFFLE_GROUPS, out_channels_last=False)
