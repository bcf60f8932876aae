"""BatchNorm-apply + ReLU between GAM's two convolutions: z = relu(scale * y + shift).

Used where BatchNorm cannot be folded into the first convolution (train mode, batch statistics).
y and z are B x C x HW views through their strides; scale and shift are per-channel fp32 vectors.
Reads y once (B*C*HW elements) and 2*C floats, writes z once (B*C*HW elements). Memory-bound.
"""
import triton
import triton.language as tl

from .tiles import tile_2d, tile_ptrs


@triton.jit
def bn_relu_kernel(
    y_ptr, scale_ptr, shift_ptr, z_ptr,
    HW, C,
    stride_yb, stride_yc, stride_yp,
    stride_zb, stride_zc, stride_zp,
    BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """One [BLOCK_P, BLOCK_C] tile of z. Grid: (B * cdiv(HW, BLOCK_P), cdiv(C, BLOCK_C))."""
    pid_b, offs_p, offs_c, mask = tile_2d(HW, C, BLOCK_P, BLOCK_C)
    c_mask = offs_c < C
    scale = tl.load(scale_ptr + offs_c, mask=c_mask, other=0.0)
    shift = tl.load(shift_ptr + offs_c, mask=c_mask, other=0.0)
    y = tl.load(tile_ptrs(y_ptr, pid_b, offs_p, offs_c, stride_yb, stride_yc, stride_yp),
                mask=mask, other=0.0).to(tl.float32)
    z = tl.maximum(y * scale[None, :] + shift[None, :], 0.0)
    tl.store(tile_ptrs(z_ptr, pid_b, offs_p, offs_c, stride_zb, stride_zc, stride_zp),
             z.to(z_ptr.dtype.element_ty), mask=mask)
