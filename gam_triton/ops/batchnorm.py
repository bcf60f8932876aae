"""BatchNorm2d on batch statistics, as GAM trains it (kernels: ``kernels/batchnorm.py``): the forward's
statistics (running statistics updated in the kernel, as ``nn.BatchNorm2d`` does) and the backward's two
launches (per-channel reductions, then the elementwise pass), with the ReLU mask (BN1) or the sigmoid, shuffle
and final gate (BN2) folded in. Used by the fused train block only (:mod:`gam_triton.ops.train_block`).

The three kernels run on persistent grids sized to the device (:func:`programs`: one wave at full occupancy,
from the SM count; :data:`_runtime.DEFAULT_SMS` without a GPU), each program looping over its pixel tiles; a
reduction's programs get enough tiles that the busiest (the last one, which also combines the partials)
executes at most 4x the median's loads.
Reductions are deterministic: per-program fp32 partials and integer counters, combined by a two-level tree of
fixed shape (at most two serial steps of 32 rows: see ``kernels/batchnorm.py``), no float atomics. For a given
SM count the sums are bitwise reproducible; GPUs with different SM counts partition the pixels differently and
may differ in the last bits. The counters must be zero at launch and are left zero. All three kernels launch
with the heuristic tile: the reductions bump counters, so they are never timed, and the elementwise pass
runs the reduction's tile on fewer warps (:func:`apply_config`; it is memory-bound, like the elementwise ops,
whose tuning has yet to show a GPU gain). BatchNorm2's backward reads y and writes dy through the channel
shuffle as contiguous runs of channels where y is channels_last (``kernels/shuffle.py``), else gathers.
"""
from __future__ import annotations

from typing import Optional

import torch

from . import _runtime
from ._runtime import HAS_TRITON, TARGET, bchw_view, is_channels_last, new_output, next_pow2
from .elementwise import MIN_PER_THREAD, MIN_WAVE, shuffle_runs

if HAS_TRITON:
    import triton
    from triton import cdiv

    from ..kernels.batchnorm import bn_bwd_apply_kernel, bn_bwd_reduce_kernel, bn_stats_kernel

__all__ = ["stats", "backward", "counter_slots", "heuristic", "programs", "stats_launch_args", "reduce_launch_args",
           "apply_launch_args", "apply_config", "GROUP", "MAX_PROGRAMS"]

#: Programs per group of the reductions' finalisation tree (``kernels.batchnorm.GROUP``: rows per step).
GROUP = 32
#: The most programs per channel block: GROUP groups of GROUP, so each level of the tree is one step.
MAX_PROGRAMS = GROUP * GROUP


