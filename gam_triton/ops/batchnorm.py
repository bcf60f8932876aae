"""BatchNorm2d on batch statistics, as GAM trains it (kernels: ``kernels/batchnorm.py``): the forward's
statistics (running statistics updated in the kernel, as ``nn.BatchNorm2d`` does) and the backward's two
launches (per-channel reductions, then the elementwise pass), with the ReLU mask (BN1) or the sigmoid, shuffle
and final gate (BN2) folded in. Used by the fused train block only (:mod:`gam_triton.ops.train_block`).

Reductions are deterministic: per-tile fp32 partials and integer counters ("the last program finalises", no
float atomics). The counters must be zero at launch and are left zero. All three kernels launch with the
heuristic tile: the reductions bump counters, so they are never timed, and the elementwise pass shares the
reduction's tile (it is memory-bound, like the elementwise ops, whose tuning has yet to show a GPU gain).
"""
from __future__ import annotations

from typing import Optional

import torch

from . import _runtime
from ._runtime import HAS_TRITON, TARGET, bchw_view, is_channels_last, new_output, next_pow2

if HAS_TRITON:
    import triton
    from triton import cdiv

    from ..kernels.batchnorm import bn_bwd_apply_kernel, bn_bwd_reduce_kernel, bn_stats_kernel

__all__ = ["stats", "backward", "counter_slots", "heuristic", "stats_launch_args", "reduce_launch_args",
           "apply_launch_args"]


