"""GAM's two spatial convolutions (eval mode) as implicit GEMMs with fused epilogues.

Both are KxK convolutions (K odd, stride 1, "same" padding K // 2), plain or grouped (G groups), over a
B x CIN x H x W activation read through its four strides (NHWC / channels_last is the fast layout; NCHW
is read correctly, with strided loads). The GEMM per group: M = B*H*W pixels, N = COUT_G output channels,
K = CIN_G * K*K; a program owns a [BLOCK_P pixels, BLOCK_N channels] tile of one image and one group and
loops over (kh, kw, in-channel block), as Inductor's convolution template does. Padded rows, columns and
taps outside the map are masked to 0, so BLOCK_N = 16 serves COUT_G = 4 (tl.dot needs dims >= 16).

Offsets: the image term is int64; offsets within one image are int32 unless I64 (set by the launcher when
an image of any operand spans 2**31 elements or more), which saves registers.

Weights are packed once as W[kh, kw, ci, co] (contiguous; co = g * COUT_G + n), groups of fewer than 16 channels
merged into block-diagonal ones where that costs no MMAs (``gam_triton.ops.conv.pack_weight``): CIN_G and COUT_G
then carry the divisibility-by-16 hint and both K-loop operands load as 16-byte cp.async vectors. Dots run in the
weights' dtype, fp32 accumulation (fp32: INPUT_PRECISION); DOT_F32 upcasts both (the interpreter's bf16 dot).

* :func:`conv_bn_relu_kernel` - z1 = relu(conv(x1, W1) + b1), BatchNorm1 folded into W1 and b1; z1 written
  once. Reads x1 (B*C*HW elements, plus the halo re-read from L1/L2), W1; writes z1 (B*C/r*HW elements).
* :func:`conv_split_kernel` and :func:`split_sum_kernel` - conv1 split-K (``gam_triton.ops.conv.split_k``: grids
  under 0.6 waves with long K loops): the first writes the fp32 partial sums of SPLIT parts of the K loop (equal
  ones as the heuristic picks them; SPLIT x B*HW*COUT fp32, each element once), the second sums them in split
  order, adds the bias, applies ReLU and casts into z1 (reads the partials, writes z1). Deterministic: no atomics.
  Extra traffic over the one-launch kernel: the partials written and read (8 x SPLIT bytes per z1 element) and a
  second launch.
* :func:`conv_gate_kernel` - out[:, dst(co)] = x1[:, dst(co)] * sigmoid(scale[co] * (conv(z1, W2) + b2)[co]
  + shift[co]): BatchNorm2, sigmoid, channel shuffle (dst(co) = (co % CPG) * G + co // CPG, the inverse of
  the YOLO shuffle's src(c) = (c % G) * CPG + c // G, CPG = C / SHUFFLE_G) and the gate multiply; y2 never
  exists in memory. Reads z1 (+ halo), W2, x1 (B*C*HW elements), writes out (B*C*HW elements).

FLOPs of each: 2 * B*H*W * COUT * CIN_G * K*K (of the unmerged groups; tensor-core FLOPs are higher by the
merge factor, and by BLOCK_N / COUT_G when the channel tile is padded).
"""
import triton
import triton.language as tl

from .channel_gate import _dot  # acc + a @ b, fp32 accumulation (operands upcast when DOT_F32)
from .elementwise import tile_2d, tile_ptrs  # the persistent [b, c, p] tiles of the memory-bound kernels


@triton.jit
def _wide(t, I64: tl.constexpr):
    """t as int64 when I64 (an image of more than 2**31 elements), else as is (int32: fewer registers)."""
    if I64:
        return t.to(tl.int64)
    return t


