"""Final gate of GAM: out = x1 * sigmoid(scale * y2 + shift), with the channel shuffle folded in.

x1, y2 and out are B x C x HW views through their strides (any mix of NCHW and channels_last).
With SHUFFLE_G = G > 0 the spatial map is shuffled in G groups before the multiply, as the YOLO form's
``channel_shuffle``: output channel c reads map channel src(c) = (c % G) * (C / G) + c // G.
scale and shift are per-channel fp32 vectors (BatchNorm2d folded: eval running stats or batch stats).

Reads x1 and y2 once (2 * B*C*HW elements) and 2*C floats, writes out once (B*C*HW elements);
about 5 FLOPs per element. Memory-bound.
"""
import triton
import triton.language as tl

from .tiles import tile_2d, tile_ptrs


@triton.jit
def final_gate_kernel(
    x1_ptr, y2_ptr, scale_ptr, shift_ptr, out_ptr,
    HW, C, CPG,
    stride_xb, stride_xc, stride_xp,
    stride_yb, stride_yc, stride_yp,
    stride_ob, stride_oc, stride_op,
    SHUFFLE_G: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """One [BLOCK_P, BLOCK_C] tile of out. Grid: (B * cdiv(HW, BLOCK_P), cdiv(C, BLOCK_C)). CPG = C // G."""
    pid_b, offs_p, offs_c, mask = tile_2d(HW, C, BLOCK_P, BLOCK_C)
    c_mask = offs_c < C
    if SHUFFLE_G > 0:
        src = (offs_c % SHUFFLE_G) * CPG + offs_c // SHUFFLE_G
    else:
        src = offs_c
    scale = tl.load(scale_ptr + src, mask=c_mask, other=0.0)
    shift = tl.load(shift_ptr + src, mask=c_mask, other=0.0)
    y = tl.load(tile_ptrs(y2_ptr, pid_b, offs_p, src, stride_yb, stride_yc, stride_yp),
                mask=mask, other=0.0).to(tl.float32)
    x = tl.load(tile_ptrs(x1_ptr, pid_b, offs_p, offs_c, stride_xb, stride_xc, stride_xp),
                mask=mask, other=0.0).to(tl.float32)
    s = tl.sigmoid(y * scale[None, :] + shift[None, :])
    tl.store(tile_ptrs(out_ptr, pid_b, offs_p, offs_c, stride_ob, stride_oc, stride_op),
             (x * s).to(out_ptr.dtype.element_ty), mask=mask)
