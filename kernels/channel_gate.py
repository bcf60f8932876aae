"""Channel gate of GAM: the per-pixel channel MLP and its gate, fused in one kernel.

For every pixel p of every image b (x viewed as B x C x HW through its strides, so NCHW-contiguous and
channels_last inputs are read in place, without permute copies):

    h_p  = relu(W1 x_p + b1)          W1: CR x C  (CR = C / rate)
    a_p  = W2 h_p + b2                W2: C x CR
    x1_p = x_p * g(a_p)               g = sigmoid (SIGMOID=True) or identity

Reads x once from DRAM (B*C*HW elements; when C > BLOCK_C the second pass re-reads the tile, which the
program touched a moment before, from L2), reads W1, b1, W2, b2 (2*C*CR + C + CR elements, cached), writes
x1 once (B*C*HW elements). h and a live only in registers. FLOPs: 4 * B*HW * C * CR.
"""
import triton
import triton.language as tl


@triton.jit
def _load_x(x_base, offs_p, offs_c, HW, C, stride_xc, stride_xp):
    """Load the [BLOCK_P, BLOCK_C] tile of x at pixels offs_p and channels offs_c (0 outside)."""
    mask = (offs_p[:, None] < HW) & (offs_c[None, :] < C)
    ptrs = x_base + offs_p[:, None] * stride_xp + offs_c[None, :].to(tl.int64) * stride_xc
    return tl.load(ptrs, mask=mask, other=0.0)


@triton.jit
def _dot(a, b, acc, DOT_F32: tl.constexpr, INPUT_PRECISION: tl.constexpr):
    """acc + a @ b with fp32 accumulation; DOT_F32 upcasts the operands first."""
    if DOT_F32:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision=INPUT_PRECISION)
    return tl.dot(a, b, acc, input_precision=INPUT_PRECISION)


@triton.jit
def _hidden_chunk(h, x, w1_ptr, offs_c, offs_r, C, CR,
                  DOT_F32: tl.constexpr, INPUT_PRECISION: tl.constexpr):
    """h += x[:, chunk] @ W1[:, chunk]^T for the channel chunk offs_c.  h: [BLOCK_P, BLOCK_R] fp32."""
    w1t = tl.load(w1_ptr + offs_r[None, :] * C + offs_c[:, None],
                  mask=(offs_r[None, :] < CR) & (offs_c[:, None] < C), other=0.0)  # [BLOCK_C, BLOCK_R]
    return _dot(x.to(w1_ptr.dtype.element_ty), w1t, h, DOT_F32, INPUT_PRECISION)


@triton.jit
def _gate_chunk(h, x, w2_ptr, b2_ptr, o_base, offs_p, offs_c, offs_r, HW, C, CR, stride_oc, stride_op,
                SIGMOID: tl.constexpr, DOT_F32: tl.constexpr, INPUT_PRECISION: tl.constexpr):
    """out[:, chunk] = x[:, chunk] * g(h @ W2[chunk, :]^T + b2[chunk]) for the channel chunk offs_c."""
    c_mask = offs_c < C
    w2t = tl.load(w2_ptr + offs_c[None, :] * CR + offs_r[:, None],
                  mask=c_mask[None, :] & (offs_r[:, None] < CR), other=0.0)  # [BLOCK_R, BLOCK_C]
    a = _dot(h, w2t, tl.zeros((h.shape[0], offs_c.shape[0]), dtype=tl.float32), DOT_F32, INPUT_PRECISION)
    a += tl.load(b2_ptr + offs_c, mask=c_mask, other=0.0).to(tl.float32)[None, :]
    if SIGMOID:
        a = tl.sigmoid(a)
    out = x.to(tl.float32) * a
    mask = (offs_p[:, None] < HW) & c_mask[None, :]
    tl.store(o_base + offs_p[:, None] * stride_op + offs_c[None, :].to(tl.int64) * stride_oc,
             out.to(o_base.dtype.element_ty), mask=mask)