def heuristic(C: int, N: int, channels_last: bool, target: str = TARGET, gather: bool = False) -> "triton.Config":
    """A tile over N = B*H*W pixels: 2048 elements over 8 warps (8 per thread: these kernels hold up to three
    64-bit pointer tiles, which spill beyond), longer along the contiguous dimension; half the pixels where the
    tile gathers through the shuffle (``gather``: the BN2 backward; its reduction spilled 8 B at 64 registers
    in half precision channels_last on sm_80, Triton 3.6); interpreter: few large programs."""
    if target == "interpreter":
        return triton.Config(dict(BLOCK_P=min(1024, max(16, next_pow2(N))), BLOCK_C=min(64, max(16, next_pow2(C)))),
                             num_warps=4, num_stages=1)
    if channels_last:
        bc = max(16, min(64, next_pow2(C)))
        bp = max(16, min(2048 // bc, next_pow2(N)))
    else:
        bp = max(16, min(128, next_pow2(N)))
        bc = max(16, min(2048 // bp, next_pow2(C)))
    # Before Triton 3.6, maxnreg 128: without it ptxas held 40-56 registers and spilled 8-16 B (the statistics in
    # fp32, BN1's backward reduction, channels_last, Triton 3.4; 4 warps spilled too); with it 38-77, none.
    return triton.Config(dict(BLOCK_P=max(16, bp // 2) if gather else bp, BLOCK_C=bc),
                         num_warps=8 if bp * bc >= 2048 else 4, num_stages=1,
                         maxnreg=128 if _runtime.TRITON < (3, 6) else None)


def _tile(y: torch.Tensor, gather: bool = False) -> "triton.Config":
    return heuristic(y.shape[1], y.shape[0] * y.shape[2] * y.shape[3], is_channels_last(y), gather=gather)


def counter_slots(channels: int) -> int:
    """Counters one reduction over ``channels`` channels may need: one per channel block (at least 16 channels
    each, whatever the tile) and one."""
    return -(-channels // 16) + 1


def _geometry(c: int, n: int, cfg: "triton.Config") -> tuple[int, int]:
    """(n_parts, n_cblocks): the grid of a reduction over n pixels and c channels."""
    return cdiv(n, cfg.kwargs["BLOCK_P"]), cdiv(c, cfg.kwargs["BLOCK_C"])


def stats_launch_args(y, weight, bias, running: tuple, eps: float, momentum: float, update: bool, counts, out,
                      cfg: "triton.Config") -> tuple:
    """(kernel, grid, args, kwargs) of the statistics launch (its partials buffer allocated here: args[1])."""
    b, c, h, w = y.shape
    n_parts, n_cb = _geometry(c, b * h * w, cfg)
    part = torch.empty(n_parts, 2, c, dtype=torch.float32, device=y.device)
    yv, syb, syc, syp = bchw_view(y)
    args = (yv, part, counts, out, out if weight is None else weight, out if bias is None else bias,
            *(t if update else out for t in running), b * h * w, h * w, c, syb, syc, syp, float(eps),
            float(max(momentum, 0.0)))
    kwargs = dict(HAS_WEIGHT=weight is not None, HAS_BIAS=bias is not None, UPDATE=bool(update),
                  CUMULATIVE=momentum < 0, **_runtime.config_kwargs(cfg))
    return bn_stats_kernel, (n_parts, n_cb), args, kwargs


def stats(y: torch.Tensor, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor], running: tuple,
          eps: float, momentum: float, update: bool, counts: torch.Tensor) -> torch.Tensor:
    """[4, C] fp32 = (mean, invstd, scale, shift) of y's batch statistics, the running ones updated when
    ``update``. ``running`` = (running_mean, running_var, num_batches_tracked); momentum < 0 means None
    (cumulative average); ``counts``: zeroed int32 counters (:func:`counter_slots`)."""
    out = torch.empty(4, y.shape[1], dtype=torch.float32, device=y.device)
    cfg = _tile(y)
    _runtime.launch(*stats_launch_args(y, weight, bias, running, eps, momentum, update, counts, out, cfg))
    return out


def _views(g, x1, y) -> tuple:
    """(gv, xv, yv, strides of g, of x1 (g's when absent), of y) of the backward's launches."""
    gv, *sg = bchw_view(g)
    yv, *sy = bchw_view(y)
    xv, *sx = (gv, *sg) if x1 is None else bchw_view(x1)
    return gv, xv, yv, (*sg, *sx, *sy)


def reduce_launch_args(mode: int, g, x1, y, st, coef, dweight, dbias, groups: int, counts,
                       cfg: "triton.Config") -> tuple:
    """(kernel, grid, args, kwargs) of the backward's reduction (its partials allocated here: args[4])."""
    b, c, h, w = y.shape
    n_parts, n_cb = _geometry(c, b * h * w, cfg)
    part = torch.empty(n_parts, 2, c, dtype=torch.float32, device=y.device)
    gv, xv, yv, strides = _views(g, x1, y)
    args = (gv, xv, yv, st, part, counts, coef, coef if dweight is None else dweight, coef if dbias is None else dbias,
            b * h * w, h * w, c, c // groups if groups else c, *strides)
    kwargs = dict(MODE=mode, SHUFFLE_G=groups, HAS_WEIGHT=dweight is not None, HAS_BIAS=dbias is not None,
                  **_runtime.config_kwargs(cfg))
    return bn_bwd_reduce_kernel, (n_parts, n_cb), args, kwargs


def apply_launch_args(mode: int, g, x1, y, st, coef, dy, dx1, groups: int, cfg: "triton.Config") -> tuple:
    """(kernel, grid, args, kwargs) of the backward's elementwise pass writing dy (and dx1 in mode 1)."""
    b, c, h, w = y.shape
    gv, xv, yv, strides = _views(g, x1, y)
    _, *sd = bchw_view(dy)
    _, *se = (None, *sd) if dx1 is None else bchw_view(dx1)
    args = (gv, xv, yv, st, coef, dy, dy if dx1 is None else dx1, b * h * w, h * w, c, c // groups if groups else c,
            *strides, *sd, *se)
    grid = (cdiv(b * h * w, cfg.kwargs["BLOCK_P"]), cdiv(c, cfg.kwargs["BLOCK_C"]))
    return bn_bwd_apply_kernel, grid, args, dict(MODE=mode, SHUFFLE_G=groups, **_runtime.config_kwargs(cfg))


def backward(mode: int, g: torch.Tensor, x1: Optional[torch.Tensor], y: torch.Tensor, st: torch.Tensor,
             weight: Optional[torch.Tensor], bias: Optional[torch.Tensor], groups: int,
             counts: torch.Tensor) -> tuple:
    """BatchNorm's backward on batch statistics: (dy, dx1 or None, dweight or None, dbias or None).

    mode 0: BN1 + ReLU, g = dz (the gradient of relu(BN(y))). mode 1: BN2 + sigmoid + shuffle + final gate,
    g = dout and x1 the gate's other input; dx1 = dout * s is returned too. ``st``: :func:`stats`' output.
    """
    c = y.shape[1]
    coef = torch.empty(2, c, dtype=torch.float32, device=y.device)
    dweight = None if weight is None else torch.empty_like(weight)
    dbias = None if bias is None else torch.empty_like(bias)
    cfg = _tile(y, gather=mode == 1)
    _runtime.launch(*reduce_launch_args(mode, g, x1, y, st, coef, dweight, dbias, groups, counts, cfg))
    dy = new_output(y.shape, y, y.dtype, is_channels_last(y))
    dx1 = None if mode == 0 else new_output(x1.shape, x1, x1.dtype, is_channels_last(x1))
    _runtime.launch(*apply_launch_args(mode, g, x1, y, st, coef, dy, dx1, groups, cfg))
    return dy, dx1, dweight, dbias
