"""BatchNorm2d as a per-channel affine (scale, shift), exactly as ``nn.BatchNorm2d`` behaves.

* :func:`bn_scale_shift` - scale = gamma / sqrt(var + eps), shift = beta - mean * scale, from the running
  statistics in eval mode or from the batch statistics in train mode (or when the module tracks none), in
  which case the running statistics are updated like ``nn.BatchNorm2d`` does (momentum or cumulative
  average, unbiased variance, ``num_batches_tracked``). Differentiable through the batch statistics.
* :func:`fold_conv_bn` - the weights and bias of ``bn(conv(x))`` as one convolution (eval mode).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn


def uses_batch_stats(bn: nn.BatchNorm2d) -> bool:
    """True when ``bn`` normalises with the statistics of the batch (as nn.BatchNorm2d decides)."""
    return bn.training or bn.running_mean is None or bn.running_var is None


def _stat_dtype(y: torch.Tensor) -> torch.dtype:
    return torch.float64 if y.dtype == torch.float64 else torch.float32


def bn_scale_shift(bn: nn.BatchNorm2d, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel (scale, shift) with bn(y) == scale * y + shift, in fp32 (fp64 for fp64 ``y``)."""
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
    if bn.momentum is None:  # cumulative moving average
        factor = 1.0 / float(bn.num_batches_tracked)
    else:
        factor = bn.momentum
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