@triton.jit
def _program_tile(HW, N_BLOCKS, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr, I64: tl.constexpr):
    """(image (int64), pixel offsets [BLOCK_P], group, channel offsets in the group [BLOCK_N]).

    Grid: (B * cdiv(HW, BLOCK_P), G * N_BLOCKS), image-major (no 65535 limit on the batch). Offsets within
    an image are int64 only when I64: the batch term is always int64.
    """
    n_pblocks = tl.cdiv(HW, BLOCK_P)
    pid = tl.program_id(0)
    pid_b = (pid // n_pblocks).to(tl.int64)
    offs_p = _wide(pid % n_pblocks, I64) * BLOCK_P + tl.arange(0, BLOCK_P)
    g = tl.program_id(1) // N_BLOCKS
    offs_n = (tl.program_id(1) % N_BLOCKS) * BLOCK_N + tl.arange(0, BLOCK_N)
    return pid_b, offs_p, g, offs_n


@triton.jit
def _conv_acc(x_ptr, w_ptr, pid_b, offs_p, g, offs_n, H, W, CIN_G, COUT, COUT_G,
              stride_xb, stride_xc, stride_xh, stride_xw, step_lo, STEPS: tl.constexpr, CLAMP: tl.constexpr,
              KSIZE: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
              K_BLOCKS: tl.constexpr, DOT_F32: tl.constexpr, INPUT_PRECISION: tl.constexpr, I64: tl.constexpr):
    """acc[p, n] = sum over (kh, kw, ci) of x[b, g*CIN_G + ci, h + kh - K//2, w + kw - K//2] *
    W[kh, kw, ci, g*COUT_G + n], fp32, for the pixels p = h * W + w of offs_p, over the K steps step_lo ...
    step_lo + STEPS - 1 (a constant trip count) of one flat loop of KSIZE*KSIZE*K_BLOCKS steps (K_BLOCKS =
    cdiv(CIN_G, BLOCK_K)); step = tap * K_BLOCKS + in-channel block; with CLAMP, steps past the last are masked
    off. The whole loop (0, KSIZE*KSIZE*K_BLOCKS) or one split of it (:func:`conv_split_kernel`)."""
    PAD: tl.constexpr = KSIZE // 2
    oh = offs_p // W
    ow = offs_p % W
    p_ok = offs_p < H * W
    x_base = x_ptr + pid_b * stride_xb + _wide(g * CIN_G, I64) * stride_xc
    cols = g * COUT_G + offs_n
    n_ok = offs_n < COUT_G
    acc = tl.zeros((BLOCK_P, BLOCK_N), dtype=tl.float32)
    for i in range(STEPS):
        step = step_lo + i
        tap = step // K_BLOCKS
        offs_k = (step % K_BLOCKS) * BLOCK_K + tl.arange(0, BLOCK_K)
        if CLAMP:  # no in-channel is in range in a step past the last
            k_ok = offs_k < tl.where(step < KSIZE * KSIZE * K_BLOCKS, CIN_G, 0)
        else:
            k_ok = offs_k < CIN_G
        ih = oh + (tap // KSIZE - PAD)
        iw = ow + (tap % KSIZE - PAD)
        row_ok = p_ok & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
        x_ptrs = x_base + (ih * stride_xh + iw * stride_xw)[:, None] + _wide(offs_k[None, :], I64) * stride_xc
        xv = tl.load(x_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        w_ptrs = w_ptr + (tap * CIN_G + offs_k[:, None]) * COUT + cols[None, :]
        wv = tl.load(w_ptrs, mask=k_ok[:, None] & n_ok[None, :], other=0.0)
        acc = _dot(xv.to(w_ptr.dtype.element_ty), wv, acc, DOT_F32, INPUT_PRECISION)
    return acc


@triton.jit
def conv_bn_relu_kernel(
    x_ptr, w_ptr, b_ptr, z_ptr,
    H, W, CIN_G, COUT, COUT_G, N_BLOCKS,
    stride_xb, stride_xc, stride_xh, stride_xw,
    stride_zb, stride_zc, stride_zp,
    KSIZE: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    K_BLOCKS: tl.constexpr, DOT_F32: tl.constexpr, INPUT_PRECISION: tl.constexpr, I64: tl.constexpr,
):
    """z[b, co, p] = relu(conv(x, W)[b, co, p] + bias[co]) for one tile (see the module docstring).

    w_ptr: packed W[kh, kw, ci, co] (COUT columns); b_ptr: COUT biases (BatchNorm1 folded). z is addressed
    as [b, c, p] through three strides (p = h * W + w).
    """
    pid_b, offs_p, g, offs_n = _program_tile(H * W, N_BLOCKS, BLOCK_P, BLOCK_N, I64)
    acc = _conv_acc(x_ptr, w_ptr, pid_b, offs_p, g, offs_n, H, W, CIN_G, COUT, COUT_G,
                    stride_xb, stride_xc, stride_xh, stride_xw, 0, KSIZE * KSIZE * K_BLOCKS, False,
                    KSIZE, BLOCK_P, BLOCK_N, BLOCK_K, K_BLOCKS, DOT_F32, INPUT_PRECISION, I64)
    n_ok = offs_n < COUT_G
    co = g * COUT_G + offs_n
    bias = tl.load(b_ptr + co, mask=n_ok, other=0.0).to(tl.float32)
    z = tl.maximum(acc + bias[None, :], 0.0)
    mask = (offs_p < H * W)[:, None] & n_ok[None, :]
    z_ptrs = z_ptr + pid_b * stride_zb + offs_p[:, None] * stride_zp + _wide(co[None, :], I64) * stride_zc
    tl.store(z_ptrs, z.to(z_ptr.dtype.element_ty), mask=mask)


@triton.jit
def conv_split_kernel(
    x_ptr, w_ptr, part_ptr,
    H, W, CIN_G, COUT, COUT_G, N_BLOCKS,
    stride_xb, stride_xc, stride_xh, stride_xw,
    KSIZE: tl.constexpr, SPLIT: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr, K_BLOCKS: tl.constexpr, DOT_F32: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    I64: tl.constexpr,
):
    """Split-K conv1, first launch: part[s, b, p, co] = the sum of conv(x, W)[b, co, p] over split s of the K
    loop (its steps [s * STEPS, min((s + 1) * STEPS, KSIZE*KSIZE*K_BLOCKS)), STEPS = cdiv(KSIZE*KSIZE*K_BLOCKS,
    SPLIT)), fp32, no bias or ReLU (:func:`split_sum_kernel` applies them).

    Grid: (B * cdiv(HW, BLOCK_P), G * N_BLOCKS, SPLIT); the tile as :func:`conv_bn_relu_kernel`'s. Reads x (+
    halo) and W once over all splits; writes part, SPLIT x B x HW x COUT fp32 (contiguous, channels last), each
    element exactly once: no atomics, so the sum :func:`split_sum_kernel` forms is the same bits on every run.
    """
    TOTAL: tl.constexpr = KSIZE * KSIZE * K_BLOCKS
    STEPS: tl.constexpr = (TOTAL + SPLIT - 1) // SPLIT
    pid_b, offs_p, g, offs_n = _program_tile(H * W, N_BLOCKS, BLOCK_P, BLOCK_N, I64)
    s = tl.program_id(2)
    # equal splits (what the launcher picks) need no clamp: a clamped bound spilled 8 B on sm_80 (Triton 3.4)
    acc = _conv_acc(x_ptr, w_ptr, pid_b, offs_p, g, offs_n, H, W, CIN_G, COUT, COUT_G,
                    stride_xb, stride_xc, stride_xh, stride_xw, s * STEPS, STEPS, TOTAL % SPLIT != 0,
                    KSIZE, BLOCK_P, BLOCK_N, BLOCK_K, K_BLOCKS, DOT_F32, INPUT_PRECISION, I64)
    co = g * COUT_G + offs_n
    mask = (offs_p < H * W)[:, None] & (offs_n < COUT_G)[None, :]
    image = s.to(tl.int64) * (tl.num_programs(0) // tl.cdiv(H * W, BLOCK_P)) + pid_b  # s * B + b
    ptrs = part_ptr + image * H * W * COUT + _wide(offs_p[:, None] * COUT + co[None, :], I64)
    tl.store(ptrs, acc, mask=mask)


@triton.jit(do_not_specialize=["B"])  # the batch: a loop bound only, one binary for all
def split_sum_kernel(
    part_ptr, b_ptr, z_ptr,
    B, HW, C,
    stride_zb, stride_zc, stride_zp,
    SPLIT: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """Split-K conv1, second launch: z[b, c, p] = relu(part[0, b, p, c] + ... + part[SPLIT - 1, b, p, c] +
    bias[c]), summed in that fixed order in fp32, cast to z's dtype. C = COUT.

    Grid: persistent (P, cdiv(C, BLOCK_C)) over the [BLOCK_P, BLOCK_C] tiles of (image, pixel block) t = p, p + P,
    ... as the elementwise kernels' (``kernels/elementwise.py``). Reads part (SPLIT x B x HW x C fp32) and C
    biases; writes z (B x C x HW elements) through three strides. Memory-bound.
    """
    offs_c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = offs_c < C
    T = B * tl.cdiv(HW, BLOCK_P)
    split_stride = B.to(tl.int64) * HW * C
    t = tl.program_id(0)
    while t < T:
        bias = tl.load(b_ptr + offs_c, mask=c_mask, other=0.0).to(tl.float32)
        pid_b, offs_p, mask = tile_2d(t, HW, C, BLOCK_P, BLOCK_C)
        ptrs = part_ptr + pid_b * HW * C + offs_p[:, None] * C + offs_c[None, :]
        acc = tl.load(ptrs, mask=mask, other=0.0)
        for s in tl.static_range(1, SPLIT):
            acc += tl.load(ptrs + s * split_stride, mask=mask, other=0.0)
        z = tl.maximum(acc + bias[None, :], 0.0)
        tl.store(tile_ptrs(z_ptr, pid_b, offs_p, offs_c, stride_zb, stride_zc, stride_zp),
                 z.to(z_ptr.dtype.element_ty), mask=mask)
        t += tl.num_programs(0)


@triton.jit
def conv_gate_kernel(
    z_ptr, w_ptr, b_ptr, scale_ptr, shift_ptr, x1_ptr, out_ptr,
    H, W, CIN_G, COUT, COUT_G, N_BLOCKS, CPG,
    stride_zb, stride_zc, stride_zh, stride_zw,
    stride_xb, stride_xc, stride_xp,
    stride_ob, stride_oc, stride_op,
    KSIZE: tl.constexpr, SHUFFLE_G: tl.constexpr, HAS_BIAS: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    K_BLOCKS: tl.constexpr, DOT_F32: tl.constexpr, INPUT_PRECISION: tl.constexpr, I64: tl.constexpr,
):
    """out[b, d, p] = x1[b, d, p] * sigmoid(scale[co] * (conv(z, W)[b, co, p] + bias[co]) + shift[co]),
    d = dst(co) (co itself when SHUFFLE_G == 0), for one tile of conv2's channels co.

    w_ptr: packed W[kh, kw, ci, co] (COUT = C columns); scale and shift: C fp32 (BatchNorm2); b_ptr: C
    biases of conv2 (read when HAS_BIAS). x1 and out are addressed as [b, c, p] through three strides.
    """
    pid_b, offs_p, g, offs_n = _program_tile(H * W, N_BLOCKS, BLOCK_P, BLOCK_N, I64)
    acc = _conv_acc(z_ptr, w_ptr, pid_b, offs_p, g, offs_n, H, W, CIN_G, COUT, COUT_G,
                    stride_zb, stride_zc, stride_zh, stride_zw, 0, KSIZE * KSIZE * K_BLOCKS, False,
                    KSIZE, BLOCK_P, BLOCK_N, BLOCK_K, K_BLOCKS, DOT_F32, INPUT_PRECISION, I64)
    n_ok = offs_n < COUT_G
    co = g * COUT_G + offs_n
    if HAS_BIAS:
        acc += tl.load(b_ptr + co, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    scale = tl.load(scale_ptr + co, mask=n_ok, other=0.0)
    shift = tl.load(shift_ptr + co, mask=n_ok, other=0.0)
    s = tl.sigmoid(acc * scale[None, :] + shift[None, :])
    if SHUFFLE_G > 0:
        dst = (co % CPG) * SHUFFLE_G + co // CPG
    else:
        dst = co
    mask = (offs_p < H * W)[:, None] & n_ok[None, :]
    dst = _wide(dst[None, :], I64)
    x1 = tl.load(x1_ptr + pid_b * stride_xb + offs_p[:, None] * stride_xp + dst * stride_xc,
                 mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + pid_b * stride_ob + offs_p[:, None] * stride_op + dst * stride_oc,
             (x1 * s).to(out_ptr.dtype.element_ty), mask=mask)
