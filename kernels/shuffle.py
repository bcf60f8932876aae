"""The YOLO channel shuffle read and written as contiguous runs of channels (no 2-byte gathers).

The shuffle in G groups sends map channel j = r * CPG + i (group r, CPG = C / G channels per group) to output
channel c = G * i + r. A program's block of BLOCK_C consecutive output channels c = c0 + k (c0 =
``tl.program_id(1) * BLOCK_C``; BLOCK_C a multiple of G) takes, from the map, G runs of RUN = BLOCK_C / G
consecutive channels, r * CPG + c0 / G + i. Where the map's channels are contiguous (channels_last) each run is
one vectorised access; the [BLOCK_P, G, RUN] tile is transposed in registers (Triton converts the layout
through shared memory) into the output's column order k = G * i + r, and back before a store. G and RUN are
powers of two (block shapes). Column k is valid where c0 / G + i < CPG (C = G * CPG).

Used by the final gate (``kernels/elementwise.py``) and BatchNorm2's backward (``kernels/batchnorm.py``); the ops
pick this path where the map's channel stride is 1 (``gam_triton.ops.elementwise.shuffle_runs``).
"""
import triton
import triton.language as tl


@triton.jit
def run_ptrs(ptr, rows, CPG, stride_c, G: tl.constexpr, BLOCK_C: tl.constexpr):
    """(pointers [BLOCK_P, G, BLOCK_C // G], run mask [1, 1, BLOCK_C // G]) of this program's runs of map
    channels r * CPG + c0 / G + i, at the row offsets ``rows`` [BLOCK_P] (int64, in elements)."""
    offs_i = tl.program_id(1) * (BLOCK_C // G) + tl.arange(0, BLOCK_C // G)
    chan = (tl.arange(0, G)[:, None] * CPG + offs_i[None, :]).to(tl.int64) * stride_c
    return ptr + rows[:, None, None] + chan[None, :, :], (offs_i < CPG)[None, None, :]


@triton.jit
def runs_to_columns(v, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    """[BLOCK_P, G, BLOCK_C // G] runs -> [BLOCK_P, BLOCK_C] output columns: column G * i + r = v[:, r, i]."""
    return tl.reshape(tl.permute(v, (0, 2, 1)), (BLOCK_P, BLOCK_C))


@triton.jit
def columns_to_runs(v, G: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    """[BLOCK_P, BLOCK_C] output columns -> [BLOCK_P, G, BLOCK_C // G] runs (the inverse of
    :func:`runs_to_columns`)."""
    return tl.permute(tl.reshape(v, (BLOCK_P, BLOCK_C // G, G)), (0, 2, 1))
