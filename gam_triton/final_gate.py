"""Final gate op: out = x1 * shuffle_G(sigmoid(scale * y2 + shift)), BatchNorm2 and shuffle folded in.

* :func:`final_gate` - Triton kernel (``kernels/final_gate.py``) on CUDA / under the interpreter,
  :func:`final_gate_torch` elsewhere. Output dtype: ``promote_types(x1, y2)`` (what ``x1 * s`` gives under
  autocast); output layout: ``out_channels_last`` or x1's.
* ``gam_triton::final_gate`` - the kernel as a ``torch.library.triton_op`` with its autograd formula.
"""
from __future__ import annotations

from typing import Optional

import torch

from . import autotune
from ._runtime import (HAS_TRITON, bchw_view, call_directly, check_bchw, check_vector, define_op, device_index,
                       is_channels_last, launcher, new_output, on_device, use_triton)
from .configs import Config, elementwise_candidates, elementwise_heuristic, next_pow2
from .reference import gate_multiply, shuffle, unshuffle

if HAS_TRITON:
    from triton import cdiv

    from .kernels.final_gate import final_gate_kernel

__all__ = ["final_gate", "final_gate_torch"]


def final_gate_torch(x1: torch.Tensor, y2: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor,
                     groups: int) -> torch.Tensor:
    """PyTorch final gate, differentiable: one affine pass, an in-place sigmoid, the gated multiply."""
    c = x1.shape[1]
    s = torch.addcmul(shift.view(1, c, 1, 1), y2, scale.view(1, c, 1, 1)).to(y2.dtype).sigmoid_()
    return gate_multiply(x1, s, groups)


def _launch_args(x1, y2, scale, shift, groups, out, config: Config):
    """(kernel, grid, args, kwargs) of the launch: what :func:`_launch` runs and the compile report compiles."""
    bsz, c, h, w = x1.shape
    hw = h * w
    x1, sxb, sxc, sxp = bchw_view(x1)
    y2, syb, syc, syp = bchw_view(y2)
    _, sob, soc, sop = bchw_view(out)
    grid = (bsz * cdiv(hw, config.BLOCK_P), cdiv(c, config.BLOCK_C))
    args = (x1, y2, scale, shift, out, hw, c, c // groups if groups else c,
            sxb, sxc, sxp, syb, syc, syp, sob, soc, sop)
    return final_gate_kernel, grid, args, dict(SHUFFLE_G=groups, **config.launch_kwargs())


def _launch(x1, y2, scale, shift, groups, out, config: Config) -> None:
    kernel, grid, args, kwargs = _launch_args(x1, y2, scale, shift, groups, out, config)
    launcher(kernel)[grid](*args, **kwargs)


def _final_gate_impl(x1: torch.Tensor, y2: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor,
                     groups: int, out_channels_last: bool) -> torch.Tensor:
    out = new_output(x1, torch.promote_types(x1.dtype, y2.dtype), out_channels_last)
    if out.numel() == 0:
        return out
    c, hw = x1.shape[1], x1.shape[2] * x1.shape[3]
    cl = is_channels_last(y2)
    heur = elementwise_heuristic(c, hw, cl)

    def bench(cfg: Config) -> float:
        return autotune.bench_ms(lambda: _launch(x1, y2, scale, shift, groups, out, cfg))

    key = (c, next_pow2(hw), autotune.batch_bucket(x1.shape[0], hw), str(x1.dtype), str(y2.dtype),
           is_channels_last(x1), cl, out_channels_last, groups)
    with on_device(x1):  # the tensors' device, for tuning and launch
        cfg = autotune.select("final_gate", key, heur, lambda: elementwise_candidates(c, hw, cl), bench,
                              device_index(x1))
        _launch(x1, y2, scale, shift, groups, out, cfg)
    return out


def _fake(x1, y2, scale, shift, groups, out_channels_last):
    fmt = torch.channels_last if out_channels_last else torch.contiguous_format
    return torch.empty_like(x1, dtype=torch.promote_types(x1.dtype, y2.dtype), memory_format=fmt)


def _setup_context(ctx, inputs, output) -> None:
    x1, y2, scale, shift, groups, _ = inputs
    ctx.groups = groups
    ctx.save_for_backward(x1, y2, scale, shift)


def _backward(ctx, dout):
    """dx1 = dout * s; dt = unshuffle(dout * x1 * s (1 - s)); dy2 = dt * scale; dscale, dshift summed."""
    x1, y2, scale, shift = ctx.saved_tensors
    g = ctx.groups
    c = x1.shape[1]
    acc = torch.float64 if y2.dtype == torch.float64 else torch.float32
    t = y2.to(acc) * scale.view(1, c, 1, 1) + shift.view(1, c, 1, 1)
    s = shuffle(torch.sigmoid(t), g)
    d = dout.to(acc)
    dx1 = (d * s).to(x1.dtype)
    dt = unshuffle(d * x1.to(acc) * s * (1 - s), g)
    dy2 = (dt * scale.view(1, c, 1, 1)).to(y2.dtype)
    dscale = (dt * y2.to(acc)).sum((0, 2, 3)).to(scale.dtype)
    dshift = dt.sum((0, 2, 3)).to(shift.dtype)
    return dx1, dy2, dscale, dshift, None, None


_op = define_op("final_gate", _final_gate_impl, _fake, _backward, _setup_context) if HAS_TRITON else None


def final_gate(x1: torch.Tensor, y2: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor,
               groups: int = 0, out_channels_last: Optional[bool] = None) -> torch.Tensor:
    """out = x1 * shuffle_groups(sigmoid(scale[c] * y2 + shift[c])) for B x C x H x W x1 and y2.

    ``scale`` and ``shift`` are per-channel vectors (converted to fp32 on the Triton path); ``groups``
    0 means no shuffle. Shapes, dtypes, devices and groups are checked before any kernel runs.
    """
    check_bchw("x1", x1)
    check_bchw("y2", y2, like=x1)
    c = x1.shape[1]
    check_vector("scale", scale, c, x1.device)
    check_vector("shift", shift, c, x1.device)
    if scale is None or shift is None:
        raise TypeError("scale and shift are required")
    groups = int(groups or 0)
    if groups < 0 or (groups and c % groups):
        raise ValueError(f"groups ({groups}) must be 0 (no shuffle) or divide the {c} channels")
    if not use_triton(x1):
        return final_gate_torch(x1, y2, scale, shift, groups)
    if out_channels_last is None:
        out_channels_last = is_channels_last(x1)
    args = (x1, y2, scale.float().contiguous(), shift.float().contiguous(), groups, bool(out_channels_last))
    return _final_gate_impl(*args) if call_directly(*args[:4]) else _op(*args)
