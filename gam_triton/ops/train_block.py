"""The GAM block in train mode (both BatchNorms on batch statistics) as two custom ops, forward and backward.

* ``gam_triton::train_block_fwd`` - the channel gate kernel, conv1 (cuDNN), BN1's statistics kernel (running
  statistics updated in it), BN-apply + ReLU, conv2, BN2's statistics, the final gate; and one zero-fill of
  the reductions' counters: 8 launches. Saves x, x1, y1, z1, y2 (x1 in the convolutions' dtype too under
  autocast) and two [4, C] fp32 statistics tensors.
* ``gam_triton::train_block_bwd`` - BN2 + sigmoid + shuffle + final gate backward (a reduction, then one
  elementwise pass writing dy2 and x1's gradient from the gate), conv2's backward (cuDNN), BN1 + ReLU backward,
  conv1's backward, the channel gate's fused backward (:func:`gam_triton.ops.channel_gate.backward`).

:func:`apply` wraps them in a ``torch.autograd.Function`` (the forward op mutates the running statistics, so it
cannot carry a registered autograd formula). Reductions are deterministic (no float atomics). Double backward
is not supported: the backward raises when asked to build a graph (``create_graph=True``).
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F

from . import _runtime, batchnorm, channel_gate, elementwise
from ._runtime import HAS_TRITON

__all__ = ["BNArgs", "apply"]


class BNArgs(NamedTuple):
    """One BatchNorm as the ops take it: affine parameters (or None), running statistics (empty tensors when
    not updated), eps, momentum (-1: None, the cumulative average) and whether to update them."""

    weight: Optional[torch.Tensor]
    bias: Optional[torch.Tensor]
    running: tuple
    eps: float
    momentum: float
    update: bool


def _empty(device) -> torch.Tensor:
    return torch.empty(0, device=device)


def _fwd(x: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor, w2: torch.Tensor, b2: torch.Tensor,
         k1: torch.Tensor, kb1: Optional[torch.Tensor], k2: torch.Tensor, kb2: Optional[torch.Tensor],
         g1: Optional[torch.Tensor], be1: Optional[torch.Tensor], g2: Optional[torch.Tensor],
         be2: Optional[torch.Tensor], rm1: torch.Tensor, rv1: torch.Tensor, nbt1: torch.Tensor,
         rm2: torch.Tensor, rv2: torch.Tensor, nbt2: torch.Tensor, sigmoid: bool, pad: int, groups: int,
         shuffle: int, eps1: float, eps2: float, mom1: float, mom2: float, update1: bool, update2: bool,
         x1_cl: bool, out_cl: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                                              torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    x1 = channel_gate.run.impl(x, w1, b1, w2, b2, sigmoid, x1_cl)
    x1c = x1.to(k1.dtype) if x1.dtype != k1.dtype else x1
    y1 = F.conv2d(x1c, k1, kb1, padding=pad, groups=groups)
    n1, n2 = batchnorm.counter_slots(y1.shape[1]), batchnorm.counter_slots(x.shape[1])
    # the counters of every reduction of the forward and the backward (the kernels leave them zero)
    counts = torch.zeros(n1 + n2 + channel_gate.COUNTER_SLOTS, dtype=torch.int32, device=x.device)
    stats1 = batchnorm.stats(y1, g1, be1, (rm1, rv1, nbt1), eps1, mom1, update1, counts[:n1])
    z1 = elementwise.run_bn_relu.impl(y1, stats1[2], stats1[3])
    y2 = F.conv2d(z1, k2, kb2, padding=pad, groups=groups)
    stats2 = batchnorm.stats(y2, g2, be2, (rm2, rv2, nbt2), eps2, mom2, update2, counts[n1:n1 + n2])
    out = elementwise.run_final_gate.impl(x1, y2, stats2[2], stats2[3], shuffle, out_cl)
    return out, x1, (x1c if x1c is not x1 else _empty(x.device)), y1, z1, y2, stats1, stats2, counts


def _fwd_fake(x, w1, b1, w2, b2, k1, kb1, k2, kb2, g1, be1, g2, be2, rm1, rv1, nbt1, rm2, rv2, nbt2, sigmoid,
              pad, groups, shuffle, eps1, eps2, mom1, mom2, update1, update2, x1_cl, out_cl):
    b, c, h, w = x.shape
    cr = k1.shape[0]
    cl = torch.channels_last if x1_cl else torch.contiguous_format
    x1 = torch.empty_like(x, memory_format=cl)
    x1c = torch.empty_like(x1, dtype=k1.dtype) if x.dtype != k1.dtype else x.new_empty(0, dtype=torch.float32)
    fmt1 = torch.channels_last if (x1_cl and cr > 1) else torch.contiguous_format
    y1 = torch.empty((b, cr, h, w), dtype=k1.dtype, device=x.device, memory_format=fmt1)
    y2 = torch.empty((b, c, h, w), dtype=k2.dtype, device=x.device, memory_format=cl)
    out = torch.empty_like(x, dtype=torch.promote_types(x.dtype, k2.dtype),
                           memory_format=torch.channels_last if out_cl else torch.contiguous_format)
    slots = batchnorm.counter_slots(cr) + batchnorm.counter_slots(c) + channel_gate.COUNTER_SLOTS
    return (out, x1, x1c, y1, torch.empty_like(y1), y2, x.new_empty((4, cr), dtype=torch.float32),
            x.new_empty((4, c), dtype=torch.float32), x.new_empty((slots,), dtype=torch.int32))


def _conv_backward(dy, inp, weight, has_bias: bool, pad: int, groups: int):
    return torch.ops.aten.convolution_backward(
        dy, inp, weight, [weight.shape[0]] if has_bias else None, [1, 1], [pad, pad], [1, 1], False, [0, 0],
        groups, [True, True, has_bias])


#: 13 gradients (a fixed tuple: a list output of an op that mutates an input cannot be functionalised)
_GRADS = tuple[(torch.Tensor,) * 13]


def _bwd(dout: torch.Tensor, x: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor, w2: torch.Tensor,
         b2: torch.Tensor, k1: torch.Tensor, k2: torch.Tensor, g1: Optional[torch.Tensor], be1: Optional[torch.Tensor],
         g2: Optional[torch.Tensor], be2: Optional[torch.Tensor], x1: torch.Tensor, x1c: torch.Tensor,
         y1: torch.Tensor, z1: torch.Tensor, y2: torch.Tensor, stats1: torch.Tensor, stats2: torch.Tensor,
         counts: torch.Tensor, sigmoid: bool, pad: int, groups: int, shuffle: int, has_kb1: bool,
         has_kb2: bool) -> _GRADS:
    n1, n2 = batchnorm.counter_slots(y1.shape[1]), batchnorm.counter_slots(y2.shape[1])  # the forward's, zero again
    dy2, dx1_gate, dg2, dbe2 = batchnorm.backward(1, dout, x1, y2, stats2, g2, be2, shuffle, counts[:n2])
    dz1, dk2, dkb2 = _conv_backward(dy2, z1, k2, has_kb2, pad, groups)
    dy1, _, dg1, dbe1 = batchnorm.backward(0, dz1, None, y1, stats1, g1, be1, 0, counts[n2:n2 + n1])
    dx1_conv, dk1, dkb1 = _conv_backward(dy1, x1c if x1c.numel() else x1, k1, has_kb1, pad, groups)
    dx, dw1, db1, dw2, db2 = channel_gate.backward(x, dx1_gate, dx1_conv, w1, b1, w2, b2, sigmoid, counts[n1 + n2:])
    grads = [dx, dw1, db1, dw2, db2, dk1, dkb1, dk2, dkb2, dg1, dbe1, dg2, dbe2]
    return tuple(_empty(x.device) if t is None else t for t in grads)


def _bwd_fake(dout, x, w1, b1, w2, b2, k1, k2, g1, be1, g2, be2, x1, x1c, y1, z1, y2, stats1, stats2, counts,
              sigmoid, pad, groups, shuffle, has_kb1, has_kb2):
    def like(t):
        return x.new_empty(0) if t is None else torch.empty_like(t)

    # the convolutions' gradients as aten's own meta kernel lays them out (cuDNN may pick channels_last)
    _, dk2, dkb2 = _conv_backward(torch.empty_like(y2), z1, k2, has_kb2, pad, groups)
    _, dk1, dkb1 = _conv_backward(torch.empty_like(y1), x1c if x1c.numel() else x1, k1, has_kb1, pad, groups)
    return (torch.empty_like(x), like(w1), like(b1), like(w2), like(b2), dk1, dkb1 if has_kb1 else x.new_empty(0),
            dk2, dkb2 if has_kb2 else x.new_empty(0), like(g1), like(be1), like(g2), like(be2))


if HAS_TRITON:
    _RUNNING = ("rm1", "rv1", "nbt1", "rm2", "rv2", "nbt2")
    _fwd_op = _runtime.entry("train_block_fwd", _fwd, _fwd_fake, mutates=_RUNNING)
    _bwd_op = _runtime.entry("train_block_bwd", _bwd, _bwd_fake, mutates=("counts",))


class _TrainBlock(torch.autograd.Function):
    """Autograd around the two ops."""

    @staticmethod
    def forward(ctx, x, w1, b1, w2, b2, k1, kb1, k2, kb2, g1, be1, g2, be2, running: tuple, args: tuple):
        out, x1, x1c, y1, z1, y2, stats1, stats2, counts = _fwd_op(
            x, w1, b1, w2, b2, k1, kb1, k2, kb2, g1, be1, g2, be2, *running, *args)
        ctx.args = (*args[:4], kb1 is not None, kb2 is not None)
        ctx.save_for_backward(x, w1, b1, w2, b2, k1, k2, g1, be1, g2, be2, x1, x1c, y1, z1, y2, stats1, stats2,
                              counts)
        return out

    @staticmethod
    def backward(ctx, dout):
        if torch.is_grad_enabled() and not torch.compiler.is_compiling():
            raise RuntimeError("gam_triton: the train-mode GAM block does not support double backward "
                               "(create_graph=True / higher-order gradients): its backward runs fused kernels "
                               "with no autograd formula of their own. Use the PyTorch reference module for that.")
        saved = ctx.saved_tensors
        grads = _bwd_op(dout, *saved, *ctx.args)
        # absent biases / affine parameters come back as empty tensors: None for autograd
        present = (True,) * 6 + (ctx.args[4], True, ctx.args[5]) + tuple(t is not None for t in saved[7:11])
        return (*(t if keep else None for t, keep in zip(grads, present)), None, None)


def apply(x: torch.Tensor, lin: tuple, convs: tuple, bn1: BNArgs, bn2: BNArgs, sigmoid: bool, pad: int,
          groups: int, shuffle: int, x1_cl: bool, out_cl: bool) -> torch.Tensor:
    """The whole block with both BatchNorms on batch statistics, differentiable, on trusted arguments.

    ``lin`` = (w1, b1, w2, b2), contiguous, biases present, in the dtype the MLP runs in; ``convs`` = (k1, kb1,
    k2, kb2) in the dtype the convolutions run in (autocast's, or the weights').
    """
    args = (bool(sigmoid), int(pad), int(groups), int(shuffle), bn1.eps, bn2.eps, bn1.momentum, bn2.momentum,
            bn1.update, bn2.update, bool(x1_cl), bool(out_cl))
    return _TrainBlock.apply(x, *lin, *convs, bn1.weight, bn1.bias, bn2.weight, bn2.bias,
                             (*bn1.running, *bn2.running), args)
