"""BatchNorm-apply + ReLU op: z = relu(scale[c] * y + shift[c]) between GAM's two convolutions.

Used in train mode, where BatchNorm1 runs on batch statistics and cannot be folded into conv1.
:func:`bn_relu` runs the Triton kernel (``kernels/bn_relu.py``) on CUDA / under the interpreter and
PyTorch elsewhere; ``gam_triton::bn_relu`` is the ``triton_op`` with its autograd formula.
"""
from __future__ import annotations

import torch

from . import autotune
from ._runtime import (HAS_TRITON, bchw_view, call_directly, check_bchw, check_vector, define_op, device_index,
                       is_channels_last, launcher, new_output, on_device, use_triton)
from .configs import Config, elementwise_candidates, elementwise_heuristic, next_pow2

if HAS_TRITON:
    from triton import cdiv

    from .kernels.bn_relu import bn_relu_kernel

__all__ = ["bn_relu", "bn_relu_torch"]


def bn_relu_torch(y: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """PyTorch BatchNorm-apply + ReLU, differentiable."""
    c = y.shape[1]
    return torch.relu(torch.addcmul(shift.view(1, c, 1, 1), y, scale.view(1, c, 1, 1)).to(y.dtype))


def _launch_args(y, scale, shift, z, config: Config):
    """(kernel, grid, args, kwargs) of the launch: what :func:`_launch` runs and the compile report compiles."""
    bsz, c, h, w = y.shape
    hw = h * w
    y, syb, syc, syp = bchw_view(y)
    _, szb, szc, szp = bchw_view(z)
    grid = (bsz * cdiv(hw, config.BLOCK_P), cdiv(c, config.BLOCK_C))
    args = (y, scale, shift, z, hw, c, syb, syc, syp, szb, szc, szp)
    return bn_relu_kernel, grid, args, config.launch_kwargs()


def _launch(y, scale, shift, z, config: Config) -> None:
    kernel, grid, args, kwargs = _launch_args(y, scale, shift, z, config)
    launcher(kernel)[grid](*args, **kwargs)


def _bn_relu_impl(y: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    cl = is_channels_last(y)
    z = new_output(y, y.dtype, cl)
    if z.numel() == 0:
        return z
    c, hw = y.shape[1], y.shape[2] * y.shape[3]
    heur = elementwise_heuristic(c, hw, cl)

    def bench(cfg: Config) -> float:
        return autotune.bench_ms(lambda: _launch(y, scale, shift, z, cfg))

    key = (c, next_pow2(hw), autotune.batch_bucket(y.shape[0], hw), str(y.dtype), cl)
    with on_device(y):  # the tensors' device, for tuning and launch
        cfg = autotune.select("bn_relu", key, heur, lambda: elementwise_candidates(c, hw, cl), bench,
                              device_index(y))
        _launch(y, scale, shift, z, cfg)
    return z


def _fake(y, scale, shift):
    fmt = torch.channels_last if is_channels_last(y) else torch.contiguous_format
    return torch.empty_like(y, memory_format=fmt)


def _setup_context(ctx, inputs, output) -> None:
    y, scale, shift = inputs
    ctx.save_for_backward(y, scale, shift)


def _backward(ctx, dz):
    y, scale, shift = ctx.saved_tensors
    c = y.shape[1]
    acc = torch.float64 if y.dtype == torch.float64 else torch.float32
    yf = y.to(acc)
    d = dz.to(acc) * ((yf * scale.view(1, c, 1, 1) + shift.view(1, c, 1, 1)) > 0)
    dy = (d * scale.view(1, c, 1, 1)).to(y.dtype)
    return dy, (d * yf).sum((0, 2, 3)).to(scale.dtype), d.sum((0, 2, 3)).to(shift.dtype)


_op = define_op("bn_relu", _bn_relu_impl, _fake, _backward, _setup_context) if HAS_TRITON else None


def bn_relu(y: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """z = relu(scale[c] * y + shift[c]) for a B x C x H x W ``y``; z keeps y's dtype and layout."""
    check_bchw("y", y)
    if scale is None or shift is None:
        raise TypeError("scale and shift are required")
    check_vector("scale", scale, y.shape[1], y.device)
    check_vector("shift", shift, y.shape[1], y.device)
    if not use_triton(y):
        return bn_relu_torch(y, scale, shift)
    args = (y, scale.float().contiguous(), shift.float().contiguous())
    return _bn_relu_impl(*args) if call_directly(*args) else _op(*args)