@triton.jit
def channel_gate_fwd_kernel(
    x_ptr, w1_ptr, b1_ptr, w2_ptr, b2_ptr, out_ptr,
    HW, C, CR,
    stride_xb, stride_xc, stride_xp,
    stride_ob, stride_oc, stride_op,
    SIGMOID: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_R: tl.constexpr,
    DOT_F32: tl.constexpr, INPUT_PRECISION: tl.constexpr, N_CHUNKS: tl.constexpr,
):
    """x1 = x * g(W2 relu(W1 x + b1) + b2) for BLOCK_P pixels of one image.

    Grid: (B * cdiv(HW, BLOCK_P),), image-major (no 65535 limit on the batch). W1 (CR x C) and W2 (C x CR)
    are row-major contiguous; b1, b2 contiguous. The dots run in the weights' dtype (x is rounded to it
    first, as nn.Linear under autocast does) with fp32 accumulation; DOT_F32 upcasts both operands to fp32
    (the interpreter's bf16 dot is wrong). BLOCK_R >= CR and BLOCK_R, BLOCK_C, BLOCK_P >= 16 (tl.dot);
    padded rows and columns are masked to 0. N_CHUNKS = cdiv(C, BLOCK_C) (a constexpr: loops over runtime
    bounds break older interpreters). With N_CHUNKS == 1 the x tile is loaded once and kept in registers
    for both dots and the multiply; otherwise pass 2 re-reads each chunk (from L2).
    """
    n_pblocks = tl.cdiv(HW, BLOCK_P)
    pid = tl.program_id(0)
    pid_b = (pid // n_pblocks).to(tl.int64)
    pid_p = pid % n_pblocks
    offs_p = pid_p.to(tl.int64) * BLOCK_P + tl.arange(0, BLOCK_P)
    offs_r = tl.arange(0, BLOCK_R)
    x_base = x_ptr + pid_b * stride_xb
    o_base = out_ptr + pid_b * stride_ob
    b1 = tl.load(b1_ptr + offs_r, mask=offs_r < CR, other=0.0).to(tl.float32)
    h = tl.zeros((BLOCK_P, BLOCK_R), dtype=tl.float32)

    if N_CHUNKS == 1:  # one tile holds every channel: x is read once
        offs_c = tl.arange(0, BLOCK_C)
        x = _load_x(x_base, offs_p, offs_c, HW, C, stride_xc, stride_xp)
        h = _hidden_chunk(h, x, w1_ptr, offs_c, offs_r, C, CR, DOT_F32, INPUT_PRECISION)
        h = tl.maximum(h + b1[None, :], 0.0).to(w1_ptr.dtype.element_ty)  # rounded as nn.Linear's output
        _gate_chunk(h, x, w2_ptr, b2_ptr, o_base, offs_p, offs_c, offs_r, HW, C, CR, stride_oc, stride_op,
                    SIGMOID, DOT_F32, INPUT_PRECISION)
    else:
        # Pass 1: h = relu(x W1^T + b1), accumulated over channel chunks.  [BLOCK_P, BLOCK_R]
        for i in range(N_CHUNKS):
            offs_c = i * BLOCK_C + tl.arange(0, BLOCK_C)
            x = _load_x(x_base, offs_p, offs_c, HW, C, stride_xc, stride_xp)
            h = _hidden_chunk(h, x, w1_ptr, offs_c, offs_r, C, CR, DOT_F32, INPUT_PRECISION)
        h = tl.maximum(h + b1[None, :], 0.0).to(w1_ptr.dtype.element_ty)
        # Pass 2: per output-channel chunk, a = h W2^T + b2, the gate, and the multiply.
        for i in range(N_CHUNKS):
            offs_c = i * BLOCK_C + tl.arange(0, BLOCK_C)
            x = _load_x(x_base, offs_p, offs_c, HW, C, stride_xc, stride_xp)
            _gate_chunk(h, x, w2_ptr, b2_ptr, o_base, offs_p, offs_c, offs_r, HW, C, CR,
                        stride_oc, stride_op, SIGMOID, DOT_F32, INPUT_PRECISION)
