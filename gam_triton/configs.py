"""Launch configurations of the Triton kernels: the heuristic default and the candidate set per shape.

A :class:`Config` names the tile (BLOCK_P pixels x BLOCK_C channels; BLOCK_R >= C/r for the channel gate)
and the launch options (num_warps, num_stages). Per kernel: a heuristic default that compiles for any shape,
and a candidate set pruned by shape (no block larger than the problem, nothing that cannot compile or would
spill) and capped at MAX_CANDIDATES, nearest the heuristic first. Candidates depend on H*W only through its
next power of two, as the autotuner's key does. The autotuner (:mod:`gam_triton.autotune`) benchmarks the
candidates on a GPU and uses the heuristic everywhere else.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Optional

import torch

from ._runtime import INTERPRET


#: Configurations timed per shape besides the heuristic: compiling one costs 0.3-1 s the first time on a
#: machine (Triton's own on-disk kernel cache makes it free afterwards), timing one about 30 ms.
MAX_CANDIDATES = 12
#: Shared memory the channel-gate operand tiles may take (bytes): compiles on every GPU since Volta.
SMEM_BUDGET = 96 * 1024


def next_pow2(n: int) -> int:
    """Smallest power of two >= n (and >= 1)."""
    return 1 << max(0, int(n) - 1).bit_length()


@dataclass(frozen=True)
class Config:
    """One launch configuration. BLOCK_R is 0 for kernels without a reduced-channel dimension."""

    BLOCK_P: int
    BLOCK_C: int
    BLOCK_R: int = 0
    num_warps: int = 4
    num_stages: int = 2

    def as_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "Config":
        """The Config held in ``d`` (a cache entry: extra keys such as "source" are ignored)."""
        return cls(**{k: int(d[k]) for k in CONFIG_FIELDS})

    def launch_kwargs(self) -> dict:
        kw = {"BLOCK_P": self.BLOCK_P, "BLOCK_C": self.BLOCK_C,
              "num_warps": self.num_warps, "num_stages": self.num_stages}
        if self.BLOCK_R:
            kw["BLOCK_R"] = self.BLOCK_R
        return kw


#: The fields of a Config, in order: what a cache entry must hold.
CONFIG_FIELDS = tuple(f.name for f in fields(Config))


# --- channel gate -----------------------------------------------------------------------------------
def channel_gate_heuristic(C: int, CR: int, HW: int, dtype: torch.dtype) -> Config:
    """A tile that compiles for any C and C/r: dims >= 16 for tl.dot, h kept in registers."""
    block_r = max(16, next_pow2(CR))
    if INTERPRET:  # fewer, larger programs: the interpreter's cost is per program, not per element
        return Config(BLOCK_P=min(128, max(16, next_pow2(HW))), BLOCK_C=max(16, next_pow2(C)),
                      BLOCK_R=block_r, num_warps=4, num_stages=1)
    # Up to C = 128 one tile holds every channel, so x is read from memory once (ONE_TILE); beyond, chunks
    # of 64 channels keep the x and W tiles small.
    block_c = max(16, next_pow2(C)) if C <= 128 else 64
    # h (BLOCK_P x BLOCK_R fp32) lives in registers: shrink the pixel block as C/r grows.
    block_p = 64 if block_r <= 64 else 32
    block_p = max(16, min(block_p, next_pow2(HW)))
    warps = 8 if block_p * block_c >= 8192 else 4
    return Config(BLOCK_P=block_p, BLOCK_C=block_c, BLOCK_R=block_r, num_warps=warps, num_stages=2)


def channel_gate_candidates(C: int, CR: int, HW: int, dtype: torch.dtype) -> list[Config]:
    """At most MAX_CANDIDATES tiles, pruned by shape and by what compiles, nearest the heuristic first.

    BLOCK_R is fixed by C/r (>= 16, a power of two). Dropped: blocks larger than the (power-of-two rounded)
    problem; an fp32 accumulator (h: BLOCK_P x BLOCK_R, a: BLOCK_P x BLOCK_C) above 128 registers per thread;
    operand tiles (x: BLOCK_P x BLOCK_C, W: BLOCK_C x BLOCK_R, times num_stages) above SMEM_BUDGET bytes of
    shared memory; num_stages 3 unless the channel loop runs at least 3 times.
    """
    block_r = max(16, next_pow2(CR))
    cmax = max(16, next_pow2(C))
    pmax = max(16, next_pow2(HW))
    esize = _itemsize(dtype)
    out = []
    for bp in (16, 32, 64, 128):
        for bc in (16, 32, 64, 128):
            if bp > pmax or bc > cmax:
                continue
            loops = -(-C // bc)
            for nw in (4, 8):
                threads = 32 * nw
                if max(bp * block_r, bp * bc) > 128 * threads:
                    continue
                for ns in ((2, 3) if loops >= 3 else (2,)):
                    if ns * (bp * bc + bc * block_r) * esize > SMEM_BUDGET:
                        continue
                    out.append(Config(bp, bc, block_r, nw, ns))
    heur = channel_gate_heuristic(C, CR, HW, dtype)
    return _nearest(out, heur) or [heur]


# --- elementwise kernels (final gate, bn_relu) --------------------------------------------------------
def elementwise_heuristic(C: int, HW: int, channels_last: bool) -> Config:
    """A 2K-4K element tile, longer along the contiguous dimension."""
    if INTERPRET:
        return Config(BLOCK_P=min(256, max(16, next_pow2(HW))), BLOCK_C=min(64, max(16, next_pow2(C))),
                      num_warps=4, num_stages=1)
    if channels_last:
        bc = max(16, min(128, next_pow2(C)))
        bp = max(16, min(4096 // bc, next_pow2(HW)))
    else:
        bp = max(16, min(256, next_pow2(HW)))
        bc = max(16, min(4096 // bp, next_pow2(C)))
    return Config(BLOCK_P=bp, BLOCK_C=bc, num_warps=4, num_stages=1)


def elementwise_candidates(C: int, HW: int, channels_last: bool) -> list[Config]:
    """At most MAX_CANDIDATES tiles of 256-8192 elements, 4-32 per thread, nearest the heuristic first.

    No block larger than the (power-of-two rounded) problem; num_stages 1 (no loop to pipeline).
    """
    cmax = max(16, next_pow2(C))
    pmax = max(16, next_pow2(HW))
    out = []
    for bp in (16, 32, 64, 128, 256, 512, 1024):
        for bc in (16, 32, 64, 128, 256):
            if bp > pmax or bc > cmax:
                continue
            for nw in (2, 4, 8):
                if 4 <= bp * bc // (32 * nw) <= 32:
                    out.append(Config(bp, bc, 0, nw, 1))
    heur = elementwise_heuristic(C, HW, channels_last)
    return _nearest(out, heur) or [heur]


# --- ranking --------------------------------------------------------------------------------------------
def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def _log2(n: int) -> float:
    return float(max(1, n).bit_length() - 1)


def _nearest(cands: list[Config], ref: Config, limit: Optional[int] = None) -> list[Config]:
    """The ``limit`` (default MAX_CANDIDATES) candidates closest to ``ref`` in log2 tile-size steps."""
    def dist(c: Config) -> tuple:
        d = (abs(_log2(c.BLOCK_P) - _log2(ref.BLOCK_P)) + abs(_log2(c.BLOCK_C) - _log2(ref.BLOCK_C))
             + 0.5 * abs(_log2(c.num_warps) - _log2(ref.num_warps))
             + 0.25 * abs(c.num_stages - ref.num_stages))
        return (d, c.BLOCK_P, c.BLOCK_C, c.num_warps, c.num_stages)

    return sorted(cands, key=dist)[: limit or MAX_CANDIDATES]


# --- training path (gam_triton/train_block.py) ------------------------------------------------------------
def bn_reduce_heuristic(C: int, N: int, channels_last: bool) -> Config:
    """Tile of the BatchNorm kernels of the training path (batch statistics, backward sums, backward apply)
    over N = B*H*W pixels: 2048 elements over 8 warps (8 per thread: these kernels hold up to three 64-bit
    pointer tiles, which spill beyond that), longer along the contiguous dimension; in the interpreter few
    large programs."""
    if INTERPRET:
        return Config(BLOCK_P=min(1024, max(16, next_pow2(N))), BLOCK_C=min(64, max(16, next_pow2(C))),
                      num_warps=4, num_stages=1)
    if channels_last:
        bc = max(16, min(64, next_pow2(C)))
        bp = max(16, min(2048 // bc, next_pow2(N)))
    else:
        bp = max(16, min(128, next_pow2(N)))
        bc = max(16, min(2048 // bp, next_pow2(C)))
    return Config(BLOCK_P=bp, BLOCK_C=bc, num_warps=8 if bp * bc >= 2048 else 4, num_stages=1)


def bn_reduce_candidates(C: int, N: int, channels_last: bool) -> list[Config]:
    """The elementwise candidates over N pixels holding at most 16 elements per thread, nearest first."""
    out = [c for c in elementwise_candidates(C, N, channels_last) if c.BLOCK_P * c.BLOCK_C <= 16 * 32 * c.num_warps]
    heur = bn_reduce_heuristic(C, N, channels_last)
    return _nearest(out, heur) or [heur]


def channel_gate_bwd_heuristic(C: int, CR: int, HW: int, dtype: torch.dtype) -> Config:
    """The channel-gate backward keeps three BLOCK_P x BLOCK_R fp32 tiles (pre-activation, dh, h) and its
    64-bit pointer tiles in registers: 8 warps, 32 pixels up to C/r = 64 and 16 beyond (fp32: from C/r = 64),
    channel chunks shrinking as C/r grows (ptxas -v, perf/NOTES.md "Training path": no spill on sm_90a)."""
    block_r = max(16, next_pow2(CR))
    if INTERPRET:
        return channel_gate_heuristic(C, CR, HW, dtype)
    fp32 = dtype == torch.float32  # fp32 operand tiles take twice the registers
    if block_r >= 256 or (fp32 and block_r >= 128):
        block_c = 16
    elif block_r >= 128 or (fp32 and block_r >= 64):
        block_c = 32
    else:
        block_c = 64
    block_c = max(16, min(block_c, next_pow2(C)))
    block_p = 16 if (block_r > 64 or (fp32 and block_r >= 64)) else 32
    block_p = max(16, min(block_p, next_pow2(HW)))
    return Config(BLOCK_P=block_p, BLOCK_C=block_c, BLOCK_R=block_r, num_warps=8, num_stages=2)


def channel_gate_bwd_candidates(C: int, CR: int, HW: int, dtype: torch.dtype) -> list[Config]:
    """Forward candidates whose three [BLOCK_P, BLOCK_R] fp32 tiles fit 128 registers per thread."""
    out = [c for c in channel_gate_candidates(C, CR, HW, dtype)
           if 3 * c.BLOCK_P * c.BLOCK_R <= 128 * 32 * c.num_warps]
    heur = channel_gate_bwd_heuristic(C, CR, HW, dtype)
    return _nearest(out, heur) or [heur]


# --- spatial convolutions (kernels/conv.py) -------------------------------------------------------------
# A convolution tile reuses the Config fields: BLOCK_P pixels x BLOCK_C output channels (the GEMM's N, per
# group), BLOCK_R the in-channel block (the GEMM's K step). num_warps stays at 4 for every candidate:
# PyTorch's Triton convolution gave wrong results with 8 warps for kernels larger than 1x1 (pytorch issue
# 173068), and nothing here has been verified on a GPU with more. Candidates are still checked against
# cuDNN when they are tuned (gam_triton.spatial).

#: Shared memory the convolution's operand tiles may take (bytes, times num_stages).
CONV_SMEM_BUDGET = 96 * 1024
#: The spatial branch's path as the autotuner stores it (a Config, so it is cached like any other
#: choice): BLOCK_P = 1 is cuDNN + the final-gate kernel, BLOCK_P = 2 the two Triton convolutions.
SPATIAL_CUDNN = Config(BLOCK_P=1, BLOCK_C=1, BLOCK_R=0, num_warps=1, num_stages=1)
SPATIAL_TRITON = Config(BLOCK_P=2, BLOCK_C=1, BLOCK_R=0, num_warps=1, num_stages=1)
#: BLOCK_P = 4: cuDNN's fused convolution + bias + ReLU for conv1 (``torch.cudnn_convolution_relu``, CUDA
#: only), then cuDNN conv2 + the final-gate kernel.
SPATIAL_CUDNN_RELU = Config(BLOCK_P=4, BLOCK_C=1, BLOCK_R=0, num_warps=1, num_stages=1)


def conv_heuristic(cin_g: int, cout_g: int, HW: int, dtype: torch.dtype) -> Config:
    """A tile that compiles for any group shape: blocks >= 16 (tl.dot), padded channels masked."""
    nmax = max(16, next_pow2(cout_g))
    kmax = max(16, next_pow2(cin_g))
    if INTERPRET:  # few, large programs: the interpreter's cost is per program and per loop step
        return Config(BLOCK_P=min(64, max(16, next_pow2(HW))), BLOCK_C=min(nmax, 128), BLOCK_R=min(kmax, 128),
                      num_warps=4, num_stages=1)
    # 32-channel tiles (ptxas -v, see perf/NOTES.md): at most 16 in-channels per group (grouped conv2 up to
    # C = 256: narrow, mostly unvectorised loads; a 64-channel tile took 150-180 registers on sm_80), and
    # 33-63 out-channels per group (C640 grouped conv1, 40: a 64-channel tile spilled 24 bytes on sm_100).
    block_n = min(nmax, 32 if cin_g <= 16 or 32 < cout_g < 64 else 64)
    block_k = min(kmax, 32 if _itemsize(dtype) == 4 else 64)
    # 128 pixels only for narrow channel tiles with in-channel blocks that are mostly real (registers)
    # (fp32 stays at 64: 128 x 16 spilled 4 bytes on sm_80 with 48 in-channels per group).
    wide = block_n <= 16 and cin_g >= 16 and _itemsize(dtype) < 4
    block_p = max(16, min(128 if wide else 64, next_pow2(HW)))
    return Config(BLOCK_P=block_p, BLOCK_C=block_n, BLOCK_R=block_k, num_warps=4, num_stages=2)


def conv_candidates(cin_g: int, cout_g: int, HW: int, dtype: torch.dtype) -> list[Config]:
    """At most MAX_CANDIDATES conv tiles nearest the heuristic, pruned by shape and by what compiles.

    Dropped: blocks larger than the (power-of-two rounded) problem; an fp32 accumulator (BLOCK_P x BLOCK_C)
    above 64 registers per thread (128 threads); operand tiles (x: BLOCK_P x BLOCK_R, W: BLOCK_R x BLOCK_C,
    times num_stages) above CONV_SMEM_BUDGET. Under the interpreter: the heuristic only.
    """
    heur = conv_heuristic(cin_g, cout_g, HW, dtype)
    if INTERPRET:  # timings mean nothing there (tests that emulate a GPU): do not run a dozen 7x7 convs
        return [heur]
    nmax = max(16, next_pow2(cout_g))
    kmax = max(16, next_pow2(cin_g))
    pmax = max(16, next_pow2(HW))
    esize = _itemsize(dtype)
    out = []
    for bp in (32, 64, 128):
        for bn in (16, 32, 64, 128):
            for bk in (16, 32, 64):
                if bp > max(32, pmax) or bn > nmax or bk > kmax or bp * bn > 64 * 128:
                    continue
                for ns in (2, 3, 4):
                    if ns * (bp * bk + bk * bn) * esize <= CONV_SMEM_BUDGET:
                        out.append(Config(bp, bn, bk, 4, ns))
    return _nearest(out, heur) or [heur]
