"""Launch configurations of the Triton kernels: the heuristic default and the candidate set per shape.

A :class:`Config` names the tile (BLOCK_P pixels x BLOCK_C channels; BLOCK_R >= C/r for the channel gate)
and the launch options (num_warps, num_stages). The autotuner (:mod:`gam_triton.autotune`) benchmarks the
candidates on a GPU and falls back to the heuristic everywhere else.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from ._runtime import INTERPRET


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
        fields = {k: int(d[k]) for k in ("BLOCK_P", "BLOCK_C", "BLOCK_R", "num_warps", "num_stages")}
        return cls(**fields)

    def launch_kwargs(self) -> dict:
        kw = {"BLOCK_P": self.BLOCK_P, "BLOCK_C": self.BLOCK_C,
              "num_warps": self.num_warps, "num_stages": self.num_stages}
        if self.BLOCK_R:
            kw["BLOCK_R"] = self.BLOCK_R
        return kw


# --- channel gate -----------------------------------------------------------------------------------
def channel_gate_heuristic(C: int, CR: int, HW: int, dtype: torch.dtype) -> Config:
    """A tile that compiles for any C and C/r: dims >= 16 for tl.dot, h kept in registers."""
    block_r = max(16, next_pow2(CR))
    if INTERPRET:  # fewer, larger programs: the interpreter's cost is per program, not per element
        return Config(BLOCK_P=min(128, max(16, next_pow2(HW))), BLOCK_C=max(16, next_pow2(C)),
                      BLOCK_R=block_r, num_warps=4, num_stages=1)
    block_c = max(16, min(64, next_pow2(C)))
    # h (BLOCK_P x BLOCK_R fp32) lives in registers: shrink the pixel block as C/r grows.
    block_p = 64 if block_r <= 64 else 32
    block_p = max(16, min(block_p, next_pow2(HW)))
    return Config(BLOCK_P=block_p, BLOCK_C=block_c, BLOCK_R=block_r, num_warps=4, num_stages=2)


def channel_gate_candidates(C: int, CR: int, HW: int, dtype: torch.dtype) -> list[Config]:
    """Candidates pruned by shape: no block larger than the problem, BLOCK_R fixed by C/r."""
    block_r = max(16, next_pow2(CR))
    cmax = max(16, next_pow2(C))
    pmax = max(16, next_pow2(HW))
    out = []
    for bp in (16, 32, 64, 128):
        for bc in (16, 32, 64, 128):
            for nw in (2, 4, 8):
                if bp > pmax or bc > cmax:
                    continue
                if bp * block_r > 128 * 128:  # h would spill: too many fp32 registers per program
                    continue
                out.append(Config(bp, bc, block_r, nw, 2))
    return out or [channel_gate_heuristic(C, CR, HW, dtype)]


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
    cmax = max(16, next_pow2(C))
    pmax = max(16, next_pow2(HW))
    out = []
    for bp in (16, 32, 64, 128, 256, 512):
        for bc in (16, 32, 64, 128):
            if bp > pmax or bc > cmax or not 512 <= bp * bc <= 8192:
                continue
            for nw in (4, 8):
                out.append(Config(bp, bc, 0, nw, 1))
    return out or [elementwise_heuristic(C, HW, channels_last)]
