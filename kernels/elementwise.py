"""GAM's elementwise kernels: the final gate and BatchNorm-apply + ReLU, over [b, c, p] tiles.

A B x C x H x W tensor is addressed as [b, c, p] with p = h * W + w through three strides, so one kernel
serves NCHW-contiguous and channels_last tensors (and any mix of them among its operands). The tiles are
(image, pixel block) pairs t = b * cdiv(HW, BLOCK_P) + pixel block, T = B * cdiv(HW, BLOCK_P) of them per
channel block. The grid is persistent, (P, cdiv(C, BLOCK_C)) with P <= T sized to the device by the op:
program p takes the tiles p, p + P, ... (the batch is not bound by the 65535 limit of the second and third
grid dimensions). Offsets are 64-bit (one image may hold
more than 2**31 elements). scale and shift are per-channel fp32 vectors (a BatchNorm2d as an affine: eval
running or batch statistics).

* :func:`final_gate_kernel` - out = x1 * sigmoid(scale * y2 + shift), with SHUFFLE_G = G > 0 the spatial map
  shuffled in G groups first, as the YOLO form's ``channel_shuffle``: output channel c reads map channel
  src(c) = (c % G) * (C / G) + c // G; with RUNS (y2's channels contiguous, G a power of two dividing
  BLOCK_C) y2 is read as G contiguous runs and transposed in registers (``kernels/shuffle.py``), else gathered
  element by element. Reads x1 and y2 once (2 * B*C*HW elements), writes out once; about 5 FLOPs per element.
* :func:`bn_relu_kernel` - z = relu(scale * y + shift), between the two convolutions where BatchNorm cannot be
  folded into the first (batch statistics). Reads y once, writes z once.

Both are memory-bound.
"""
import triton
import triton.language as tl

from .align import aligned_view
from .shuffle import run_ptrs, runs_to_columns


@triton.jit
def tile_2d(t, HW, C, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    """(image, pixel offsets [BLOCK_P], in-bounds mask) of tile t in this program's channel block."""
    n_pblocks = tl.cdiv(HW, BLOCK_P)
    pid_b = (t // n_pblocks).to(tl.int64)
    offs_p = (t % n_pblocks).to(tl.int64) * BLOCK_P + tl.arange(0, BLOCK_P)
    offs_c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    mask = (offs_p[:, None] < HW) & (offs_c[None, :] < C)
    return pid_b, offs_p, mask


@triton.jit
def tile_ptrs(ptr, pid_b, offs_p, offs_c, stride_b, stride_c, stride_p):
    """Pointers of the [BLOCK_P, BLOCK_C] tile at image pid_b, pixels offs_p, channels offs_c."""
    return ptr + pid_b * stride_b + offs_p[:, None] * stride_p + offs_c[None, :].to(tl.int64) * stride_c


@triton.jit(do_not_specialize=["B"])  # the batch: a loop bound only, one binary for all
def final_gate_kernel(
    x1_ptr, y2_ptr, scale_ptr, shift_ptr, out_ptr,
    B, HW, C, CPG,
    stride_xb, stride_xc, stride_xp,
    stride_yb, stride_yc, stride_yp,
    stride_ob, stride_oc, stride_op,
    SHUFFLE_G: tl.constexpr, RUNS: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """The [BLOCK_P, BLOCK_C] tiles p, p + P, ... of out. Grid: (P, cdiv(C, BLOCK_C)). CPG = C // G."""
    offs_c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = offs_c < C
    if SHUFFLE_G > 0:
        src = (offs_c % SHUFFLE_G) * CPG + offs_c // SHUFFLE_G
    else:
        src = offs_c
    T = B * tl.cdiv(HW, BLOCK_P)
    t = tl.program_id(0)
    while t < T:
        scale = tl.load(scale_ptr + src, mask=c_mask, other=0.0)  # per tile (cached): fewer live registers
        shift = tl.load(shift_ptr + src, mask=c_mask, other=0.0)
        pid_b, offs_p, mask = tile_2d(t, HW, C, BLOCK_P, BLOCK_C)
        if RUNS:
            ptrs, run_mask = run_ptrs(y2_ptr, pid_b * stride_yb + offs_p * stride_yp, CPG, stride_yc, SHUFFLE_G,
                                      BLOCK_C)
            y = runs_to_columns(tl.load(ptrs, mask=(offs_p < HW)[:, None, None] & run_mask, other=0.0),
                                BLOCK_P, BLOCK_C).to(tl.float32)
        else:
            y = tl.load(tile_ptrs(y2_ptr, pid_b, offs_p, src, stride_yb, stride_yc, stride_yp),
                        mask=mask, other=0.0).to(tl.float32)
        x = tl.load(tile_ptrs(x1_ptr, pid_b, offs_p, offs_c, stride_xb, stride_xc, stride_xp),
                    mask=mask, other=0.0).to(tl.float32)
        s = tl.sigmoid(y * scale[None, :] + shift[None, :])
        tl.store(tile_ptrs(out_ptr, pid_b, offs_p, offs_c, stride_ob, stride_oc, stride_op),
                 (x * s).to(out_ptr.dtype.element_ty), mask=mask)
        t += tl.num_programs(0)


@triton.jit(do_not_specialize=["B"])
def bn_relu_kernel(
    y_ptr, scale_ptr, shift_ptr, z_ptr,
    B, HW, C,
    stride_yb, stride_yc, stride_yp,
    stride_zb, stride_zc, stride_zp,
    BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr, Y_ALIGN: tl.constexpr, Z_ALIGN: tl.constexpr,
):
    """The [BLOCK_P, BLOCK_C] tiles p, p + P, ... of z. Grid: (P, cdiv(C, BLOCK_C)). Y_ALIGN, Z_ALIGN: y's and
    z's view alignments (``kernels/align.py``)."""
    HW, C, stride_yb, stride_yc, stride_yp = aligned_view(HW, C, stride_yb, stride_yc, stride_yp, Y_ALIGN)
    HW, C, stride_zb, stride_zc, stride_zp = aligned_view(HW, C, stride_zb, stride_zc, stride_zp, Z_ALIGN)
    offs_c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = offs_c < C
    T = B * tl.cdiv(HW, BLOCK_P)
    t = tl.program_id(0)
    while t < T:
        scale = tl.load(scale_ptr + offs_c, mask=c_mask, other=0.0)  # per tile (cached): fewer live registers
        shift = tl.load(shift_ptr + offs_c, mask=c_mask, other=0.0)
        pid_b, offs_p, mask = tile_2d(t, HW, C, BLOCK_P, BLOCK_C)
        y = tl.load(tile_ptrs(y_ptr, pid_b, offs_p, offs_c, stride_yb, stride_yc, stride_yp),
                    mask=mask, other=0.0).to(tl.float32)
        z = tl.maximum(y * scale[None, :] + shift[None, :], 0.0)
        tl.store(tile_ptrs(z_ptr, pid_b, offs_p, offs_c, stride_zb, stride_zc, stride_zp),
                 z.to(z_ptr.dtype.element_ty), mask=mask)
        t += tl.num_programs(0)
