"""BatchNorm-apply + ReLU between GAM's two convolutions: z = relu(scale * y + shift).

Used where BatchNorm cannot be folded into the first convolution (train mode, batch statistics).
y and z are B x C x HW views through their strides; scale and shift are per-channel fp32 vectors.
Reads y once (B*C*HW elements) and 2*C floats, writes z once (B*C*HW elements). Memory-bound.
"""
import triton
import triton.language as tl


@triton.jit
def bn_relu_kernel(
    y_ptr, scale_ptr, shift_ptr, z_ptr,
    HW, C,
    stride_yb, stride_yc, stride_yp,
    stride_zb, stride_zc, stride_zp,
    BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """One [BLOCK_P, BLOCK_C] tile of z. Grid: (B * cdiv(HW, BLOCK_P), cdiv(C, BLOCK_C))."""
    n_pblocks = tl.cdiv(HW, BLOCK_P)
    pid_b = (tl.program_id(0) // n_pblocks).to(tl.int64)
    pid_p = tl.program_id(0) % n_pblocks
    pid_c = tl.program_id(1)
    offs_p = pid_p.to(tl.int64) * BLOCK_P + tl.arange(0, BLOCK_P)
    offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = offs_c < C
    mask = (offs_p[:, None] < HW) & c_mask[None, :]
    scale = tl.load(scale_ptr + offs_c, mask=c_mask, other=0.0)
    shift = tl.load(shift_ptr + offs_c, mask=c_mask, other=0.0)
    y = tl.load(y_ptr + pid_b * stride_yb + offs_p[:, None] * stride_yp + offs_c[None, :] * stride_yc,
                mask=mask, other=0.0).to(tl.float32)
    z = tl.maximum(y * scale[None, :] + shift[None, :], 0.0)
    tl.store(z_ptr + pid_b * stride_zb + offs_p[:, None] * stride_zp + offs_c[None, :] * stride_zc,
             z.to(z_ptr.dtype.element_ty), mask=mask)
