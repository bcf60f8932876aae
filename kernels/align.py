"""Divisibility the compiler cannot see: integers known to be multiples of a power of two below 16.

Triton specialises an integer argument on divisibility by 16 only. A stride of 8 (an 8-channel map in
channels_last, the fork form's hidden layer), a C/r of 24 or a channel stride of 196 (a 14x14 map in NCHW) is then
taken as odd, and every load along it is one element wide. The ops pass, per launch, the power of two that truly
divides such arguments (``gam_triton.ops._runtime.alignment`` and ``view_alignment``); :func:`aligned` rewrites an
argument as ``v // A * A``, equal to ``v``, whose divisibility Triton's axis analysis does derive.
"""
import triton
import triton.language as tl


@triton.jit
def aligned(v, A: tl.constexpr):
    """``v`` as a value the compiler knows to be a multiple of ``A`` where A > 1 (a power of two the launch
    checked divides ``v``); unchanged otherwise."""
    if A > 1:
        v = v // A * A
    return v


@triton.jit
def aligned_view(HW, C, stride_b, stride_c, stride_p, A: tl.constexpr):
    """(HW, C, stride_b, stride_c, stride_p) of a B x C x HW view with its launch's alignment ``A``
    (``view_alignment``): A > 1, an NCHW view (pixel stride 1) whose HW, batch and channel strides A divides;
    A < -1, a channels_last view (channel stride 1) whose C, batch and pixel strides -A divides; else unchanged.
    The unit stride is never touched (Triton makes it a constant 1)."""
    if A > 1:
        HW, stride_b, stride_c = aligned(HW, A), aligned(stride_b, A), aligned(stride_c, A)
    if A < -1:
        C, stride_b, stride_p = aligned(C, -A), aligned(stride_b, -A), aligned(stride_p, -A)
    return HW, C, stride_b, stride_c, stride_p
