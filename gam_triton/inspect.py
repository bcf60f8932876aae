"""What a GAM block computes, map by map: :func:`attention_maps`.

    from gam_triton.inspect import attention_maps
    maps = attention_maps(module, x)        # module: a gam_triton.GAM or any block GAM.from_module accepts
    maps.channel_gate, maps.spatial_map     # B x C x H x W each

A GAM block multiplies its input twice (``shared/GAM_NOTES.md``)::

    x1  = x  * channel_gate      channel_gate = g(W2 relu(W1 x + b1) + b2), g = sigmoid or identity
    out = x1 * spatial_map       spatial_map  = shuffle(sigmoid(BN2(conv2(relu(BN1(conv1(x1)))))))

The maps are computed from the module's own layers (its ``nn.Linear``, ``nn.Conv2d`` and
``nn.BatchNorm2d`` children, whatever the form names them) with the form's gate and shuffle: a
gam_triton GAM's ``channel_sigmoid`` / ``shuffle_groups``, or, for any other module, the form that
:meth:`gam_triton.GAM.from_module` finds by experiment. Then the module itself is run (``module(x)``: the
reference's forward, or gam_triton's kernels where they run), and ``residual`` = max |module(x) - x1 *
spatial_map| says that the maps drawn are the ones the block really applies (a block with a tail, a module
run after GAM such as the adaptive form's ``channel_adjust``: max |module(x) - tail(x1 * spatial_map)|). Eval
mode only: in train mode BatchNorm would use (and update) batch statistics.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from . import forms, reference
from .ops._runtime import check_bchw
from .module import GAM

__all__ = ["AttentionMaps", "attention_maps"]


@dataclass(frozen=True)
class AttentionMaps:
    """The two attentions of one GAM call, each B x C x H x W, and how the block combined them."""

    channel_gate: torch.Tensor  #: what multiplies x (per pixel and channel)
    spatial_map: torch.Tensor   #: what multiplies x1 (after the sigmoid and the shuffle)
    x1: torch.Tensor            #: x * channel_gate
    out: torch.Tensor           #: module(x), as the module computes it (after its tail, if it has one)
    channel_sigmoid: bool       #: the form: sigmoid on the channel branch
    shuffle_groups: Optional[int]  #: the form: spatial map shuffled in this many groups (None: no shuffle)
    residual: float             #: max |out - tail(x1 * spatial_map)| (no tail: the identity): ~0 when the
    #:                             maps are the ones applied


def _form(module: nn.Module) -> tuple[tuple, bool, Optional[int], Optional[nn.Module]]:
    """(six layers, channel sigmoid, shuffle groups, tail or None) of a GAM block."""
    if isinstance(module, GAM):
        tail = getattr(module, "tail_name", None)
        return (module._layers(), module.channel_sigmoid, module.shuffle_groups,
                None if tail is None else module.get_submodule(tail))
    found = forms.structure(module)  # ValueError for what is not a GAM block
    sigmoid, groups = forms.detect_form(module, found)
    return found.layers, sigmoid, groups, None if found.tail is None else module.get_submodule(found.tail)


@torch.no_grad()
def attention_maps(module: nn.Module, x: torch.Tensor) -> AttentionMaps:
    """The channel gate and the spatial map ``module`` applies to ``x`` (B x C x H x W), in eval mode.

    ``module``: a :class:`gam_triton.GAM` or any GAM block :meth:`gam_triton.GAM.from_module` accepts.
    Raises ``TypeError`` for a non-module, a non-tensor or a non-floating-point input; ``ValueError`` for
    what is not a GAM block, a module or any layer of it in train mode, an input that is not B x C x H x W
    with the module's channel count.
    """
    if not isinstance(module, nn.Module):
        raise TypeError(f"attention_maps: expected an nn.Module, got {type(module).__name__}")
    check_bchw("attention_maps: x", x)
    if module.training:
        raise ValueError("attention_maps: the module is in train mode (BatchNorm would use and update batch "
                         "statistics): call .eval() first")
    training = next((name for name, m in module.named_modules() if m.training), None)
    if training is not None:  # a layer left training in an eval block (per-layer modes are kept on conversion)
        raise ValueError(f"attention_maps: {training} of the module is in train mode (a BatchNorm would use and "
                         "update batch statistics): call .eval() on the module first")
    layers, sigmoid, shuffle, tail = _form(module)
    fc1, fc2, conv1, bn1, conv2, bn2 = layers
    if x.shape[1] != fc1.in_features:
        raise ValueError(f"attention_maps: the block has {fc1.in_features} channels, x has shape {tuple(x.shape)}")
    a = fc2(F.relu(fc1(x.permute(0, 2, 3, 1)))).permute(0, 3, 1, 2)
    gate = torch.sigmoid(a) if sigmoid else a
    x1 = x * gate
    spatial = reference.shuffle(torch.sigmoid(bn2(conv2(F.relu(bn1(conv1(x1)))))), shuffle or 0)
    out = module(x)
    want = x1 * spatial if tail is None else tail(x1 * spatial)
    residual = (out.float() - want.float()).abs().max().item() if out.numel() else 0.0
    return AttentionMaps(gate.contiguous(), spatial.contiguous(), x1, out, sigmoid, shuffle, residual)
