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
    n_pblocks = tl.cdiv(HW, BLOCK_P)
    pid_b = (tl.program_id(0) // n_pblocks).to(tl.int64)
    pid_p = tl.program_id(0) % n_pblocks
    pid_c = tl.program_id(1)
    offs_p = pid_p.to(tl.int64) * BLOCK_P + tl.arange(0, BLOCK_P)
    offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = offs_c < C
    mask = (offs_p[:, None] < HW) & c_mask[None, :]
    if SHUFFLE_G > 0:
        src = (offs_c % SHUFFLE_G) * CPG + offs_c // SHUFFLE_G
    else:
        src = offs_c
    scale = tl.load(scale_ptr + src, mask=c_mask, other=0.0)
    shift = tl.load(shift_ptr + src, mask=c_mask, other=0.0)
    y = tl.load(y2_ptr + pid_b * stride_yb + offs_p[:, None] * stride_yp + src[None, :] * stride_yc,
                mask=mask, other=0.0).to(tl.float32)
    x = tl.load(x1_ptr + pid_b * stride_xb + offs_p[:, None] * stride_xp + offs_c[None, :] * stride_xc,
                mask=mask, other=0.0).to(tl.float32)
    s = tl.sigmoid(y * scale[None, :] + shift[None, :])
    tl.store(out_ptr + pid_b * stride_ob + offs_p[:, None] * stride_op + offs_c[None, :] * stride_oc,
             (x * s).to(out_ptr.dtype.element_ty), mask=mask)