def heuristic(C: int, N: int, channels_last: bool, target: str = TARGET, shuffled: bool = False,
              sms: Optional[int] = None) -> "triton.Config":
    """A tile over N = B*H*W pixels: 2048 elements over 8 warps (8 per thread: these kernels hold up to three
    64-bit pointer tiles, which spill beyond), longer along the contiguous dimension; half the pixels where the
    tile goes through the shuffle (``shuffled``: the BN2 backward; gathered, its reduction spilled 8 B at 64
    registers in half precision channels_last on sm_80, Triton 3.6; read as runs at 2048 elements, its
    elementwise pass took 200-230 registers on sm_90, Triton 3.9); halved again (channels first: more channel blocks
    keep a reduction's programs balanced where more programs per block would not; down to
    :data:`MIN_PER_THREAD` elements per thread) while
    there are fewer tiles than CTAs in one full-occupancy wave of ``sms`` SMs (default: this device's,
    :func:`_runtime.sm_count`), so that the persistent grid (:func:`programs`) is that wave; interpreter:
    few large programs."""
    if target == "interpreter":
        return triton.Config(dict(BLOCK_P=min(1024, max(16, next_pow2(N))), BLOCK_C=min(64, max(16, next_pow2(C)))),
                             num_warps=4, num_stages=1)
    if channels_last:
        bc = max(16, min(64, next_pow2(C)))
        bp = max(16, min(2048 // bc, next_pow2(N)))
    else:
        bp = max(16, min(128, next_pow2(N)))
        bc = max(16, min(2048 // bp, next_pow2(C)))
    warps = 8 if bp * bc >= 2048 else 4
    if shuffled:
        bp = max(16, bp // 2)
    slots = (_runtime.sm_count() if sms is None else sms) * _runtime.max_ctas(warps)
    while bp * bc // 2 >= MIN_PER_THREAD * 32 * warps and cdiv(N, bp) * cdiv(C, bc) < slots:
        if bc > 16:
            bc //= 2
        elif bp > 16:
            bp //= 2
        else:
            break
    # maxnreg 128: without it ptxas held 40-64 registers and spilled 8-16 B (the statistics in fp32, BN1's backward
    # reduction, channels_last, Triton 3.4, 4 warps too; the statistics under autocast, sm_80, Triton 3.6); with
    # it 38-80, none on 3.4, 3.6 and 3.9.
    return triton.Config(dict(BLOCK_P=bp, BLOCK_C=bc), num_warps=warps, num_stages=1,
                         maxnreg=128)


def apply_config(cfg: "triton.Config", n: int, c: int, sms: Optional[int] = None) -> "triton.Config":
    """The elementwise pass's launch over n pixels and c channels: the reduction's tile over fewer warps, 8
    elements per thread (at 4 per thread the pass held 8-19 KB in flight per SM at C256 40x40 B16; at 8, 23-70 KB
    on sm_80/90/100, Triton 3.4-3.9), as long as its tiles still fill :data:`MIN_WAVE` of a full-occupancy wave
    of ``sms`` SMs (more warps per CTA otherwise, up to the reduction's); without the reductions' register cap
    before Triton 3.6 (at 128 it spilled 8-16 B on 3.4)."""
    bp, bc = cfg.kwargs["BLOCK_P"], cfg.kwargs["BLOCK_C"]
    tiles, sms = cdiv(n, bp) * cdiv(c, bc), (_runtime.sm_count() if sms is None else sms)
    warps = max(1, min(cfg.num_warps, bp * bc // 256))
    while warps < cfg.num_warps and tiles < MIN_WAVE * sms * _runtime.max_ctas(warps):
        warps *= 2
    return triton.Config(dict(cfg.kwargs), num_warps=warps, num_stages=1)


#: Loads the last program of a reduction executes besides its tiles (load instructions, as the compile check
#: counts them): both tree levels' partial rows (two loads each), and in the statistics the affine parameters and
#: the running statistics (weight, bias, running mean and variance, num_batches_tracked).
TREE_LOADS = {"stats": 2 * 2 + 5, "reduce": 2 * 2}


def programs(n_tiles: int, n_cblocks: int, num_warps: int, sms: Optional[int] = None, tensors: int = 0,
             tree_loads: int = 0) -> int:
    """P, the programs per channel block of a persistent grid (P, n_cblocks) over ``n_tiles`` pixel tiles: one
    wave at full occupancy (``sms`` x 64 warps, default this device's SM count) shared by the channel blocks,
    at most one program per tile and, for a reduction, at most :data:`MAX_PROGRAMS` (two one-step levels of
    finalisation). Where registers allow fewer CTAs per SM the grid runs in 64 / (num_warps x CTAs per SM)
    rounds: 1, or >= 4/3; a smaller grid is rounded to whole waves (:func:`_runtime.whole_waves`).

    ``tensors`` > 0 (a reduction loading that many tiles per step, and ``tree_loads`` more in the program that
    finalises, :data:`TREE_LOADS`): the first P of p0, T // 2, T // 3, ... (P <= p0) at which the busiest
    program (ceil(T / P) steps and the tree) executes at most 4x the load instructions of the median program,
    but no P under :data:`MIN_WAVE` of a full-occupancy wave unless p0 is: where a program holds one or two tiles
    (BN1 at C64 80x80 B16; B1) balance would leave most SMs idle, and the grid keeps MIN_WAVE of a wave with the
    busiest program up to 11x the median (the tree's 9 loads against 1-2 tiles)."""
    sms = _runtime.sm_count() if sms is None else sms
    cap = MAX_PROGRAMS if tensors else n_tiles
    wave = sms * _runtime.max_ctas(num_warps)
    p0 = max(1, min(n_tiles, cap, wave // max(1, n_cblocks)))
    floor, best = (MIN_WAVE * wave if p0 * n_cblocks >= MIN_WAVE * wave else 0), None
    for k in range(max(1, n_tiles // p0), n_tiles + 1):
        p = p0 if k == n_tiles // p0 else max(1, min(p0, n_tiles // k))
        p = _runtime.whole_waves(p, n_cblocks, num_warps, sms)
        if best is not None and p * n_cblocks < floor:
            return best  # balance would cost most of the wave: the most balanced grid still filling MIN_WAVE
        tiles, extra = n_tiles // p, n_tiles % p  # ``extra`` programs hold tiles + 1
        median = tiles + 1 if 2 * extra > p else tiles
        if not tensors or (tiles + (extra > 0)) * tensors + tree_loads <= 4 * median * tensors:
            return p
        best = p
    return best or 1


def _tile(y: torch.Tensor, shuffled: bool = False) -> "triton.Config":
    return heuristic(y.shape[1], y.shape[0] * y.shape[2] * y.shape[3], is_channels_last(y), shuffled=shuffled)


def counter_slots(channels: int) -> int:
    """Counters one reduction over ``channels`` channels may need: per channel block (at least 16 channels
    each, whatever the tile) one for the tree's top and one per group (at most GROUP), and one."""
    return -(-channels // 16) * (GROUP + 1) + 1


def _geometry(c: int, n: int, cfg: "triton.Config", device, tensors: int = 0, tree_loads: int = 0) -> tuple[int, int]:
    """(P, n_cblocks): the persistent grid of a kernel over n pixels and c channels on ``device`` (``tensors``:
    what a reduction reads per tile, :func:`programs`)."""
    n_cb = cdiv(c, cfg.kwargs["BLOCK_C"])
    bp = cfg.kwargs["BLOCK_P"]
    return programs(cdiv(n, bp), n_cb, cfg.num_warps, _runtime.sm_count(device), tensors, tree_loads), n_cb


def _partials(p: int, c: int, device) -> torch.Tensor:
    """The reductions' scratch: P program partials, then cdiv(P, GROUP) group partials, [rows, 2, C] fp32."""
    return torch.empty(p + cdiv(p, GROUP), 2, c, dtype=torch.float32, device=device)


def stats_launch_args(y, weight, bias, running: tuple, eps: float, momentum: float, update: bool, counts, out,
                      cfg: "triton.Config") -> tuple:
    """(kernel, grid, args, kwargs) of the statistics launch (its partials buffer allocated here: args[1])."""
    b, c, h, w = y.shape
    n_parts, n_cb = _geometry(c, b * h * w, cfg, y.device, tensors=1, tree_loads=TREE_LOADS["stats"])
    part = _partials(n_parts, c, y.device)
    yv, syb, syc, syp = bchw_view(y)
    args = (yv, part, counts, out, out if weight is None else weight, out if bias is None else bias,
            *(t if update else out for t in running), b * h * w, h * w, c, syb, syc, syp, float(eps),
            float(max(momentum, 0.0)))
    kwargs = dict(HAS_WEIGHT=weight is not None, HAS_BIAS=bias is not None, UPDATE=bool(update),
                  CUMULATIVE=momentum < 0, Y_ALIGN=_runtime.view_alignment(h * w, c, syb, syc, syp),
                  **_runtime.config_kwargs(cfg))
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


def _triples(strides: tuple) -> list:
    """The (stride_b, stride_c, stride_p) of each view in :func:`_views`' flat strides."""
    return [strides[i:i + 3] for i in range(0, len(strides), 3)]


def _runs(mode: int, groups: int, cfg: "triton.Config", y: torch.Tensor) -> bool:
    """BN2's backward (mode 1) reads y and writes dy as contiguous runs of channels through the shuffle."""
    return mode == 1 and shuffle_runs(groups, cfg.kwargs["BLOCK_C"], y)


def reduce_launch_args(mode: int, g, x1, y, st, coef, dweight, dbias, groups: int, counts,
                       cfg: "triton.Config") -> tuple:
    """(kernel, grid, args, kwargs) of the backward's reduction (its partials allocated here: args[4])."""
    b, c, h, w = y.shape
    n_parts, n_cb = _geometry(c, b * h * w, cfg, y.device, tensors=2 + mode, tree_loads=TREE_LOADS["reduce"])
    part = _partials(n_parts, c, y.device)
    gv, xv, yv, strides = _views(g, x1, y)
    args = (gv, xv, yv, st, part, counts, coef, coef if dweight is None else dweight, coef if dbias is None else dbias,
            b * h * w, h * w, c, c // groups if groups else c, *strides)
    kwargs = dict(MODE=mode, SHUFFLE_G=groups, RUNS=_runs(mode, groups, cfg, y), HAS_WEIGHT=dweight is not None,
                  HAS_BIAS=dbias is not None, **_runtime.view_alignments("GXY", h * w, c, *_triples(strides)),
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
    cfg = apply_config(cfg, b * h * w, c, _runtime.sm_count(y.device))
    grid = _geometry(c, b * h * w, cfg, y.device)
    return bn_bwd_apply_kernel, grid, args, dict(MODE=mode, SHUFFLE_G=groups, RUNS=_runs(mode, groups, cfg, y),
                                                 **_runtime.view_alignments("GXYDE", h * w, c, *_triples(strides),
                                                                            sd, se),
                                                 **_runtime.config_kwargs(cfg))


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
    cfg = _tile(y, shuffled=mode == 1)
    _runtime.launch(*reduce_launch_args(mode, g, x1, y, st, coef, dweight, dbias, groups, counts, cfg))
    dy = new_output(y.shape, y, y.dtype, is_channels_last(y))
    dx1 = None if mode == 0 else new_output(x1.shape, x1, x1.dtype, is_channels_last(x1))
    _runtime.launch(*apply_launch_args(mode, g, x1, y, st, coef, dy, dx1, groups, cfg))
    return dy, dx1, dweight, dbias
