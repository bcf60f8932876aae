"""Channel gate op: x1 = x * g(W2 relu(W1 x + b1) + b2) per pixel, g = sigmoid or identity; and its backward.

Kernels: ``kernels/channel_gate.py`` (math, bytes and FLOPs in its docstring).

* :func:`channel_gate` - the checked public function: the Triton kernel on CUDA (or the CPU under the
  interpreter), :func:`torch_forward` elsewhere. The module calls :data:`run` (the op, unchecked).
* ``gam_triton::channel_gate`` - the forward kernel as a custom op whose autograd formula
  (:func:`reference_grads`) recomputes h and a from x: nothing but x is saved. It is the gradient wherever the
  fused train block does not run (eval mode with requires_grad, frozen BatchNorms) and the tests' reference.
* :func:`backward` - the train block's fused backward: one kernel (dx, the (da | dh) and h rows, the bias
  gradients), then dW2 = da^T h and dW1 = dh^T x as cuBLAS GEMMs.

fp32 dots follow PyTorch's fp32 matmul precision (``_runtime.dot_precision``): "tf32" runs as TF32, "ieee" as 3xTF32
(tensor cores at fp32 accuracy; FMA dots had no tensor-core path and spilled). The backward keeps FMA ("ieee") above
BLOCK_R = 64, where every 3xTF32 tile spilled; there the tuner times PyTorch's GEMMs against the kernel
(:data:`GEMMS`). fp32 over more than 128 hidden channels runs as PyTorch GEMMs where no tile compiles without spills
(:func:`fused`: the "ieee" backward, and before Triton 3.6 the "ieee" forward and the TF32 backward). The dots run
in the weights' dtype with fp32 accumulation; the interpreter upcasts their operands (its bf16 dot is wrong: Triton
issue 11584).
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F

from . import _autotune, _runtime
from ._runtime import (HAS_TRITON, TARGET, bchw_view, check_bchw, check_vector, dot_precision, is_channels_last,
                       new_output, next_pow2)

if HAS_TRITON:
    import triton
    from triton import cdiv

    from ..kernels.channel_gate import channel_gate_bwd_kernel, channel_gate_fwd_kernel

__all__ = ["channel_gate", "torch_forward", "reference_grads", "backward", "heuristic", "candidates",
           "bwd_heuristic", "bwd_candidates", "key", "bwd_key", "launch_args", "bwd_launch_args", "bias_tree",
           "bias_steps", "waves_ok", "COUNTER_SLOTS", "GEMMS"]

# --- launch choices ------------------------------------------------------------------------------------------
#: Shared memory the operand tiles may take (bytes): compiles on every GPU since Volta.
SMEM_BUDGET = 96 * 1024
#: fp32 forward tiles (BLOCK_P, BLOCK_C, num_warps) per BLOCK_R: 3xTF32 holds each operand as two tf32 halves
#: in registers, so fp32 needs smaller tiles than half precision to stay unspilled (ptxas). BLOCK_R 128 was
#: (16, 64, 8): TF32 in channels_last at odd maps spilled 8 B on sm_90 (Triton 3.9, ptxas settling at 80 registers).
FP32_TILES = {16: (64, 64, 4), 32: (64, 32, 4), 64: (32, 64, 8), 128: (16, 32, 4), 256: (16, 32, 8)}
#: fp32 backward tiles (BLOCK_P, BLOCK_C, num_warps, num_stages) per BLOCK_R (16, 32, 64 were (32, 32, 8, 2),
#: (16, 64, 8, 2), (16, 32, 8, 1): 8-40 B spilled at 80 or 128 registers on Triton 3.6/3.9; 32 then (16, 32, 8, 2):
#: 40 B at 128 on 3.9 sm_90/100 in "ieee" channels_last). From BLOCK_R 64 with maxnreg (FULL_MAXNREG): 64
#: and 128 were (16, 16, 8, 1), 10 and 18 KB in flight per SM; now 16 x 32 x 64 and 16 x 16 x 128 at two stages,
#: 37-74 KB (144-209 registers on Triton 3.4/3.6/3.9, sm_80/90/100, no spill). BLOCK_R 16 (C <= 64: one channel
#: chunk) was 16 x 32 at 150-250 registers, 16.6 KB in flight; 16 x 64 (maxnreg as every backward tile) takes 104-179
#: (Triton 3.9). BLOCK_R 256 (fp32 dots over more than 128 hidden channels) runs only in TF32 from Triton 3.6 on
#: (:func:`fused`): 16 x 16 x 256 at two stages, 175-204 registers on 3.6/3.9 for sm_80/90/100 (221-255 on 3.4; FMA
#: "ieee" 240-255 at two stages and 268-356 B spilled at one; 3xTF32 1.4 KB spilled).
FP32_BWD_TILES = {16: (16, 64, 8, 2), 32: (16, 16, 4, 2), 64: (16, 32, 8, 2), 128: (16, 16, 8, 2),
                  256: (16, 16, 8, 2)}
#: Half-precision backward tiles (BLOCK_P, BLOCK_C, num_warps) per BLOCK_R (BLOCK_C 64 only where C <= 64): 12 KB
#: of activations per chunk step (Triton 3.9, sm_90: 117-141 registers up to BLOCK_R 64, 237 at 128, 249 at 256).
BWD_TILES = {16: (64, 64, 8), 32: (64, 32, 8), 64: (64, 32, 8), 128: (64, 32, 8), 256: (32, 32, 8)}
#: The same under autocast (fp32 x and dx1_gate, half weights): 125-158 registers on Triton 3.9, sm_90.
AUTOCAST_BWD_TILES = {16: (64, 32, 8), 32: (32, 32, 8), 64: (32, 32, 8), 128: (32, 32, 8), 256: (16, 32, 8)}
#: The backward's CTAs per SM at 8 warps (over 128 registers: one; up to 128: two): what its pixel block is fitted
#: to (:func:`_fit_waves`); from BLOCK_R 128 one (168-249 registers on Triton 3.9 for sm_80/90/100).
BWD_CTAS = (1, 2)
#: Whole waves (:func:`waves_ok`): at least this share of one wave ...
WAVES_MIN = 0.6
#: ... and no lone partial wave up to this many waves.
WAVES_TAIL = 1.15
#: maxnreg of every backward tile and of the fp32 forward tiles: the full budget, so that ptxas takes what a tile
#: needs. Without one it aims at an occupancy of its own, holds 80 or 128 registers and spills (full space, Triton
#: 3.9: the backward's 64 x 64 x 16 in half precision 8-48 B on sm_80/100, 64 x 32 x 32 8-64 B on sm_80, fp32
#: 16 x 32 x 16 "ieee" 96 B on sm_80, 16 x 16 x 32 TF32 8 B on sm_90; the fp32 forward's 64 x 32 x 32 TF32 8 B on
#: sm_100, Triton 3.6); with it, 116-255 registers and none. The backward's pixel block is fitted to one or two CTAs
#: per SM (BWD_CTAS) either way; the fp32 forward is fitted over the counts its registers may give (:func:`_fwd_ctas`).
#: Before Triton 3.9 the half-precision forward's 4-warp tiles up to BLOCK_R 64 take it too (:func:`_fwd_maxnreg`).
FULL_MAXNREG = 255
#: maxnreg of some half-precision forward tiles (:func:`_fwd_maxnreg`): 8 warps at BLOCK_R 128 (left to itself
#: ptxas held 16 x 64 x 128 at 80 registers and spilled 16 B: C1024 20x20, sm_90, Triton 3.9). Other half-precision
#: forward tiles keep ptxas's own choice on Triton 3.9 (48-199 registers, no spill over the full space): a cap of 255
#: took 16-43 % more registers than it, and fewer CTAs per SM; at BLOCK_R 256 a cap of 128 spilled 16-72 B.
FWD_MAXNREG = 128
#: maxnreg of the autocast forward's 8-warp 16 x 64 tiles up to BLOCK_R 64 before Triton 3.6 (small tiles of the
#: whole-waves fit, :func:`_fwd_waves`): four CTAs per SM. Left to itself, 3.4's ptxas held 16 x 64 x 64 in NCHW at
#: 72-74 registers (64 on 3.6 and 3.9): three CTAs, and C256 20x20 B16's 400 CTAs ran 1.01 waves on 132 SMs; at 64
#: none spills (full space, sm_80/90/100) and they run 0.76. Not wider: at 64, 3.4 spilled 48-80 B in the autocast
#: 16 x 128 x 16/32 (C128 80x80 B1) and 64 B in fp16's 16 x 64 x 64 on sm_80 (the fork at C512 20x20).
SMALL_TILE_MAXNREG = 64
#: Groups of the backward's bias-sum tree at most (:func:`bias_tree`), and the int32 counters it takes: one per
#: group and one for the groups (the train block allocates them with the BatchNorms').
MAX_GROUPS = 127
COUNTER_SLOTS = MAX_GROUPS + 1
#: Serial steps the bias sums aim at, at most (:func:`bias_tree`).
BIAS_MAX_STEPS = 16
#: The kernels' INPUT_PRECISION for fp32 dots per answer of ``dot_precision``.
FP32_DOTS = {"ieee": "tf32x3", "tf32": "tf32"}
#: Above this BLOCK_R the backward's fp32 "ieee" dots stay FMA (3 live [BLOCK_P, BLOCK_R] tiles spilled).
BWD_TF32X3_MAX_R = 64
#: The backward's path name for PyTorch's GEMMs (:func:`reference_grads`): a tuning candidate where the kernel's
#: dots run on FMA (fp32 "ieee" above BWD_TF32X3_MAX_R), which cuBLAS's SGEMM may outrun (untimed; perf/NOTES.md).
GEMMS = "gemms"


def _block_r(CR: int) -> int:
    return max(16, next_pow2(CR))


def fused(dtype: torch.dtype, CR: int, backward: bool, precision: str, target: str = TARGET) -> bool:
    """Whether the kernel runs (True) or PyTorch's GEMMs do. fp32 dots over more than 128 hidden channels (BLOCK_R
    256, C > 512 at rate 4), by ``precision`` (``dot_precision``'s answer): the forward fuses in "tf32" (16 x 32 x 256
    at 151-157 registers on Triton 3.4) and from Triton 3.6 on in "ieee" too (3xTF32 spilled 136-200 B on 3.4); the
    backward in "tf32" from Triton 3.6 on (16 x 16 x 256 at 175-204 registers on 3.6/3.9; 221-255 on 3.4, no
    margin). The backward's "ieee" dots (FMA; its 3xTF32 tile spilled 1.4 KB) have no tile that compiles without
    spills or with registers to spare on any Triton from 3.4 to 3.9 (24-5,000 B spilled, or 240-255 registers).
    Compile facts, ptxas for sm_80/90/100. Half precision and the interpreter always fuse."""
    if target != "gpu" or dtype != torch.float32 or _block_r(CR) <= 128:
        return True
    if backward:
        return precision == "tf32" and _runtime.TRITON >= (3, 6)
    return precision == "tf32" or _runtime.TRITON >= (3, 6)


def heuristic(C: int, CR: int, HW: int, dtype: torch.dtype, target: str = TARGET,
              x_dtype: Optional[torch.dtype] = None, batch: Optional[int] = None,
              sms: int = _runtime.DEFAULT_SMS) -> "triton.Config":
    """A forward tile for any C and C/r (blocks >= 16 for tl.dot, h kept in registers); ``dtype``: the
    dots' (the weights'); ``x_dtype``: x's when it differs (fp32 x under autocast). On the interpreter: few,
    large programs (its cost is per program). The rules are the compile facts of Triton 3.4, 3.6 and 3.9 over
    the module's whole space (ptxas for sm_80/90/100). With ``batch`` (the tuning key's), the tile is
    then fitted to whole waves on ``sms`` SMs (:func:`_fwd_waves`)."""
    block_r = _block_r(CR)
    if target == "interpreter":
        return triton.Config(dict(BLOCK_P=min(128, max(16, next_pow2(HW))), BLOCK_C=max(16, next_pow2(C)),
                                  BLOCK_R=block_r), num_warps=4, num_stages=1)
    if dtype == torch.float32:
        block_p, block_c, warps = FP32_TILES[min(block_r, 256)]
        block_c = max(16, next_pow2(C)) if C <= block_c else block_c
        block_p = max(16, min(block_p, next_pow2(HW)))
        block_p, warps = _fwd_waves(block_p, block_c, block_r, warps, HW, batch, sms, 4, grow=False)
        return triton.Config(dict(BLOCK_P=block_p, BLOCK_C=block_c, BLOCK_R=block_r), num_warps=warps, num_stages=2,
                             maxnreg=FULL_MAXNREG)
    # Up to C = 128 one tile holds every channel (x read once); beyond, 64-channel chunks. h (BLOCK_P x
    # BLOCK_R fp32) lives in registers: the pixel block shrinks from C/r = 33 on (64 x 64 x 64 at 4 warps spilled
    # 64 B on sm_80, Triton 3.4), and again for fp32 x under autocast, whose tile is twice a half one (64 x 128 x 32
    # spilled 176-192 B on sm_80, Triton 3.6). 8 warps for BLOCK_R 256 (4 warps took 255 registers, 4-12 B spilled).
    block_c = max(16, next_pow2(C)) if C <= 128 else 64
    block_p = 64 if block_r <= 32 else 32
    autocast = x_dtype is not None and x_dtype.itemsize == 4
    if autocast:
        block_p = max(16, block_p // 2)
    block_p = max(16, min(block_p, next_pow2(HW)))
    warps = 8 if block_p * block_c >= 8192 or block_r >= 256 else 4
    block_p, warps = _fwd_waves(block_p, block_c, block_r, warps, HW, batch, sms, 2)
    return triton.Config(dict(BLOCK_P=block_p, BLOCK_C=block_c, BLOCK_R=block_r), num_warps=warps, num_stages=2,
                         maxnreg=_fwd_maxnreg(block_p, block_c, block_r, warps, autocast))


def _fwd_maxnreg(block_p: int, block_c: int, block_r: int, warps: int, autocast: bool) -> Optional[int]:
    """FWD_MAXNREG for 8-warp tiles at BLOCK_R 128; before Triton 3.6, SMALL_TILE_MAXNREG for the autocast 8-warp
    16 x 64 tiles up to BLOCK_R 64; before Triton 3.9, the full budget for 4-warp tiles up to BLOCK_R 64, whose ptxas,
    left to itself, held some at 96 or 128 registers and spilled 8-16 B on sm_100 (3.4: 32 x 64 x 64, C256 80x80 NCHW
    fp16; 3.6, full space: the fork form's 64 x 64 x 32 and, under autocast, 16 x 128 x 16), and where caps of 128 or
    168 spilled too (3.4 at 14x14 NCHW, 16-24 B; 3.6 under autocast, 48-104 B); None (ptxas's choice) for the others
    (3.4's autocast 16 x 64 x 128 spilled 24 B on sm_80 at 255, none at its own choice). Triton 3.9 needs no cap but
    the first (full space, sm_80/90/100)."""
    if warps == 8 and block_r == 128:
        return FWD_MAXNREG
    if _runtime.TRITON < (3, 6) and autocast and warps == 8 and (block_p, block_c) == (16, 64) and block_r <= 64:
        return SMALL_TILE_MAXNREG
    if _runtime.TRITON < (3, 9) and warps == 4 and block_r <= 64:
        return FULL_MAXNREG
    return None


def _fwd_ctas(block_p: int, block_c: int, block_r: int, warps: int, itemsize: int) -> tuple:
    """CTAs per SM a forward tile may get, from an estimate of its registers per thread: 40 + 2.5 per h element +
    0.8 per gate element a thread holds (a fit to half-precision tiles, Triton 3.9 sm_90), times 1.5 for fp32 dots.
    Half precision: the estimate's count and one more. fp32 dots (``itemsize`` 4) run at the full budget
    (FULL_MAXNREG), where ptxas takes what it likes (1.0-3.1x the plain estimate on sm_90; 3xTF32 at the top):
    every count from 255 registers' to 0.9 of the estimate's. These are ranges to fit against, not predictions:
    the compile check judges the fitted grids with ptxas's real counts (the sweep's, Triton 3.4, 3.6 and 3.9)."""
    thr = 32 * warps
    regs = 40 + (25 * block_p * block_r // thr + 8 * block_p * block_c // thr) // 10
    if itemsize == 4:
        est = regs * 3 // 2
        return tuple(range(_runtime.register_ctas(255, warps), _runtime.register_ctas(est * 9 // 10, warps) + 1))
    k = _runtime.register_ctas(regs, warps)
    return tuple(sorted({k, min(_runtime.max_ctas(warps), k + 1)}))


def _fwd_waves(block_p: int, block_c: int, block_r: int, warps: int, HW: int, batch: Optional[int], sms: int,
               itemsize: int, grow: bool = True) -> tuple[int, int]:
    """(BLOCK_P, num_warps) of a forward tile fitted to whole waves: the first of the pixel block as given, halved,
    doubled (with ``grow``, up to 128 and the map) or quartered (down to 16), at its warps, then the same at 8 (as
    many warps per SM in half as many CTAs), whose grid runs in whole waves (:func:`waves_ok`)
    for every CTAs-per-SM count :func:`_fwd_ctas` allows. Where none does, the first that does for the most counts
    (the fork form at C256 20x20 B16: 400 CTAs of 16 pixels at 8 warps, 0.5-0.6 of a wave, not 100 of 64 at 0.2);
    the tile as given where none does for any, or ``batch`` is None. The warps as given come first: 32 x 64 x 64 at
    8 warps took 64 registers and spilled 8 B on sm_80 (Triton 3.9), where 16 x 64 x 64 at 4 fits. fp32 tiles never
    grow (they sit nearer the spill edge)."""
    if batch is None:
        return block_p, warps
    top = max(16, min(128, next_pow2(HW))) if grow else block_p
    sizes = [q for q in dict.fromkeys((block_p, block_p // 2, block_p * 2, block_p // 4)) if 16 <= q <= top]
    best, best_ok = (block_p, warps), 0
    for w in dict.fromkeys((warps, 8)):
        for p in sizes:
            ks = _fwd_ctas(p, block_c, block_r, w, itemsize)
            ok = sum(waves_ok(batch * cdiv(HW, p), sms * k) for k in ks)
            if ok == len(ks):
                return p, w
            if ok > best_ok:
                best, best_ok = (p, w), ok
    return best


def candidates(C: int, CR: int, HW: int, dtype: torch.dtype) -> list:
    """At most MAX_CANDIDATES forward tiles nearest the heuristic. Dropped: blocks larger than the (power-of-two)
    problem; fp32 accumulators (h: BLOCK_P x BLOCK_R, a: BLOCK_P x BLOCK_C) above 128 registers per thread;
    operand tiles (times num_stages) above SMEM_BUDGET; 3 stages unless the channel loop runs 3 times. The
    tuner drops, in addition, whatever spills when compiled on the user's GPU."""
    block_r, cmax, pmax = _block_r(CR), max(16, next_pow2(C)), max(16, next_pow2(HW))
    out = []
    for bp in (16, 32, 64, 128):
        for bc in (16, 32, 64, 128):
            if bp > pmax or bc > cmax:
                continue
            for nw in (4, 8):
                for ns in ((2, 3) if -(-C // bc) >= 3 else (2,)):
                    if max(bp * block_r, bp * bc) <= 128 * 32 * nw and \
                            ns * (bp * bc + bc * block_r) * dtype.itemsize <= SMEM_BUDGET:
                        out.append(triton.Config(dict(BLOCK_P=bp, BLOCK_C=bc, BLOCK_R=block_r), num_warps=nw,
                                                 num_stages=ns))
    return _runtime.nearest(out, heuristic(C, CR, HW, dtype, "gpu"))


def waves_ok(tiles: int, slots: int) -> bool:
    """A grid of ``tiles`` CTAs on ``slots`` resident ones (SMs x CTAs per SM) runs in whole waves: at least
    WAVES_MIN of one, and no lone partial wave just past a whole one ((1, WAVES_TAIL])."""
    w = tiles / max(1, slots)
    return w >= WAVES_MIN and not 1.0 < w <= WAVES_TAIL


def _fit_waves(block_p: int, HW: int, batch: Optional[int], sms: int, ctas: tuple, floor: int = 16) -> int:
    """The largest pixel block from ``block_p`` down (halving, at least ``floor``) whose grid runs in whole waves
    (:func:`waves_ok`) for every CTAs-per-SM count in ``ctas``; ``block_p`` itself when none does, or when the
    batch is unknown (None)."""
    if batch is None:
        return block_p
    p = block_p
    while p >= floor:
        tiles = batch * cdiv(HW, p)
        if all(waves_ok(tiles, sms * k) for k in ctas):
            return p
        p //= 2
    return block_p


def bwd_heuristic(C: int, CR: int, HW: int, dtype: torch.dtype, target: str = TARGET,
                  x_dtype: Optional[torch.dtype] = None, batch: Optional[int] = None,
                  sms: int = _runtime.DEFAULT_SMS) -> "triton.Config":
    """The backward holds two BLOCK_P x BLOCK_R tiles (h, dh) and its chunk tiles in registers. Half precision:
    64 x 32 tiles at 8 warps up to C/r = 128 (64 x 64 where C <= 64), 32 x 32 for BLOCK_R 256: 117-249
    registers, one or two CTAs per SM, 12 KB of x, dx1_gate and dx1_conv per chunk step, two stages (BWD_TILES).
    fp32 x under autocast: 32 x 32 at 8 warps (64 x 32 at C/r 16, 16 x 32 at BLOCK_R 256; 10 bytes an element);
    fp32 dots: FP32_BWD_TILES. With ``batch`` (the tuning key's) the pixel block halves until the grid runs in
    whole waves on ``sms`` SMs at one or two CTAs per SM (:func:`waves_ok`). ``dtype``: the dots' (the
    weights'); ``x_dtype``: x's."""
    block_r = _block_r(CR)
    if target == "interpreter":
        return heuristic(C, CR, HW, dtype, target)
    if dtype == torch.float32:
        block_p, block_c, warps, stages = FP32_BWD_TILES[min(block_r, 256)]
    else:
        autocast = x_dtype is not None and x_dtype.itemsize == 4
        block_p, block_c, warps = (AUTOCAST_BWD_TILES if autocast else BWD_TILES)[min(block_r, 256)]
        stages = 2
        if _runtime.TRITON < (3, 6) and block_r >= 128:  # 3.4: 64 x 32 x 128 spilled 8 B, 32 x 32 x 256 24-32 B (sm_80)
            block_p //= 2
    if block_c == 64 and C > 64:  # one chunk of 64 channels, else chunks of 32
        block_c = 32
    block_p = max(16, min(block_p, next_pow2(HW)))
    block_p = _fit_waves(block_p, HW, batch, sms, BWD_CTAS if block_r < 128 else BWD_CTAS[:1])
    return triton.Config(dict(BLOCK_P=block_p, BLOCK_C=max(16, min(block_c, next_pow2(C))), BLOCK_R=block_r),
                         num_warps=warps, num_stages=stages, maxnreg=FULL_MAXNREG)


def bwd_candidates(C: int, CR: int, HW: int, dtype: torch.dtype, x_dtype: Optional[torch.dtype] = None) -> list:
    """Forward candidates whose [BLOCK_P, BLOCK_R] fp32 tiles (h, dh, and as much again for the chunk work) fit
    128 registers per thread (with the heuristic's maxnreg)."""
    out = [triton.Config(c.kwargs, num_warps=c.num_warps, num_stages=c.num_stages, maxnreg=FULL_MAXNREG)
           for c in candidates(C, CR, HW, dtype)
           if 3 * c.kwargs["BLOCK_P"] * c.kwargs["BLOCK_R"] <= 128 * 32 * c.num_warps]
    return _runtime.nearest(out, bwd_heuristic(C, CR, HW, dtype, "gpu", x_dtype))


def input_precision(dtype: torch.dtype, precision: str, block_r: Optional[int] = None) -> str:
    """INPUT_PRECISION of the dots for ``precision`` (``dot_precision``'s answer): fp32 maps through FP32_DOTS,
    except that the backward (``block_r`` given) keeps FMA "ieee" above BWD_TF32X3_MAX_R; other dtypes ignore it."""
    if dtype != torch.float32:
        return precision
    p = FP32_DOTS[precision]
    return "ieee" if p == "tf32x3" and block_r is not None and block_r > BWD_TF32X3_MAX_R else p


def key(x: torch.Tensor, w1: torch.Tensor, out_channels_last: bool, precision: str) -> tuple:
    """The forward's tuning key: C, C/r, bucketed map and batch, output layout, x's and the weights' dtype and
    layout, the dot precision."""
    c, cr, hw = x.shape[1], w1.shape[0], x.shape[2] * x.shape[3]
    return _autotune.key((c, cr, *_autotune.pixels(x.shape[0], hw), out_channels_last), x, w1, precision=precision)


def bwd_key(x: torch.Tensor, w1: torch.Tensor, precision: str) -> tuple:
    """The backward's tuning key: C, C/r, bucketed map and batch, x's and the weights' dtype and layout (dx takes
    x's), the dot precision."""
    return _autotune.key((x.shape[1], w1.shape[0], *_autotune.pixels(x.shape[0], x.shape[2] * x.shape[3])), x, w1,
                         precision=precision)


# --- launches ------------------------------------------------------------------------------------------------
def launch_args(x: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor, w2: torch.Tensor, b2: torch.Tensor,
                sigmoid: bool, out: torch.Tensor, cfg: "triton.Config", precision: str) -> tuple:
    """(kernel, grid, args, kwargs) of the forward launch writing ``out``."""
    bsz, c, h, w = x.shape
    xv, sxb, sxc, sxp = bchw_view(x)
    _, sob, soc, sop = bchw_view(out)
    kw = cfg.kwargs
    args = (xv, w1, b1, w2, b2, out, h * w, c, w1.shape[0], sxb, sxc, sxp, sob, soc, sop)
    kwargs = dict(SIGMOID=sigmoid, DOT_F32=_runtime.INTERPRET or w1.dtype == torch.float32,
                  INPUT_PRECISION=input_precision(w1.dtype, precision), N_CHUNKS=cdiv(c, kw["BLOCK_C"]),
                  R_ALIGN=_runtime.alignment(w1.shape[0]),
                  **_runtime.view_alignments("XO", h * w, c, (sxb, sxc, sxp), (sob, soc, sop)),
                  **_runtime.config_kwargs(cfg))
    return channel_gate_fwd_kernel, (bsz * cdiv(h * w, kw["BLOCK_P"]),), args, kwargs


def bias_tree(n_parts: int, width: int, num_warps: int) -> tuple[int, int, int]:
    """(GROUP, BLOCK_Q, BLOCK_F) of the backward's bias sums over ``n_parts`` partial rows of ``width`` columns:
    groups of about sqrt(n_parts) programs (at most MAX_GROUPS of them: the counters), [BLOCK_Q, BLOCK_F] fp32
    tiles (BLOCK_F up to 1024 columns) of 32 elements a thread, or 64 where 32 take more than BIAS_MAX_STEPS
    serial steps (:func:`bias_steps`)."""
    group = max(1, cdiv(n_parts, MAX_GROUPS), math.isqrt(max(0, n_parts - 1)) + 1)
    block_f = min(1024, max(16, next_pow2(width)))
    for per_thread in (32, 64):
        block_q = max(1, per_thread * 32 * num_warps // block_f)
        cols, n_groups = cdiv(width, block_f), cdiv(n_parts, group)
        if (cdiv(min(group, n_parts), block_q) + cdiv(n_groups, block_q)) * cols <= BIAS_MAX_STEPS:
            break
    return group, block_q, block_f


def bias_steps(n_parts: int, width: int, num_warps: int) -> int:
    """Serial steps of the bias sums (:func:`bias_tree`) on the longest path: a group's sum, then the groups'."""
    group, block_q, block_f = bias_tree(n_parts, width, num_warps)
    return (cdiv(min(group, n_parts), block_q) + cdiv(cdiv(n_parts, group), block_q)) * cdiv(width, block_f)


def bwd_launch_args(x, ga, gb, w1, b1, w2, b2, sigmoid: bool, dx, dah, hid, counts, db1, db2,
                    cfg: "triton.Config", precision: str) -> tuple:
    """(kernel, grid, args, kwargs) of the backward kernel, one program per tile; the bias partials, args[10]
    ([grid + groups, C + CR] fp32), are allocated here; ``counts``: COUNTER_SLOTS zeroed int32."""
    bsz, c, h, w = x.shape
    cr, kw = w1.shape[0], cfg.kwargs
    views = [bchw_view(t) for t in (x, ga, gb)]
    _, sdb, sdc, sdp = bchw_view(dx)
    n_prog = bsz * cdiv(h * w, kw["BLOCK_P"])
    group, block_q, block_f = bias_tree(n_prog, c + cr, cfg.num_warps)
    bpart = torch.empty(n_prog + cdiv(n_prog, group), c + cr, dtype=torch.float32, device=x.device)
    args = (views[0][0], views[1][0], views[2][0], w1, b1, w2, b2, dx, dah, hid, bpart, counts, db1, db2, h * w,
            c, cr, group, *(s for v in views for s in v[1:]), sdb, sdc, sdp)
    kwargs = dict(SIGMOID=sigmoid, DOT_F32=_runtime.INTERPRET or w1.dtype == torch.float32,
                  INPUT_PRECISION=input_precision(w1.dtype, precision, kw["BLOCK_R"]),
                  N_CHUNKS=cdiv(c, kw["BLOCK_C"]), BLOCK_Q=block_q, BLOCK_F=block_f, R_ALIGN=_runtime.alignment(cr),
                  **_runtime.view_alignments("XABD", h * w, c, *(v[1:] for v in views), (sdb, sdc, sdp)),
                  **_runtime.config_kwargs(cfg))
    return channel_gate_bwd_kernel, (n_prog,), args, kwargs


def _forward(x: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor, w2: torch.Tensor, b2: torch.Tensor,
             sigmoid: bool, out_channels_last: bool) -> torch.Tensor:
    out = new_output(x.shape, x, x.dtype, out_channels_last)
    if x.numel() == 0:
        return out
    c, cr, hw = x.shape[1], w1.shape[0], x.shape[2] * x.shape[3]
    prec = dot_precision(w1.dtype)
    if not fused(w1.dtype, cr, False, prec):
        return out.copy_(torch_forward(x, w1, b1, w2, b2, sigmoid))

    def go(cfg):
        return _runtime.launch(*launch_args(x, w1, b1, w2, b2, sigmoid, out, cfg, prec))

    go(_autotune.select("channel_gate", key(x, w1, out_channels_last, prec),
                        lambda: heuristic(c, cr, hw, w1.dtype, x_dtype=x.dtype,
                                          batch=_autotune.pixels(x.shape[0], hw)[1], sms=_runtime.sm_count(x.device)),
                        lambda: candidates(c, cr, hw, w1.dtype), _autotune.timed(go)))
    return out


def backward(x: torch.Tensor, ga: torch.Tensor, gb: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor,
             w2: torch.Tensor, b2: torch.Tensor, sigmoid: bool, counts: torch.Tensor) -> tuple:
    """(dx, dw1, db1, dw2, db2) of x1 = x * g(W2 relu(W1 x + b1) + b2) with dx1 = ga + gb (the train block's).

    One kernel (``counts``: COUNTER_SLOTS zeroed int32 counters, left zeroed; its bias sums' fixed order depends
    on the shape and the tile, whose choice reads the SM count), then the weight gradients as GEMMs
    (:func:`_weight_grads`); where the kernel does not fuse (:func:`fused`), :func:`reference_grads`. Where the
    kernel's dots would run on FMA (:func:`input_precision`), the tuner times :func:`reference_grads` too
    (:data:`GEMMS`), the whole backward either way."""
    bsz, c, h, w = x.shape
    hw, cr, wdt = h * w, w1.shape[0], w1.dtype
    dx = new_output(x.shape, x, x.dtype, is_channels_last(x))
    prec, grads = dot_precision(wdt), []

    def go(choice):
        """The whole backward by ``choice`` (a tile, or GEMMS) into dx and ``grads``; the kernel's handle."""
        if isinstance(choice, str):  # GEMMS, the one path
            ref_dx, *ref = reference_grads(x, w1, b1, w2, b2, sigmoid, ga + gb.to(ga.dtype))
            dx.copy_(ref_dx)
            grads[:] = ref
            return None
        dah = torch.empty(bsz * hw, c + cr, dtype=wdt, device=x.device)
        hid = torch.empty(bsz * hw, cr, dtype=wdt, device=x.device)
        db1, db2 = torch.empty_like(b1), torch.empty_like(b2)
        handle = _runtime.launch(*bwd_launch_args(x, ga, gb, w1, b1, w2, b2, sigmoid, dx, dah, hid, counts, db1,
                                                  db2, choice, prec))
        dw1, dw2 = _weight_grads(x, dah, hid)
        grads[:] = (dw1, db1, dw2, db2)
        return handle

    if not fused(wdt, cr, True, prec):
        go(GEMMS)
    else:
        paths = (GEMMS,) if input_precision(wdt, prec, _block_r(cr)) == "ieee" else ()
        sms = _runtime.sm_count(x.device)
        go(_autotune.select("channel_gate_bwd", bwd_key(x, w1, prec),
                            lambda: bwd_heuristic(c, cr, hw, wdt, x_dtype=x.dtype,
                                                  batch=_autotune.pixels(bsz, hw)[1], sms=sms),
                            lambda: [*bwd_candidates(c, cr, hw, wdt, x.dtype), *paths], _autotune.timed(go)))
    return (dx, *grads)


def _weight_grads(x: torch.Tensor, dah: torch.Tensor, hid: torch.Tensor) -> tuple:
    """(dW1, dW2) from the kernel's (da | dh) and h rows: dW2 = da^T h, dW1 = dh^T x (NCHW with B > 1: a bmm over
    the batch and a sum), in the weights' dtype."""
    bsz, c, h, w = x.shape
    n, wdt = bsz * h * w, dah.dtype
    da, dh = dah[:, :c], dah[:, c:]
    dw2 = torch.mm(da.t(), hid)
    if is_channels_last(x) or bsz == 1:
        xf = x.permute(0, 2, 3, 1).reshape(n, c)  # a view for channels_last and for B = 1 NCHW
        return torch.mm(dh.t(), xf if xf.dtype == wdt else xf.to(wdt)), dw2
    xb = x.reshape(bsz, c, h * w)
    xb = xb if xb.dtype == wdt else xb.to(wdt)
    dw1 = torch.bmm(dah.view(bsz, h * w, dah.shape[1])[:, :, c:].transpose(1, 2), xb.transpose(1, 2))
    return dw1.sum(0, dtype=torch.float32).to(wdt), dw2


# --- the op --------------------------------------------------------------------------------------------------
def reference_grads(x, w1, b1, w2, b2, sigmoid: bool, dx1) -> tuple:
    """(dx, dw1, db1, dw2, db2) of x1 = x * g(W2 relu(W1 x + b1) + b2) by GAM_NOTES' formulas, h and a
    recomputed, in fp32 (fp64 for fp64 inputs) on the NHWC view; each in its input's dtype."""
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    xp = x.permute(0, 2, 3, 1).to(acc).reshape(-1, x.shape[1])  # [N, C]
    dp = dx1.permute(0, 2, 3, 1).to(acc).reshape(-1, x.shape[1])
    w1f, b1f, w2f, b2f = (t.to(acc) for t in (w1, b1, w2, b2))
    pre = torch.addmm(b1f, xp, w1f.t())
    hid = torch.relu(pre)
    a = torch.addmm(b2f, hid, w2f.t())
    g = torch.sigmoid(a) if sigmoid else a
    da = dp * xp
    if sigmoid:
        da = da * g * (1 - g)
    dh = (da @ w2f) * (pre > 0)
    dx = dp * g + dh @ w1f
    b, c, h, w = x.shape
    dx = dx.view(b, h, w, c).permute(0, 3, 1, 2).to(x.dtype)
    return dx, (dh.t() @ xp).to(w1.dtype), dh.sum(0).to(b1.dtype), (da.t() @ hid).to(w2.dtype), da.sum(0).to(b2.dtype)


def _fake(x, w1, b1, w2, b2, sigmoid, out_channels_last):
    return torch.empty_like(x, memory_format=torch.channels_last if out_channels_last else torch.contiguous_format)


def _setup_context(ctx, inputs, output) -> None:
    x, w1, b1, w2, b2, sigmoid, _ = inputs
    ctx.sigmoid = sigmoid
    ctx.save_for_backward(x, w1, b1, w2, b2)


def _backward(ctx, dx1):
    return (*reference_grads(*ctx.saved_tensors, ctx.sigmoid, dx1), None, None)


#: The forward as an op: ``run(x, w1, b1, w2, b2, sigmoid, out_channels_last)`` on trusted arguments (contiguous
#: weights, biases present, Triton-eligible x).
run = _runtime.entry("channel_gate", _forward, _fake, _backward, _setup_context) if HAS_TRITON else None


# --- PyTorch path and the public function ----------------------------------------------------------------
def torch_forward(x: torch.Tensor, w1: torch.Tensor, b1: Optional[torch.Tensor], w2: torch.Tensor,
                  b2: Optional[torch.Tensor], sigmoid: bool) -> torch.Tensor:
    """PyTorch channel gate, differentiable, without permute copies.

    The matmuls run in the weights' dtype (x is cast to it, as nn.Linear under autocast does); the gate
    multiplies x in its own dtype. Per layout and autograd need, the form fastest on the CPU (measured on a 2-core CPU):
    channels_last - F.linear on the free NHWC view; NCHW without autograd - batched matmuls on the
    B x C x HW view; NCHW with autograd - 1x1 convolutions (matmul's backward would copy operands).
    """
    needs_grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, w1, b1, w2, b2))
    if not needs_grad:  # matmul copies operands that require grad, even under no_grad
        w1, b1, w2, b2 = (None if t is None else t.detach() for t in (w1, b1, w2, b2))
    xd = x.to(w1.dtype)
    if is_channels_last(x):  # the NHWC view is contiguous
        a = F.linear(torch.relu(F.linear(xd.permute(0, 2, 3, 1), w1, b1)), w2, b2).permute(0, 3, 1, 2)
    elif needs_grad:
        a = F.conv2d(torch.relu(F.conv2d(xd, w1[:, :, None, None], b1)), w2[:, :, None, None], b2)
    else:
        b, c, h, w = x.shape
        hid = torch.matmul(w1, xd.reshape(b, c, h * w))
        if b1 is not None:
            hid = hid + b1[:, None]
        a = torch.matmul(w2, torch.relu_(hid))
        if b2 is not None:
            a = a + b2[:, None]
        a = a.view(b, c, h, w)
    return x * (torch.sigmoid(a) if sigmoid else a)


def channel_gate(x: torch.Tensor, w1: torch.Tensor, b1: Optional[torch.Tensor], w2: torch.Tensor,
                 b2: Optional[torch.Tensor], sigmoid: bool = True,
                 out_channels_last: Optional[bool] = None) -> torch.Tensor:
    """x1 = x * g(W2 relu(W1 x + b1) + b2) over the channels of each pixel of a B x C x H x W tensor.

    ``out_channels_last`` picks the output layout (default: the input's). Shapes, dtypes and devices are
    checked before any kernel runs (ValueError/TypeError).
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
    out_cl = is_channels_last(x) if out_channels_last is None else bool(out_channels_last)
    if not _runtime.use_triton(x):
        out = torch_forward(x, w1, b1, w2, b2, sigmoid)
        fmt = torch.channels_last if out_cl else torch.contiguous_format
        return out if out.is_contiguous(memory_format=fmt) else out.contiguous(memory_format=fmt)
    b1 = b1 if b1 is not None else w1.new_zeros(cr)
    b2 = b2 if b2 is not None else w2.new_zeros(c)
    return run(x, w1.contiguous(), b1.contiguous(), w2.contiguous(), b2.contiguous(), bool(sigmoid), out_cl)
