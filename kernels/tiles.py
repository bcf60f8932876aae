"""Tile indexing shared by the elementwise kernels (final gate, BN-apply + ReLU).

A B x C x H x W tensor is addressed as [b, c, p] with p = h * W + w through three strides, so one
kernel serves NCHW-contiguous and channels_last tensors alike. The grid is
(B * cdiv(HW, BLOCK_P), cdiv(C, BLOCK_C)), image-major, so the batch is not bound by the 65535 limit
of the second and third grid dimensions. Offsets are 64-bit (pixel and channel terms alike, so one
image may hold more than 2**31 elements).
"""
import triton
import triton.language as tl


@triton.jit
def tile_2d(HW, C, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    """(image, pixel offsets [BLOCK_P], channel offsets [BLOCK_C], in-bounds mask) of this program."""
    n_pblocks = tl.cdiv(HW, BLOCK_P)
    pid_b = (tl.program_id(0) // n_pblocks).to(tl.int64)
    pid_p = tl.program_id(0) % n_pblocks
    offs_p = pid_p.to(tl.int64) * BLOCK_P + tl.arange(0, BLOCK_P)
    offs_c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    mask = (offs_p[:, None] < HW) & (offs_c[None, :] < C)
    return pid_b, offs_p, offs_c, mask


@triton.jit
def tile_ptrs(ptr, pid_b, offs_p, offs_c, stride_b, stride_c, stride_p):
    """Pointers of the [BLOCK_P, BLOCK_C] tile at image pid_b, pixels offs_p, channels offs_c."""
    return ptr + pid_b * stride_b + offs_p[:, None] * stride_p + offs_c[None, :].to(tl.int64) * stride_c
