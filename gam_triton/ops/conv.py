"""Eval-mode spatial branch of GAM: two Triton implicit-GEMM convolutions with fused epilogues, or cuDNN.

    z1  = relu(conv1(x1) + b1)                                  BatchNorm1 folded into conv1's weight and bias
    out = x1 * shuffle(sigmoid(scale2 * (conv2(z1) + b2) + shift2))

Kernels: ``kernels/conv.py``. Weights are taken packed, [K, K, S*CIN/G, COUT] (:func:`pack_weight`: groups with
fewer than 16 channels merged S at a time into block-diagonal ones, so the K loop's loads are 16-byte vectors).

* :func:`conv_bn_relu` - conv1 + bias + ReLU in one kernel, z1 written once (channels_last); where its grid fills
  under SPLIT_BELOW_WAVES of the device and the K loop is long, split-K (:func:`split_k`): the K loop in SPLIT
  parts writing fp32 partials, then a fixed-order sum + bias + ReLU + cast (two launches, deterministic).
* :func:`conv_gate` - conv2 with the final gate in its epilogue (BN2, sigmoid, channel shuffle, multiply by
  x1): writes the block's output; y2 never exists in memory.
* :func:`spatial_eval` - the whole branch down one of the paths of ``GAM_TRITON_CONV`` (:data:`MODES`, read by
  the module once per call): ``triton`` (the two kernels), ``cudnn`` (two ``F.conv2d``, an in-place ReLU and
  the final-gate kernel) or ``auto``: on a GPU the first call of a shape times the paths ("triton" with its
  tuned tiles, "cudnn", and "cudnn_relu": cuDNN's fused conv + bias + ReLU for conv1) and keeps the fastest,
  ties to cuDNN, through the tuner (op ``spatial``); where nothing can be timed (the interpreter) auto is
  cuDNN; under torch.compile it is the path an eager call of this process chose for the shape, else cuDNN.

Every tuning candidate (a tile, or the Triton path) is first checked against the cuDNN path's output
(:func:`checked`); one that disagrees is dropped with a warning naming it. fp32 dots follow cuDNN's own
fp32 convolutions (``_runtime.fp32_allows_tf32("conv")``, the new or the legacy API): TF32, else 3xTF32.
The ops ``gam_triton::conv_bn_relu`` and ``gam_triton::conv_gate`` have no autograd formula (eval only): the
module runs cuDNN whenever a gradient is needed.
"""
from __future__ import annotations

import os
import warnings
from typing import Optional

import torch
import torch.nn.functional as F

from . import _autotune, _runtime, elementwise
from ._runtime import (HAS_TRITON, KERNEL_DTYPES, TARGET, bchw_view, check_bchw, check_groups, check_vector,
                       is_channels_last, new_output, next_pow2)
from .elementwise import final_gate, run_final_gate

if HAS_TRITON:
    import triton
    from triton import cdiv

    from ..kernels.conv import conv_bn_relu_kernel, conv_gate_kernel, conv_split_kernel, split_sum_kernel

__all__ = ["conv_bn_relu", "conv_gate", "spatial_eval", "spatial_run", "conv_mode", "triton_ok", "checked",
           "CandidateMismatchWarning", "tile_key", "path_key", "pack_weight", "pack_spatial", "merged_groups",
           "unpack_weight", "MODES", "heuristic", "candidates", "precision", "conv1_launch_args", "conv2_launch_args",
           "conv1_heuristic", "conv1_candidates", "conv1_launches", "split_k", "resident_ctas", "SPLITS"]

#: Values of GAM_TRITON_CONV.
MODES = ("auto", "triton", "cudnn")
#: Shared memory the operand tiles may take (bytes, times num_stages).
SMEM_BUDGET = 96 * 1024


