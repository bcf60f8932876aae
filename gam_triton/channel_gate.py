"""Channel gate op: x1 = x * g(W2 relu(W1 x + b1) + b2), g = sigmoid or identity, per pixel.

* :func:`channel_gate` - the entry point: the Triton kernel (``kernels/channel_gate.py``) for CUDA tensors
  and for CPU tensors under ``TRITON_INTERPRET=1``, :func:`channel_gate_torch` elsewhere.
* ``gam_triton::channel_gate`` - the kernel registered as a ``torch.library.triton_op`` so torch.compile
  traces into it, with an autograd formula that recomputes h and a from x (nothing but x is saved).
* :func:`channel_gate_torch` - the PyTorch path: batched matmuls on the B x C x HW view (no permute
  copies for NCHW, plain ``F.linear`` on the free NHWC view for channels_last).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from . import autotune
from ._runtime import (HAS_TRITON, INTERPRET, bchw_view, call_directly, check_bchw, check_vector, define_op,
                       device_index, dot_precision, launcher, new_output, on_device, use_triton)
from .configs import (Config, channel_gate_candidates, channel_gate_heuristic, channel_gate_input_precision,
                      next_pow2)

if HAS_TRITON:
    from triton import cdiv

    from .kernels.channel_gate import channel_gate_fwd_kernel

__all__ = ["channel_gate", "channel_gate_torch", "channel_gate_reference_grads"]


def channel_gate_torch(x: torch.Tensor, w1: torch.Tensor, b1: Optional[torch.Tensor], w2: torch.Tensor,
                       b2: Optional[torch.Tensor], sigmoid: bool) -> torch.Tensor:
    """PyTorch channel gate, differentiable, without permute copies.

    The matmuls run in the weights' dtype (x is cast to it, as nn.Linear under autocast does); the gate
    multiplies x in its own dtype, so fp32 x with half weights gives an fp32 result. Per layout and
    autograd need, the form that is fastest on the CPU (measured, see perf/NOTES.md):
    channels_last - F.linear on the free NHWC view; NCHW without autograd - batched matmuls on the
    B x C x HW view; NCHW with autograd - 1x1 convolutions (matmul's backward would copy operands).
    """
    needs_grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (x, w1, b1, w2, b2))
    if not needs_grad:  # matmul copies operands that require grad, even under no_grad
        w1, b1, w2, b2 = (None if t is None else t.detach() for t in (w1, b1, w2, b2))
    xd = x.to(w1.dtype)
    if x.stride(1) == 1 and x.shape[1] > 1:  # channels_last: the NHWC view is contiguous
        xp = xd.permute(0, 2, 3, 1)
        a = F.linear(torch.relu(F.linear(xp, w1, b1)), w2, b2).permute(0, 3, 1, 2)
    elif needs_grad:
        hid = torch.relu(F.conv2d(xd, w1[:, :, None, None], b1))
        a = F.conv2d(hid, w2[:, :, None, None], b2)
    else:
        b, c, h, w = x.shape
        xv = xd.reshape(b, c, h * w)
        hid = torch.matmul(w1, xv)
        if b1 is not None:
            hid = hid + b1[:, None]
        a = torch.matmul(w2, torch.relu_(hid))
        if b2 is not None:
            a = a + b2[:, None]
        a = a.view(b, c, h, w)
    gate = torch.sigmoid(a) if sigmoid else a
    return x * gate


def _bias_or_zeros(b: Optional[torch.Tensor], n: int, like: torch.Tensor) -> torch.Tensor:
    return b if b is not None else torch.zeros(n, dtype=like.dtype, device=like.device)


def _launch_args(x: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor, w2: torch.Tensor, b2: torch.Tensor,
                 sigmoid: bool, out: torch.Tensor, config: Config, precision: Optional[str] = None):
    """(kernel, grid, args, kwargs) of the launch writing ``out``: what :func:`_launch` runs and what
    ``perf/compile_report.py`` compiles ahead of time (``precision``: "ieee" or "tf32", overrides
    ``_runtime.dot_precision``; fp32 "ieee" runs as 3xTF32, ``configs.CHANNEL_GATE_FP32_DOTS``)."""
    bsz, c, h, w = x.shape
    hw = h * w
    cr = w1.shape[0]
    xv, sxb, sxc, sxp = bchw_view(x)
    _, sob, soc, sop = bchw_view(out)
    grid = (bsz * cdiv(hw, config.BLOCK_P),)
    args = (xv, w1, b1, w2, b2, out, hw, c, cr, sxb, sxc, sxp, sob, soc, sop)
    kwargs = dict(SIGMOID=sigmoid, DOT_F32=INTERPRET or w1.dtype == torch.float32,
                  INPUT_PRECISION=channel_gate_input_precision(w1.dtype, precision),
                  N_CHUNKS=cdiv(c, config.BLOCK_C), **config.launch_kwargs())
    return channel_gate_fwd_kernel, grid, args, kwargs


def _launch(x: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor, w2: torch.Tensor, b2: torch.Tensor,
            sigmoid: bool, out: torch.Tensor, config: Config) -> None:
    """Launch the channel-gate kernel writing ``out`` (same shape as x, any layout)."""
    kernel, grid, args, kwargs = _launch_args(x, w1, b1, w2, b2, sigmoid, out, config)
    launcher(kernel)[grid](*args, **kwargs)


def _key(x: torch.Tensor, w1: torch.Tensor, out_channels_last: bool) -> tuple:
    c, cr, hw = x.shape[1], w1.shape[0], x.shape[2] * x.shape[3]
    return (c, cr, next_pow2(hw), autotune.batch_bucket(x.shape[0], hw), str(x.dtype), str(w1.dtype),
            x.stride(1) == 1, out_channels_last, dot_precision(w1.dtype))


def _channel_gate_impl(x: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor, w2: torch.Tensor,
                       b2: torch.Tensor, sigmoid: bool, out_channels_last: bool) -> torch.Tensor:
    out = new_output(x, x.dtype, out_channels_last)
    if x.numel() == 0:
        return out
    c, cr, hw = x.shape[1], w1.shape[0], x.shape[2] * x.shape[3]
    heur = channel_gate_heuristic(c, cr, hw, w1.dtype)  # the dots run in the weights' dtype

    def bench(cfg: Config) -> float:
        return autotune.bench_ms(lambda: _launch(x, w1, b1, w2, b2, sigmoid, out, cfg))

    with on_device(x):  # the tensors' device, for tuning and launch (cuda:1 while cuda:0 is current)
        cfg = autotune.select("channel_gate", _key(x, w1, out_channels_last), heur,
                              lambda: channel_gate_candidates(c, cr, hw, w1.dtype), bench, device_index(x))
        _launch(x, w1, b1, w2, b2, sigmoid, out, cfg)
    return out


def _fake(x, w1, b1, w2, b2, sigmoid, out_channels_last):
    fmt = torch.channels_last if out_channels_last else torch.contiguous_format
    return torch.empty_like(x, memory_format=fmt)


def _setup_context(ctx, inputs, output) -> None:
    x, w1, b1, w2, b2, sigmoid, _ = inputs
    ctx.sigmoid = sigmoid
    ctx.save_for_backward(x, w1, b1, w2, b2)


def channel_gate_reference_grads(x, w1, b1, w2, b2, sigmoid, dx1):
    """Gradients of x1 = x * g(W2 relu(W1 x + b1) + b2) (GAM_NOTES' formulas), h and a recomputed.

    Computed in fp32 (fp64 for fp64 inputs) on the NHWC view; returns (dx, dw1, db1, dw2, db2) in the
    dtypes of the corresponding inputs.
    """
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    xp = x.permute(0, 2, 3, 1).to(acc).reshape(-1, x.shape[1])  # [N, C]
    dp = dx1.permute(0, 2, 3, 1).to(acc).reshape(-1, x.shape[1])
    w1f, b1f, w2f, b2f = (t.to(acc) for t in (w1, b1, w2, b2))
    pre = torch.addmm(b1f, xp, w1f.t())
    hid = torch.relu(pre)
    a = torch.addmm(b2f, hid, w2f.t())
    g = torch.sigmoid(a) if sigmoid else a
    dx = dp * g
    da = dp * xp
    if sigmoid:
        da = da * g * (1 - g)
    dw2 = da.t() @ hid
    db2 = da.sum(0)
    dh = (da @ w2f) * (pre > 0)
    dw1 = dh.t() @ xp
    db1 = dh.sum(0)
    dx = dx + dh @ w1f
    b, c, h, w = x.shape
    dx = dx.view(b, h, w, c).permute(0, 3, 1, 2).to(x.dtype)
    return dx, dw1.to(w1.dtype), db1.to(b1.dtype), dw2.to(w2.dtype), db2.to(b2.dtype)


def _backward(ctx, dx1):
    x, w1, b1, w2, b2 = ctx.saved_tensors
    grads = channel_gate_reference_grads(x, w1, b1, w2, b2, ctx.sigmoid, dx1)
    return (*grads, None, None)


_op = define_op("channel_gate", _channel_gate_impl, _fake, _backward, _setup_context) if HAS_TRITON else None


def channel_gate(x: torch.Tensor, w1: torch.Tensor, b1: Optional[torch.Tensor], w2: torch.Tensor,
                 b2: Optional[torch.Tensor], sigmoid: bool = True,
                 out_channels_last: Optional[bool] = None) -> torch.Tensor:
    """x1 = x * g(W2 relu(W1 x + b1) + b2) over the channels of each pixel of a B x C x H x W tensor.

    ``out_channels_last`` picks the output layout (default: the input's). Inputs are not validated
    here beyond shapes, dtypes and devices (checked before any kernel runs, ValueError/TypeError).
    """
    check_bchw("x", x)
    if not isinstance(w1, torch.Tensor) or not isinstance(w2, torch.Tensor) or w1.dim() != 2 or w2.dim() != 2:
        raise ValueError("w1 and w2 must be 2-D tensors (C/r x C and C x C/r)")
    cr, c = w1.shape
    if c != x.shape[1] or tuple(w2.shape) != (c, cr) or cr == 0:
        raise ValueError(f"weights do not fit x with {x.shape[1]} channels: w1 {tuple(w1.shape)}, "
                         f"w2 {tuple(w2.shape)} (expected (C/r, C) and (C, C/r))")
    if w1.dtype != w2.dtype or not w1.is_floating_point():
        raise TypeError(f"w1 and w2 must share one floating dtype, got {w1.dtype} and {w2.dtype}")
    for name, t in (("w1", w1), ("w2", w2)):
        if t.device != x.device:
            raise ValueError(f"{name} is on {t.device}, x on {x.device}")
    check_vector("b1", b1, cr, x.device)
    check_vector("b2", b2, c, x.device)
    if out_channels_last is None:
        out_channels_last = x.stride(1) == 1 and x.shape[1] > 1
    if not use_triton(x):
        out = channel_gate_torch(x, w1, b1, w2, b2, sigmoid)
        fmt = torch.channels_last if out_channels_last else torch.contiguous_format
        return out if out.is_contiguous(memory_format=fmt) else out.contiguous(memory_format=fmt)
    b1 = _bias_or_zeros(b1, w1.shape[0], w1)
    b2 = _bias_or_zeros(b2, w2.shape[0], w2)
    args = (x, w1.contiguous(), b1.contiguous(), w2.contiguous(), b2.contiguous(), bool(sigmoid),
            bool(out_channels_last))
    return _channel_gate_impl(*args) if call_directly(*args[:5]) else _op(*args)