def merged_groups(groups: int, cin_g: int, cout_g: int) -> int:
    """How many neighbouring groups of a grouped convolution :func:`pack_weight` merges into one: the divisor S of
    ``groups`` with the least tensor-core work, (groups / S) x pad16(S * cin_g) x pad16(S * cout_g) (tl.dot pads
    its dims to 16); on a tie, one that makes S * cin_g and S * cout_g multiples of 16 (16-byte vector loads in
    the K loop instead of 2-byte ones: the masks' bounds get the divisibility hint), then the smallest.

    YOLO form (groups = rate = 4): conv1 at C64 (16 in / 4 out per group) and conv2 (4 / 16) run dense (S = 4),
    C128's (32 / 8, 8 / 32) in pairs (S = 2), at the padded form's MMA count; 16 or more per group: S = 1."""
    def cost(s: int) -> tuple:
        up = lambda n: -(-n // 16) * 16  # noqa: E731
        work = (groups // s) * up(s * cin_g) * up(s * cout_g)
        return work, (s * cin_g) % 16 != 0 or (s * cout_g) % 16 != 0, s

    best = 1
    for s in range(2, groups + 1):  # a loop, not min(..., key=): torch.compile traces this (eval constants)
        if groups % s == 0 and cost(s) < cost(best):
            best = s
    return best


def _up16(n: int) -> int:
    return -(-n // 16) * 16


def pack_weight(weight: torch.Tensor, groups: int = 1, pad_cout: bool = False, pad_cin: bool = False) -> torch.Tensor:
    """Conv weight [COUT, CIN/G, K, K] of a convolution in ``groups`` groups -> the kernels' layout
    [K, K, CIN_P, G' * COUT_P] (contiguous): each run of S = :func:`merged_groups` groups becomes one group with a
    block-diagonal weight (zeros between the merged groups), G' = G / S; its in- and out-channels (S * CIN/G,
    S * COUT/G) are padded with zero weights to a multiple of 16 when ``pad_cin`` / ``pad_cout`` (the padded
    channel layout of GAM's z1: :func:`pack_spatial`). Unpadded, the same function as ``weight``. The kernels take
    the group count from the input's channels and this layout."""
    cout, cin_g, k, _ = weight.shape
    s = merged_groups(groups, cin_g, cout // groups)
    g2, ci, co = groups // s, s * cin_g, s * (cout // groups)
    if s > 1:
        w = weight.reshape(g2, s, cout // groups, 1, cin_g, k, k)
        diag = torch.eye(s, dtype=torch.bool, device=weight.device).view(1, s, 1, s, 1, 1, 1)
        weight = torch.where(diag, w, w.new_zeros(())).reshape(cout, ci, k, k)
    cip, cop = _up16(ci) if pad_cin else ci, _up16(co) if pad_cout else co
    if (cip, cop) != (ci, co):
        weight = F.pad(weight.reshape(g2, co, ci, k, k), (0, 0, 0, 0, 0, cip - ci, 0, cop - co))
        weight = weight.reshape(g2 * cop, cip, k, k)
    return weight.permute(2, 3, 1, 0).contiguous()


def pack_spatial(w1: torch.Tensor, b1: torch.Tensor, w2: torch.Tensor, groups: int) -> tuple:
    """(conv1's packed weight, its bias, conv2's packed weight) for the Triton path of the spatial branch: groups
    merged (:func:`merged_groups`) and z1's channels per merged group padded to a multiple of 16, with zero
    weights and biases (z1's pad channels are relu(0) = 0, and conv2 weighs them 0): both K loops then load
    16-byte vectors. z1 costs the padding in bytes (C192 g4: 16 channels per group instead of 12), no MMAs:
    the dots pad N (conv1) and K (conv2) to 16 anyway. fp16/bf16 only: fp32 elements load as 4-byte words
    anyway (and a padded fp32 conv2, C640 g4 tf32x3, spilled 12 B on sm_100)."""
    pad = w1.element_size() < 4
    wp1 = pack_weight(w1, groups, pad_cout=pad)
    g2 = w1.shape[1] * groups // wp1.shape[2]
    co, cop = w1.shape[0] // g2, wp1.shape[3] // g2
    bp1 = F.pad(b1.reshape(g2, co), (0, cop - co)).reshape(-1).contiguous()
    return wp1, bp1, pack_weight(w2, groups, pad_cin=pad)


def unpack_weight(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`pack_weight`, as a view (what F.conv2d takes, with the packed layout's groups:
    input channels // packed.shape[2])."""
    return packed.permute(3, 2, 0, 1)


def precision(dtype: torch.dtype) -> str:
    """The dots' INPUT_PRECISION: fp32 follows cuDNN's own fp32 convolutions (``_runtime.fp32_allows_tf32
    ("conv")``: "tf32", else "tf32x3"); half: "tf32" (ignored)."""
    if dtype != torch.float32:
        return "tf32"
    return "tf32" if _runtime.fp32_allows_tf32("conv") else "tf32x3"


def tolerance(dtype: torch.dtype) -> tuple[float, float]:
    """(rtol, atol) within which a Triton candidate must agree with the cuDNN path at tuning time: loose
    enough for rounding and summation order (and TF32), tight enough to catch a wrong kernel."""
    if dtype == torch.float32:
        return (2e-2, 2e-2) if precision(dtype) == "tf32" else (1e-3, 1e-3)
    return (2e-2, 2e-2) if dtype == torch.float16 else (6e-2, 6e-2)


class CandidateMismatchWarning(UserWarning):
    """A tuning candidate was dropped: its output disagreed with the cuDNN path's."""


def checked(op: str, bench, run, reference, tol: tuple[float, float]):
    """``bench`` with each choice first run once and compared with ``reference()`` (computed once): one that
    disagrees is :class:`gam_triton.ops._autotune.Rejected`, with a :class:`CandidateMismatchWarning` naming it
    (compilers misbehave on hardware never tested here: pytorch issue 173068)."""
    ref: list = []

    def check(choice) -> float:
        if not ref:
            ref.append(reference().float())
        got, want = run(choice).float(), ref[0]
        if got.shape != want.shape or not torch.allclose(got, want, rtol=tol[0], atol=tol[1]):
            err = (got - want).abs().max().item() if got.shape == want.shape else float("nan")
            msg = (f"gam_triton: {op} candidate {_autotune.describe(choice)} disagrees with the reference path "
                   f"(max abs error {err:.3g}, rtol {tol[0]}, atol {tol[1]}): dropped")
            warnings.warn(msg, CandidateMismatchWarning, stacklevel=3)
            raise _autotune.Rejected(msg)
        return bench(choice)

    return check


# --- launch choices ------------------------------------------------------------------------------------------
# A tile is BLOCK_P pixels x BLOCK_N output channels (per group), stepping BLOCK_K in-channels. num_warps stays
# 4 for every candidate: PyTorch's Triton convolution gave wrong results with 8 warps for kernels larger than
# 1x1 (pytorch issue 173068); candidates are checked against cuDNN anyway.
def heuristic(cin_g: int, cout_g: int, HW: int, dtype: torch.dtype, target: str = TARGET) -> "triton.Config":
    """A tile for any group shape: blocks >= 16 (tl.dot), padded channels masked."""
    nmax, kmax = max(16, next_pow2(cout_g)), max(16, next_pow2(cin_g))
    if target == "interpreter":  # few, large programs: the interpreter's cost is per program and loop step
        return triton.Config(dict(BLOCK_P=min(64, max(16, next_pow2(HW))), BLOCK_N=min(nmax, 128),
                                  BLOCK_K=min(kmax, 128)), num_warps=4, num_stages=1)
    # 32-channel tiles for <= 16 in-channels per group (narrow, mostly unvectorised loads: a 64-channel tile
    # took 150-180 registers on sm_80) and for 33-63 out-channels per group (64 spilled 24 B on sm_100).
    block_n = min(nmax, 32 if cin_g <= 16 or 32 < cout_g < 64 else 64)
    # fp32 K steps of 16: 32 spilled 4-12 B with tf32x3 dots on sm_100 (C128/C192 at 80x80, 64-pixel tiles).
    block_k = min(kmax, 16 if dtype.itemsize == 4 else 64)
    # 128 pixels only for narrow channel tiles whose in-channel blocks are mostly real (fp32 stays at 64:
    # 128 x 16 spilled 4 B on sm_80 with 48 in-channels per group); 32 for 32-channel tiles over at most 16
    # in-channels per group (64 x 32 x 16 spilled 8-32 B on sm_100, Triton 3.9, ptxas settling at 72 registers).
    wide = block_n <= 16 and cin_g >= 16 and dtype.itemsize < 4
    narrow = block_n >= 32 and cin_g <= 16
    return triton.Config(dict(BLOCK_P=max(16, min(128 if wide else 32 if narrow else 64, next_pow2(HW))),
                              BLOCK_N=block_n, BLOCK_K=block_k), num_warps=4, num_stages=2)


def candidates(cin_g: int, cout_g: int, HW: int, dtype: torch.dtype) -> list:
    """At most MAX_CANDIDATES tiles nearest the heuristic. Dropped: blocks larger than the (power-of-two)
    problem; an fp32 accumulator (BLOCK_P x BLOCK_N) above 64 registers per thread; operand tiles (times
    num_stages) above SMEM_BUDGET. Under the interpreter (timings mean nothing): the heuristic only."""
    heur = heuristic(cin_g, cout_g, HW, dtype)
    if TARGET == "interpreter":
        return [heur]
    nmax, kmax, pmax = max(16, next_pow2(cout_g)), max(16, next_pow2(cin_g)), max(16, next_pow2(HW))
    out = [triton.Config(dict(BLOCK_P=bp, BLOCK_N=bn, BLOCK_K=bk), num_warps=4, num_stages=ns)
           for bp in (16, 32, 64, 128) for bn in (16, 32, 64, 128) for bk in (16, 32, 64) for ns in (2, 3, 4)
           if bp <= pmax and bn <= nmax and bk <= kmax and bp * bn <= 64 * 128
           and ns * (bp * bk + bk * bn) * dtype.itemsize <= SMEM_BUDGET]
    return _runtime.nearest(out, heur)


# --- split-K (conv1) -----------------------------------------------------------------------------------------
#: conv1's split-K factors (its split candidates, as data). The heuristic splits a grid estimated under
#: SPLIT_BELOW_WAVES waves of the device, keeping at least MIN_SPLIT_STEPS K steps per split.
SPLITS = (2, 3, 4, 6, 8)
SPLIT_BELOW_WAVES = 0.6
MIN_SPLIT_STEPS = 32
#: Shared memory per SM less 1 KB (sm_90, sm_100; sm_80 has 164 KB: an estimate either way).
_SMEM_PER_SM = 232448


def resident_ctas(cfg: "triton.Config", dtype: torch.dtype, prec: str = "tf32") -> int:
    """Estimated CTAs per SM of a convolution tile (the compile check's occupancy model on estimated figures):
    shared memory of the operand stages (+1 KB), registers ~ the fp32 accumulator per thread + 40 (+48 for 3xTF32
    dots), 64 warps. Matches sm_90's compile facts for the half-precision 64x64x64 tile (64 registers, 6 CTAs)."""
    bp, bn, bk = (cfg.kwargs[k] for k in ("BLOCK_P", "BLOCK_N", "BLOCK_K"))
    smem = cfg.num_stages * (bp * bk + bk * bn) * dtype.itemsize
    regs = -(-(bp * bn // (32 * cfg.num_warps) + 40 + (48 if prec == "tf32x3" else 0)) // 8) * 8
    return max(1, min(_runtime.register_ctas(regs, cfg.num_warps), _SMEM_PER_SM // (smem + 1024)))


def split_k(programs: int, k_steps: int, slots: int) -> int:
    """conv1's split factor for a grid of ``programs`` CTAs, each ``k_steps`` K steps long, on ``slots`` resident
    CTAs (SMs x :func:`resident_ctas`): 1 when the grid fills SPLIT_BELOW_WAVES or more of them; else, among the
    :data:`SPLITS` that divide ``k_steps`` (equal splits: a clamped last split spilled 8 B on sm_80, Triton 3.4;
    a 7x7 kernel has 49 x in-channel blocks steps) and keep >= MIN_SPLIT_STEPS of them per split, the smallest
    that lifts the grid to >= SPLIT_BELOW_WAVES waves outside (1.0, 1.15] (a lone straggling wave); failing that
    the largest under one wave (more of the device busy); 1 if none."""
    if programs >= SPLIT_BELOW_WAVES * slots:
        return 1
    ok = [s for s in SPLITS if k_steps >= MIN_SPLIT_STEPS * s and k_steps % s == 0]
    for s in ok:
        w = programs * s / slots
        if w >= SPLIT_BELOW_WAVES and not 1.0 < w <= 1.15:
            return s
    return max((s for s in ok if programs * s <= slots), default=1)


def _conv1_grid(cin_g: int, cout_g: int, groups: int, k: int, batch: int, HW: int, tile) -> tuple[int, int]:
    """(CTAs, K steps per CTA) of an unsplit conv1 launch with ``tile``."""
    ctas = max(1, batch) * cdiv(HW, tile.kwargs["BLOCK_P"]) * groups * cdiv(cout_g, tile.kwargs["BLOCK_N"])
    return ctas, k * k * cdiv(cin_g, tile.kwargs["BLOCK_K"])


def _with_split(tile: "triton.Config", split: int) -> "triton.Config":
    if split == 1:
        return tile
    return triton.Config(dict(tile.kwargs, SPLIT=split), num_warps=tile.num_warps, num_stages=tile.num_stages)


def conv1_heuristic(cin_g: int, cout_g: int, groups: int, k: int, batch: int, HW: int, dtype: torch.dtype,
                    prec: str = "tf32", sms: Optional[int] = None, target: Optional[str] = None) -> "triton.Config":
    """conv1's launch: :func:`heuristic`'s tile, plus SPLIT = :func:`split_k` (> 1 only) on a GPU (``sms``:
    default ``_runtime.sm_count()``, 132 off-GPU). fp16/bf16 only: fp32's split kernel (64x64x16 tiles) spilled
    8-28 B on sm_80 and sm_100 (Triton 3.9). The interpreter never splits (tests force it)."""
    target = TARGET if target is None else target
    tile = heuristic(cin_g, cout_g, HW, dtype, target)
    if target == "interpreter" or dtype.itemsize == 4:
        return tile
    ctas, steps = _conv1_grid(cin_g, cout_g, groups, k, batch, HW, tile)
    slots = (_runtime.sm_count() if sms is None else sms) * resident_ctas(tile, dtype, prec)
    return _with_split(tile, split_k(ctas, steps, slots))


def conv1_candidates(cin_g: int, cout_g: int, groups: int, k: int, batch: int, HW: int, dtype: torch.dtype,
                     prec: str = "tf32") -> list:
    """conv1's candidates: :func:`candidates`' tiles (unsplit) and, in fp16/bf16 where the heuristic tile's grid is
    under one estimated wave, that tile split by each of :data:`SPLITS` dividing its K steps and keeping >=
    MIN_SPLIT_STEPS of them per split (the heuristic's split among them); MAX_CANDIDATES in all. Under the
    interpreter: :func:`candidates`."""
    tiles = candidates(cin_g, cout_g, HW, dtype)
    if TARGET == "interpreter":
        return tiles
    tile = heuristic(cin_g, cout_g, HW, dtype)
    ctas, steps = _conv1_grid(cin_g, cout_g, groups, k, batch, HW, tile)
    splits = []
    if dtype.itemsize < 4 and ctas < _runtime.sm_count() * resident_ctas(tile, dtype, prec):
        splits = [_with_split(tile, s) for s in SPLITS if steps >= MIN_SPLIT_STEPS * s and steps % s == 0]
    keep = {_autotune.ident(c) for c in splits}
    tiles = [c for c in tiles if _autotune.ident(c) not in keep]
    return splits + tiles[:max(0, _runtime.MAX_CANDIDATES - len(splits))]


# --- launches ------------------------------------------------------------------------------------------------
def _dims(x: torch.Tensor, wp: torch.Tensor) -> tuple[int, int, int, int, int]:
    """(K, CIN_G, COUT, groups, COUT_G) of a packed weight applied to x."""
    k, _, cin_g, cout = wp.shape
    groups = x.shape[1] // cin_g
    return k, cin_g, cout, groups, cout // groups


def _span(*tensors) -> int:
    """The largest element offset within one image of any of ``tensors`` (B x C x H x W, any strides)."""
    return max(sum((n - 1) * abs(st) for n, st in zip(t.shape[1:], t.stride()[1:])) for t in tensors)


def _kwargs(cfg: "triton.Config", k: int, cin_g: int, dtype: torch.dtype, prec: str, *tensors) -> dict:
    """The constexprs both convolutions take; I64 when an image of any operand spans 2**31 elements."""
    return dict(KSIZE=k, K_BLOCKS=cdiv(cin_g, cfg.kwargs["BLOCK_K"]), INPUT_PRECISION=prec,
                I64=_span(*tensors) >= 2**31 - 1,
                DOT_F32=_runtime.INTERPRET or dtype == torch.float32, **_runtime.config_kwargs(cfg))


def conv1_launch_args(x1, wp, b, z, cfg: "triton.Config", prec: str) -> tuple:
    """(kernel, grid, args, kwargs) of conv1 + bias + ReLU writing z in one launch (a tile without SPLIT)."""
    if cfg.kwargs.get("SPLIT", 1) != 1:
        raise ValueError(f"conv1_launch_args: {_autotune.describe(cfg)} is split-K (conv1_launches)")
    bsz, _, h, w = x1.shape
    k, cin_g, cout, groups, cout_g = _dims(x1, wp)
    n_blocks = cdiv(cout_g, cfg.kwargs["BLOCK_N"])
    _, szb, szc, szp = bchw_view(z)
    grid = (bsz * cdiv(h * w, cfg.kwargs["BLOCK_P"]), groups * n_blocks)
    args = (x1, wp, b, z, h, w, cin_g, cout, cout_g, n_blocks, *x1.stride(), szb, szc, szp)
    return conv_bn_relu_kernel, grid, args, _kwargs(cfg, k, cin_g, wp.dtype, prec, x1, z)


def conv1_launches(x1, wp, b, z, cfg: "triton.Config", prec: str) -> list:
    """The launches, [(kernel, grid, args, kwargs)], of conv1 + bias + ReLU writing z with ``cfg``: one
    (:func:`conv1_launch_args`), or with SPLIT = S > 1 two: :func:`conv_split_kernel` over (B * pixel blocks,
    channel blocks, S) writing an fp32 scratch of S x B x HW x COUT partials (channels last; allocated here,
    NaN-poisoned under GAM_TRITON_POISON), then :func:`split_sum_kernel` summing them in split order + bias +
    ReLU into z, on the elementwise kernels' persistent grid and tile (``elementwise.heuristic``). Extra traffic
    of the split: S x B x HW x COUT x 4 bytes written, then read (26 MB each way at C256 40x40 B16, S = 4)."""
    split = cfg.kwargs.get("SPLIT", 1)
    if split == 1:
        return [conv1_launch_args(x1, wp, b, z, cfg, prec)]
    bsz, _, h, w = x1.shape
    k, cin_g, cout, groups, cout_g = _dims(x1, wp)
    n_blocks = cdiv(cout_g, cfg.kwargs["BLOCK_N"])
    part = torch.empty((split, bsz, h * w, cout), dtype=torch.float32, device=x1.device)
    if _runtime.POISON:
        part.fill_(float("nan"))
    grid = (bsz * cdiv(h * w, cfg.kwargs["BLOCK_P"]), groups * n_blocks, split)
    args = (x1, wp, part, h, w, cin_g, cout, cout_g, n_blocks, *x1.stride())
    first = (conv_split_kernel, grid, args, _kwargs(cfg, k, cin_g, wp.dtype, prec, x1, z))  # z: a partial's span
    _, szb, szc, szp = bchw_view(z)
    scfg = elementwise.heuristic(cout, h * w, True, batch=bsz)
    sgrid = elementwise.programs(bsz, h * w, cout, scfg, x1.device)
    sargs = (part, b, z, bsz, h * w, cout, szb, szc, szp)
    return [first, (split_sum_kernel, sgrid, sargs, dict(SPLIT=split, **_runtime.config_kwargs(scfg)))]


def conv2_launch_args(z1, wp, b, scale, shift, x1, shuffle: int, out, cfg: "triton.Config", prec: str) -> tuple:
    """(kernel, grid, args, kwargs) of conv2 + BN2 + sigmoid + shuffle + gate writing out."""
    bsz, _, h, w = z1.shape
    k, cin_g, cout, groups, cout_g = _dims(z1, wp)
    n_blocks = cdiv(cout_g, cfg.kwargs["BLOCK_N"])
    x1v, sxb, sxc, sxp = bchw_view(x1)
    _, sob, soc, sop = bchw_view(out)
    grid = (bsz * cdiv(h * w, cfg.kwargs["BLOCK_P"]), groups * n_blocks)
    args = (z1, wp, scale if b is None else b, scale, shift, x1v, out, h, w, cin_g, cout, cout_g, n_blocks,
            cout // shuffle if shuffle else cout, *z1.stride(), sxb, sxc, sxp, sob, soc, sop)
    return conv_gate_kernel, grid, args, dict(SHUFFLE_G=shuffle, HAS_BIAS=b is not None,
                                              **_kwargs(cfg, k, cin_g, wp.dtype, prec, z1, x1, out))


def tile_key(x: torch.Tensor, wp: torch.Tensor, extra: tuple, prec: str) -> tuple:
    """A convolution's tuning key: in- and out-channels per group, groups, K, bucketed map and batch, ``extra``
    (conv_gate: shuffle, x1's and the output's layouts), the input's dtype and layout, the dot precision."""
    k, cin_g, _, groups, cout_g = _dims(x, wp)
    return _autotune.key((cin_g, cout_g, groups, k, *_autotune.pixels(x.shape[0], x.shape[2] * x.shape[3]), *extra),
                         x, precision=prec)


def path_key(x1: torch.Tensor, w1: torch.Tensor, groups: int, shuffle: int, out_channels_last: bool) -> tuple:
    """The spatial path choice's key: C, C/r, groups, K, shuffle, bucketed map and batch, output layout, x1's dtype
    and layout, the convolutions' dot precision."""
    hw = x1.shape[2] * x1.shape[3]
    return _autotune.key((x1.shape[1], w1.shape[0], groups, w1.shape[2], shuffle, *_autotune.pixels(x1.shape[0], hw),
                          out_channels_last), x1, precision=precision(x1.dtype))


def _tile(op: str, x: torch.Tensor, wp: torch.Tensor, extra: tuple, go, out: torch.Tensor, reference,
          prec: str) -> "triton.Config":
    """The tile of conv ``op`` over input x: tuned with each candidate checked against ``reference()``;
    conv_bn_relu's may be split-K (:func:`conv1_heuristic`, :func:`conv1_candidates`)."""
    k, cin_g, _, groups, cout_g = _dims(x, wp)
    hw = x.shape[2] * x.shape[3]
    key = tile_key(x, wp, extra, prec)

    def run(cfg) -> torch.Tensor:
        out.fill_(float("nan"))  # a candidate that writes nothing must not pass for the heuristic's output
        go(cfg)
        return out

    bench = checked(op, _autotune.timed(go), run, reference, tolerance(wp.dtype))
    if op == "conv_bn_relu":
        dims = (cin_g, cout_g, groups, k, x.shape[0], hw, wp.dtype, prec)
        return _autotune.select(op, key, lambda: conv1_heuristic(*dims), lambda: conv1_candidates(*dims), bench)
    return _autotune.select(op, key, lambda: heuristic(cin_g, cout_g, hw, wp.dtype),
                            lambda: candidates(cin_g, cout_g, hw, wp.dtype), bench)


def _conv_bn_relu(x1: torch.Tensor, wp: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    bsz, _, h, w = x1.shape
    z = new_output((bsz, wp.shape[3], h, w), x1, wp.dtype, True)
    if z.numel() == 0:
        return z
    k, _, _, groups, _ = _dims(x1, wp)
    prec = precision(wp.dtype)

    def go(cfg):  # the compiled kernel that spills most (the tuner rejects a spilling candidate)
        done = [_runtime.launch(*la) for la in conv1_launches(x1, wp, b, z, cfg, prec)]
        return max(done, key=lambda c: getattr(c, "n_spills", 0) or 0)

    def reference() -> torch.Tensor:
        return torch.relu(F.conv2d(x1, unpack_weight(wp), b, padding=k // 2, groups=groups))

    go(_tile("conv_bn_relu", x1, wp, (), go, z, reference, prec))
    return z


def _conv_gate(z1: torch.Tensor, wp: torch.Tensor, b: Optional[torch.Tensor], scale: torch.Tensor,
               shift: torch.Tensor, x1: torch.Tensor, shuffle: int, out_channels_last: bool) -> torch.Tensor:
    out = new_output(x1.shape, x1, x1.dtype, out_channels_last)
    if out.numel() == 0:
        return out
    k, _, _, groups, _ = _dims(z1, wp)
    prec = precision(wp.dtype)

    def go(cfg):
        return _runtime.launch(*conv2_launch_args(z1, wp, b, scale, shift, x1, shuffle, out, cfg, prec))

    def reference() -> torch.Tensor:
        y2 = F.conv2d(z1, unpack_weight(wp), b, padding=k // 2, groups=groups)
        return run_final_gate(x1, y2, scale, shift, shuffle, out_channels_last)

    extra = (shuffle, is_channels_last(x1), out_channels_last)
    go(_tile("conv_gate", z1, wp, extra, go, out, reference, prec))
    return out


def _fake_conv1(x1, wp, b):
    bsz, _, h, w = x1.shape
    return torch.empty((bsz, wp.shape[3], h, w), dtype=wp.dtype, device=x1.device, memory_format=torch.channels_last)


def _fake_conv2(z1, wp, b, scale, shift, x1, shuffle, out_channels_last):
    return torch.empty_like(x1, memory_format=torch.channels_last if out_channels_last else torch.contiguous_format)


def _no_setup(ctx, inputs, output) -> None:
    pass


def _no_backward(ctx, *grads):
    raise RuntimeError("gam_triton: the Triton spatial convolutions are eval-only (no autograd formula); "
                       "the module runs cuDNN whenever a gradient is needed")


if HAS_TRITON:
    #: ``run_conv1(x1, packed w, bias)`` and ``run_conv2(z1, packed w, bias or None, scale, shift, x1, shuffle,
    #: out_channels_last)`` on trusted arguments.
    run_conv1 = _runtime.entry("conv_bn_relu", _conv_bn_relu, _fake_conv1, _no_backward, _no_setup)
    run_conv2 = _runtime.entry("conv_gate", _conv_gate, _fake_conv2, _no_backward, _no_setup)


# --- the spatial branch --------------------------------------------------------------------------------------
def triton_ok(*tensors) -> bool:
    """The Triton convolutions can run these: a kernel device and dtype, no autograd, no autocast."""
    x = tensors[0]
    if not _runtime.use_triton(x) or x.dtype not in KERNEL_DTYPES or _runtime.autocast_dtype(x.device.type):
        return False
    return not (torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors))


def spatial_run(x1: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor, w2: torch.Tensor, b2: Optional[torch.Tensor],
                scale2: torch.Tensor, shift2: torch.Tensor, packed: Optional[tuple], groups: int, shuffle: int,
                out_channels_last: bool, mode: str) -> torch.Tensor:
    """The eval spatial branch and final gate on trusted arguments (the module's call): ``b1`` present,
    ``scale2``/``shift2`` contiguous fp32, ``packed`` = :func:`pack_spatial` (w1, b1, w2, groups) or None when the
    Triton path may not run (``mode`` "cudnn", or :func:`triton_ok` false)."""
    k = w1.shape[2]

    def cudnn() -> torch.Tensor:
        z1 = torch.relu_(F.conv2d(x1, w1, b1, padding=k // 2, groups=groups))
        y2 = F.conv2d(z1, w2, b2, padding=k // 2, groups=groups)
        return run_final_gate(x1, y2, scale2, shift2, shuffle, out_channels_last)

    def triton_path() -> torch.Tensor:
        z1 = run_conv1(x1, packed[0], packed[1])  # z1's channels padded per group (pack_spatial)
        return run_conv2(z1, packed[2], b2, scale2, shift2, x1, shuffle, out_channels_last)

    if packed is None or mode == "cudnn" or x1.numel() == 0:
        return cudnn()
    if mode == "triton":
        return triton_path()
    key = path_key(x1, w1, groups, shuffle, out_channels_last)
    if torch.compiler.is_compiling():  # the path an eager call chose (the tuner cannot be traced), else cuDNN
        return triton_path() if _autotune.peek("spatial", key, x1.device) == "triton" else cudnn()
    if not _runtime.has_cuda():  # nothing to time (the interpreter): cuDNN / PyTorch
        return cudnn()
    runners = {"cudnn": cudnn, "triton": triton_path}
    if x1.is_cuda:
        def cudnn_relu() -> torch.Tensor:  # cuDNN's fused conv + bias + ReLU for conv1
            z1 = torch.cudnn_convolution_relu(x1, w1, b1, (1, 1), (k // 2, k // 2), (1, 1), groups)
            return run_final_gate(x1, F.conv2d(z1, w2, b2, padding=k // 2, groups=groups), scale2, shift2, shuffle,
                                  out_channels_last)

        runners["cudnn_relu"] = cudnn_relu
    run = lambda path: runners[path]()  # noqa: E731
    bench = checked("spatial", _autotune.timed(run), run, cudnn, tolerance(x1.dtype))
    path = _autotune.select("spatial", key, lambda: "cudnn", lambda: [p for p in runners if p != "cudnn"], bench)
    return runners.get(path, cudnn)()


# --- the public functions ------------------------------------------------------------------------------------
def _check_weight(name: str, weight, x: torch.Tensor, groups, cout: Optional[int] = None) -> None:
    if not isinstance(weight, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(weight).__name__}")
    if isinstance(groups, bool) or not isinstance(groups, int) or groups < 1:
        raise ValueError(f"groups must be an int >= 1, got {groups!r}")
    if weight.dim() != 4 or weight.shape[2] != weight.shape[3] or weight.shape[2] % 2 == 0:
        raise ValueError(f"{name} must be [COUT, CIN/groups, K, K] with K odd, got {tuple(weight.shape)}")
    cin = x.shape[1]
    if cin % groups or weight.shape[1] * groups != cin or weight.shape[0] % groups:
        raise ValueError(f"{name} {tuple(weight.shape)} does not fit {cin} input channels in {groups} groups")
    if cout is not None and weight.shape[0] != cout:
        raise ValueError(f"{name} has {weight.shape[0]} output channels, expected {cout}")
    if weight.device != x.device:
        raise ValueError(f"{name} is on {weight.device}, the input on {x.device}")
    if weight.dtype != x.dtype:
        raise TypeError(f"{name} dtype {weight.dtype} differs from the input's {x.dtype}")


def _check_gate(z1, weight, bias, scale, shift, x1, groups, shuffle) -> int:
    check_bchw("z1", z1)
    check_bchw("x1", x1)
    c = x1.shape[1]
    _check_weight("weight", weight, z1, groups, cout=c)
    if z1.shape[0] != x1.shape[0] or z1.shape[2:] != x1.shape[2:] or z1.device != x1.device:
        raise ValueError(f"z1 {tuple(z1.shape)} on {z1.device} does not match x1 {tuple(x1.shape)} on "
                         f"{x1.device} in batch, height, width and device")
    check_vector("bias", bias, c, x1.device)
    check_vector("scale", scale, c, x1.device, required=True)
    check_vector("shift", shift, c, x1.device, required=True)
    if x1.dtype != z1.dtype:
        raise TypeError(f"x1 dtype {x1.dtype} differs from z1's {z1.dtype}")
    return check_groups("shuffle", shuffle, c)


def conv_bn_relu(x1: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None,
                 groups: int = 1) -> torch.Tensor:
    """z = relu(conv2d(x1, weight, bias, padding=K // 2, groups=groups)) for a KxK weight (K odd), channels_last.

    The Triton kernel where it can run (:func:`triton_ok`), ``F.conv2d`` + ReLU elsewhere; checked first.
    """
    check_bchw("x1", x1)
    _check_weight("weight", weight, x1, groups)
    check_vector("bias", bias, weight.shape[0], x1.device)
    if not triton_ok(x1, weight, bias):
        z = torch.relu(F.conv2d(x1, weight, bias, padding=weight.shape[2] // 2, groups=groups))
        return z.contiguous(memory_format=torch.channels_last)
    b = bias if bias is not None else weight.new_zeros(weight.shape[0])
    return run_conv1(x1, pack_weight(weight, groups), b.contiguous())


def conv_gate(z1: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], scale: torch.Tensor,
              shift: torch.Tensor, x1: torch.Tensor, groups: int = 1, shuffle: int = 0,
              out_channels_last: Optional[bool] = None) -> torch.Tensor:
    """out = x1 * shuffle_G(sigmoid(scale * conv2d(z1, weight, bias, padding=K // 2, groups) + shift)).

    ``shuffle`` = G > 0 shuffles the map's channels in G groups (the YOLO form). One Triton kernel where it can
    run (y2 never stored); ``F.conv2d`` + the final gate elsewhere. Output layout: ``out_channels_last`` or
    x1's. Checked first.
    """
    shuffle = _check_gate(z1, weight, bias, scale, shift, x1, groups, shuffle)
    out_cl = is_channels_last(x1) if out_channels_last is None else bool(out_channels_last)
    scale, shift = scale.float().contiguous(), shift.float().contiguous()
    if not triton_ok(z1, weight, bias, x1, scale, shift):
        y2 = F.conv2d(z1, weight, bias, padding=weight.shape[2] // 2, groups=groups)
        return final_gate(x1, y2, scale, shift, shuffle, out_channels_last=out_cl)
    return run_conv2(z1, pack_weight(weight, groups), None if bias is None else bias.contiguous(), scale, shift, x1,
                     shuffle, out_cl)


def conv_mode() -> str:
    """GAM_TRITON_CONV: auto (default), triton or cudnn; ValueError for anything else."""
    mode = os.environ.get("GAM_TRITON_CONV", "auto").strip().lower() or "auto"
    if mode not in MODES:
        raise ValueError(f"GAM_TRITON_CONV must be one of {', '.join(MODES)}, got {mode!r}")
    return mode


def spatial_eval(x1: torch.Tensor, w1: torch.Tensor, b1: Optional[torch.Tensor], w2: torch.Tensor,
                 b2: Optional[torch.Tensor], scale2: torch.Tensor, shift2: torch.Tensor, groups: int = 1,
                 shuffle: int = 0, out_channels_last: Optional[bool] = None, packed: Optional[tuple] = None,
                 mode: Optional[str] = None) -> torch.Tensor:
    """GAM's eval spatial branch and final gate: x1 * shuffle(sigmoid(BN2(conv2(relu(conv1(x1)))))).

    ``w1``, ``b1``: conv1 with BatchNorm1 folded in; ``w2``, ``b2``: conv2; ``scale2``, ``shift2``: BatchNorm2
    as a per-channel affine. ``packed``: :func:`pack_spatial` (w1, b1, w2, groups) if at hand (else packed
    here); ``mode``: one of :data:`MODES` (default: GAM_TRITON_CONV). Checked first; PyTorch where Triton
    cannot run.
    """
    check_bchw("x1", x1)
    c = x1.shape[1]
    _check_weight("w1", w1, x1, groups)
    check_vector("b1", b1, w1.shape[0], x1.device)
    if w1.shape[0] > c:
        raise ValueError(f"w1 has {w1.shape[0]} output channels, more than the {c} of x1 (GAM: C/r)")
    # z1 has conv1's channels and x1's batch, map, dtype and device: a slice of x1 stands in for it.
    shuffle = _check_gate(x1[:, : w1.shape[0]], w2, b2, scale2, shift2, x1, groups, shuffle)
    mode = conv_mode() if mode is None else mode
    if mode not in MODES:
        raise ValueError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
    out_cl = is_channels_last(x1) if out_channels_last is None else bool(out_channels_last)
    scale2, shift2 = scale2.float().contiguous(), shift2.float().contiguous()
    b1 = b1 if b1 is not None else w1.new_zeros(w1.shape[0])
    if not _runtime.use_triton(x1):
        z1 = torch.relu_(F.conv2d(x1, w1, b1, padding=w1.shape[2] // 2, groups=groups))
        y2 = F.conv2d(z1, w2, b2, padding=w2.shape[2] // 2, groups=groups)
        return final_gate(x1, y2, scale2, shift2, shuffle, out_channels_last=out_cl)
    if triton_ok(x1, w1, b1, w2, b2, scale2, shift2) and mode != "cudnn":
        packed = packed if packed is not None else pack_spatial(w1, b1, w2, groups)
    else:
        packed = None
    return spatial_run(x1, w1, b1.contiguous(), w2, None if b2 is None else b2.contiguous(), scale2, shift2, packed,
                       groups, shuffle, out_cl, mode)
