"""Channel gate of GAM, forward and backward: the per-pixel channel MLP and its gate; the backward's bias sums.

x (and every B x C x H x W operand) is viewed as B x C x HW through its strides, so NCHW-contiguous and
channels_last tensors are read in place, without permute copies. Per pixel p of image b:

    h_p  = relu(W1 x_p + b1)          W1: CR x C  (CR = C / rate)
    a_p  = W2 h_p + b2                W2: C x CR
    x1_p = x_p * g(a_p)               g = sigmoid (SIGMOID=True) or identity

* :func:`channel_gate_fwd_kernel` - x1. Reads x once from DRAM (B*C*HW elements; when C > BLOCK_C the second
  pass re-reads the tile, touched a moment before, from L2), W1, b1, W2, b2 (2*C*CR + C + CR elements,
  cached); writes x1 once (B*C*HW elements). h and a live only in registers. FLOPs: 4 * B*HW * C * CR.
* :func:`channel_gate_bwd_kernel` - the backward, h and a recomputed from x, with dx1 = dx1_gate + dx1_conv
  (x1's two consumers, summed as they are read): da = dx1 * x (* g (1 - g) when SIGMOID),
  dh = (W2^T da) * [h > 0], dx = dx1 * g + W1^T dh. The weight gradients are GEMMs over the pixels
  (dW2 = da^T h, dW1 = dh^T x, cuBLAS) on the rows it writes: ``dah`` [B*HW, C + CR] = (da | dh) and ``h``
  [B*HW, CR] (row n = b * HW + p, the weights' dtype); split-K partials of the whole C x CR matrix per program
  would not fit at C = 1024, C/r = 256. Each program stores the column sums of its da | dh (fp32, a row of
  [n_programs, C + CR]). Reads x in three passes (from L2 after the first when C fits a few chunks), dx1_gate
  and dx1_conv twice, the weights (cached); writes dx (B*C*HW), dah (B*HW*(C+CR)), h (B*HW*CR), the partials.
  FLOPs: five dots, 10 * B*HW * C * CR. The bias gradients db2 = sum da, db1 = sum dh: a two-level tree over
  those rows in the kernel's last programs (counters, zero at launch and left zero), in a fixed order.
"""
import triton
import triton.language as tl

from .align import aligned, aligned_view


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
def _gate(h, w2_ptr, b2_ptr, offs_c, offs_r, C, CR, SIGMOID: tl.constexpr,
          DOT_F32: tl.constexpr, INPUT_PRECISION: tl.constexpr):
    """g = sigmoid(h @ W2[chunk]^T + b2[chunk]) (or the identity): [BLOCK_P, BLOCK_C] fp32."""
    c_mask = offs_c < C
    w2t = tl.load(w2_ptr + offs_c[None, :] * CR + offs_r[:, None],
                  mask=c_mask[None, :] & (offs_r[:, None] < CR), other=0.0)  # [BLOCK_R, BLOCK_C]
    a = _dot(h, w2t, tl.zeros((h.shape[0], offs_c.shape[0]), dtype=tl.float32), DOT_F32, INPUT_PRECISION)
    a += tl.load(b2_ptr + offs_c, mask=c_mask, other=0.0).to(tl.float32)[None, :]
    if SIGMOID:
        a = tl.sigmoid(a)
    return a


@triton.jit
def _gate_chunk(h, x, w2_ptr, b2_ptr, o_base, offs_p, offs_c, offs_r, HW, C, CR, stride_oc, stride_op,
                SIGMOID: tl.constexpr, DOT_F32: tl.constexpr, INPUT_PRECISION: tl.constexpr):
    """out[:, chunk] = x[:, chunk] * g for the channel chunk offs_c (g from :func:`_gate`)."""
    g = _gate(h, w2_ptr, b2_ptr, offs_c, offs_r, C, CR, SIGMOID, DOT_F32, INPUT_PRECISION)
    mask = (offs_p[:, None] < HW) & (offs_c[None, :] < C)
    tl.store(o_base + offs_p[:, None] * stride_op + offs_c[None, :].to(tl.int64) * stride_oc,
             (x.to(tl.float32) * g).to(o_base.dtype.element_ty), mask=mask)


@triton.jit
def channel_gate_fwd_kernel(
    x_ptr, w1_ptr, b1_ptr, w2_ptr, b2_ptr, out_ptr,
    HW, C, CR,
    stride_xb, stride_xc, stride_xp,
    stride_ob, stride_oc, stride_op,
    SIGMOID: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_R: tl.constexpr,
    DOT_F32: tl.constexpr, INPUT_PRECISION: tl.constexpr, N_CHUNKS: tl.constexpr,
    R_ALIGN: tl.constexpr, X_ALIGN: tl.constexpr, O_ALIGN: tl.constexpr,
):
    """x1 = x * g(W2 relu(W1 x + b1) + b2) for BLOCK_P pixels of one image.

    Grid: (B * cdiv(HW, BLOCK_P),), image-major (no 65535 limit on the batch). W1 (CR x C) and W2 (C x CR)
    are row-major contiguous; b1, b2 contiguous. The dots run in the weights' dtype (x is rounded to it
    first, as nn.Linear under autocast does) with fp32 accumulation; DOT_F32 upcasts both operands to fp32
    (the interpreter's bf16 dot is wrong). BLOCK_R >= CR and BLOCK_R, BLOCK_C, BLOCK_P >= 16 (tl.dot);
    padded rows and columns are masked to 0. N_CHUNKS = cdiv(C, BLOCK_C) (a constexpr: loops over runtime
    bounds break older interpreters). With N_CHUNKS == 1 the x tile is loaded once and kept in registers
    for both dots and the multiply; otherwise pass 2 re-reads each chunk (from L2). R_ALIGN divides CR; X_ALIGN,
    O_ALIGN: x's and out's view alignments (``kernels/align.py``).
    """
    CR = aligned(CR, R_ALIGN)
    HW, C, stride_xb, stride_xc, stride_xp = aligned_view(HW, C, stride_xb, stride_xc, stride_xp, X_ALIGN)
    HW, C, stride_ob, stride_oc, stride_op = aligned_view(HW, C, stride_ob, stride_oc, stride_op, O_ALIGN)
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


# --- the backward's helpers: weight chunks loaded once per chunk and shared by two dots ------------------
@triton.jit
def _w1_chunk(w1_ptr, c0, C, CR, BLOCK_C: tl.constexpr, BLOCK_R: tl.constexpr):
    """W1[:, c0:c0 + BLOCK_C] as a [BLOCK_R, BLOCK_C] tile (0 outside). int32 offsets formed in the loop: a
    64-bit pointer tile would be hoisted out of the loops and held in registers throughout."""
    offs_r = tl.arange(0, BLOCK_R)[:, None]
    offs_c = c0 + tl.arange(0, BLOCK_C)[None, :]
    return tl.load(w1_ptr + (offs_r * C + offs_c), mask=(offs_r < CR) & (offs_c < C), other=0.0)


@triton.jit
def _w2_chunk(w2_ptr, c0, C, CR, BLOCK_C: tl.constexpr, BLOCK_R: tl.constexpr):
    """W2[c0:c0 + BLOCK_C, :] as a [BLOCK_C, BLOCK_R] tile (0 outside), as :func:`_w1_chunk`."""
    offs_c = c0 + tl.arange(0, BLOCK_C)[:, None]
    offs_r = tl.arange(0, BLOCK_R)[None, :]
    return tl.load(w2_ptr + (offs_c * CR + offs_r), mask=(offs_c < C) & (offs_r < CR), other=0.0)


@triton.jit
def _bwd_hidden(h, x, w1_ptr, c0, C, CR, BLOCK_C: tl.constexpr, BLOCK_R: tl.constexpr,
                  DOT_F32: tl.constexpr, INPUT_PRECISION: tl.constexpr):
    """h += x[:, chunk] @ W1[:, chunk]^T for the channel chunk at c0.  h: [BLOCK_P, BLOCK_R] fp32."""
    w1c = _w1_chunk(w1_ptr, c0, C, CR, BLOCK_C, BLOCK_R)
    return _dot(x.to(w1_ptr.dtype.element_ty), tl.trans(w1c), h, DOT_F32, INPUT_PRECISION)


@triton.jit
def _bwd_gate(h, w2c, b2_ptr, offs_c, C, SIGMOID: tl.constexpr, DOT_F32: tl.constexpr, INPUT_PRECISION: tl.constexpr):
    """g = sigmoid(h @ w2c^T + b2[chunk]) (or the identity): [BLOCK_P, BLOCK_C] fp32; w2c: W2's rows of the
    channel chunk offs_c (:func:`_w2_chunk`)."""
    a = _dot(h, tl.trans(w2c), tl.zeros((h.shape[0], offs_c.shape[0]), dtype=tl.float32), DOT_F32, INPUT_PRECISION)
    a += tl.load(b2_ptr + offs_c, mask=offs_c < C, other=0.0).to(tl.float32)[None, :]
    if SIGMOID:
        a = tl.sigmoid(a)
    return a


@triton.jit
def channel_gate_bwd_kernel(
    x_ptr, ga_ptr, gb_ptr, w1_ptr, b1_ptr, w2_ptr, b2_ptr, dx_ptr, dah_ptr, h_ptr, bpart_ptr,
    count_ptr, db1_ptr, db2_ptr,
    HW, C, CR, GROUP,
    stride_xb, stride_xc, stride_xp,
    stride_ab, stride_ac, stride_ap,
    stride_bb, stride_bc, stride_bp,
    stride_db, stride_dc, stride_dp,
    SIGMOID: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_R: tl.constexpr,
    DOT_F32: tl.constexpr, INPUT_PRECISION: tl.constexpr, N_CHUNKS: tl.constexpr,
    BLOCK_Q: tl.constexpr, BLOCK_F: tl.constexpr, R_ALIGN: tl.constexpr, X_ALIGN: tl.constexpr,
    A_ALIGN: tl.constexpr, B_ALIGN: tl.constexpr, D_ALIGN: tl.constexpr,
):
    """dx and the (da | dh), h rows for BLOCK_P pixels of one image; the bias gradients db1, db2.

    Grid: (B * cdiv(HW, BLOCK_P),). ga / gb: x1's gradient from the final gate and from conv1 (any dtypes, own
    strides); dx in x's strides. Same tiling rules as the forward: BLOCK_R >= CR, every block >= 16,
    N_CHUNKS = cdiv(C, BLOCK_C). One tile per program: a persistent tile loop held 40-90 more registers (its
    invariants live across it).

    Bias sums, a two-level tree in a fixed order (deterministic): row ``pid`` of ``bpart`` ([grid + n_groups,
    C + CR] fp32) gets the tile's column sums of da | dh; the programs form groups of GROUP consecutive ones, and
    the last of a group to finish (counter ``count_ptr[1 + group]``) sums its group's rows into row grid + group;
    the last group to finish (counter ``count_ptr[0]``) sums those into db2 | db1. Each sum runs [BLOCK_Q,
    BLOCK_F] tiles, added elementwise and reduced once per column block (:func:`_sum_rows`). Counters: zero at
    launch, left zero. R_ALIGN divides CR (without it C/r = 24, 40 or 72 spilled up to 824 B on sm_80, its rows
    stored element by element); X_ALIGN, A_ALIGN, B_ALIGN, D_ALIGN: the view alignments of x, ga, gb and dx
    (``kernels/align.py``).
    """
    CR = aligned(CR, R_ALIGN)
    HW, C, stride_xb, stride_xc, stride_xp = aligned_view(HW, C, stride_xb, stride_xc, stride_xp, X_ALIGN)
    HW, C, stride_ab, stride_ac, stride_ap = aligned_view(HW, C, stride_ab, stride_ac, stride_ap, A_ALIGN)
    HW, C, stride_bb, stride_bc, stride_bp = aligned_view(HW, C, stride_bb, stride_bc, stride_bp, B_ALIGN)
    HW, C, stride_db, stride_dc, stride_dp = aligned_view(HW, C, stride_db, stride_dc, stride_dp, D_ALIGN)
    n_pblocks = tl.cdiv(HW, BLOCK_P)
    pid = tl.program_id(0)
    pid_b = (pid // n_pblocks).to(tl.int64)
    offs_p = (pid % n_pblocks).to(tl.int64) * BLOCK_P + tl.arange(0, BLOCK_P)
    ld = C + CR
    bpart = bpart_ptr + pid.to(tl.int64) * ld
    offs_r = tl.arange(0, BLOCK_R)
    p_mask = offs_p < HW
    r_mask = offs_r < CR
    rows = pid_b * HW + offs_p  # row of the [B*HW, .] scratch matrices
    x_base = x_ptr + pid_b * stride_xb
    a_base = ga_ptr + pid_b * stride_ab
    b_base = gb_ptr + pid_b * stride_bb
    wdt = w1_ptr.dtype.element_ty

    # Pass 1: h = relu(x W1^T + b1), rounded to the weights' dtype as nn.Linear's output; relu's gradient mask
    # is h > 0 (what autograd's relu reads: its output), so the pre-activation is not kept.
    h = tl.zeros((BLOCK_P, BLOCK_R), dtype=tl.float32)
    for i in range(N_CHUNKS):
        x = _load_x(x_base, offs_p, i * BLOCK_C + tl.arange(0, BLOCK_C), HW, C, stride_xc, stride_xp)
        h = _bwd_hidden(h, x, w1_ptr, i * BLOCK_C, C, CR, BLOCK_C, BLOCK_R, DOT_F32, INPUT_PRECISION)
    h = tl.maximum(h + tl.load(b1_ptr + offs_r, mask=r_mask, other=0.0).to(tl.float32)[None, :], 0.0).to(wdt)
    hr_mask = p_mask[:, None] & r_mask[None, :]
    tl.store(h_ptr + rows[:, None] * CR + offs_r[None, :], h, mask=hr_mask)

    # Pass 2: da per channel chunk (stored, its column sums too), dh accumulated; W2's chunk loaded once for both
    # dots.
    dh = tl.zeros((BLOCK_P, BLOCK_R), dtype=tl.float32)
    for i in range(N_CHUNKS):
        offs_c = i * BLOCK_C + tl.arange(0, BLOCK_C)
        c_mask = offs_c < C
        x = _load_x(x_base, offs_p, offs_c, HW, C, stride_xc, stride_xp).to(tl.float32)
        d1 = _load_x(a_base, offs_p, offs_c, HW, C, stride_ac, stride_ap).to(tl.float32)
        d1 += _load_x(b_base, offs_p, offs_c, HW, C, stride_bc, stride_bp).to(tl.float32)
        w2c = _w2_chunk(w2_ptr, i * BLOCK_C, C, CR, BLOCK_C, BLOCK_R)  # [BLOCK_C, BLOCK_R]
        g = _bwd_gate(h, w2c, b2_ptr, offs_c, C, SIGMOID, DOT_F32, INPUT_PRECISION)
        da = d1 * x
        if SIGMOID:
            da = da * g * (1.0 - g)
        tl.store(bpart + offs_c, tl.sum(da, 0), mask=c_mask)
        da = da.to(wdt)
        tl.store(dah_ptr + rows[:, None] * ld + offs_c[None, :], da, mask=p_mask[:, None] & c_mask[None, :])
        dh = _dot(da, w2c, dh, DOT_F32, INPUT_PRECISION)
    dh = tl.where(h > 0, dh, 0.0)
    tl.store(bpart + C + offs_r, tl.sum(dh, 0), mask=r_mask)
    dh = dh.to(wdt)
    tl.store(dah_ptr + rows[:, None] * ld + C + offs_r[None, :], dh, mask=hr_mask)

    # Pass 3: dx = dx1 * g + dh W1, per channel chunk (g recomputed rather than kept).
    for i in range(N_CHUNKS):
        offs_c = i * BLOCK_C + tl.arange(0, BLOCK_C)
        c_mask = offs_c < C
        d1 = _load_x(a_base, offs_p, offs_c, HW, C, stride_ac, stride_ap).to(tl.float32)
        d1 += _load_x(b_base, offs_p, offs_c, HW, C, stride_bc, stride_bp).to(tl.float32)
        g = _bwd_gate(h, _w2_chunk(w2_ptr, i * BLOCK_C, C, CR, BLOCK_C, BLOCK_R), b2_ptr, offs_c, C, SIGMOID, DOT_F32,
                  INPUT_PRECISION)
        w1c = _w1_chunk(w1_ptr, i * BLOCK_C, C, CR, BLOCK_C, BLOCK_R)  # [BLOCK_R, BLOCK_C]
        dx = _dot(dh, w1c, d1 * g, DOT_F32, INPUT_PRECISION)
        tl.store(dx_ptr + pid_b * stride_db + offs_p[:, None] * stride_dp + offs_c[None, :].to(tl.int64) * stride_dc,
                 dx.to(dx_ptr.dtype.element_ty), mask=p_mask[:, None] & c_mask[None, :])

    # Bias sums: the last program of each group sums the group's rows, the last group's summer sums the groups.
    n_prog = tl.num_programs(0)
    n_groups = tl.cdiv(n_prog, GROUP)
    group = pid // GROUP
    g0 = group * GROUP
    tl.debug_barrier()
    done = tl.atomic_add(count_ptr + 1 + group, 1, sem="acq_rel")
    if done == tl.minimum(GROUP, n_prog - g0) - 1:
        tl.store(count_ptr + 1 + group, 0)  # left zeroed for the next use
        _sum_rows(bpart_ptr + g0.to(tl.int64) * ld, tl.minimum(GROUP, n_prog - g0), ld, C,
                  bpart_ptr + (n_prog + group).to(tl.int64) * ld, bpart_ptr, BLOCK_Q, BLOCK_F, False)
        tl.debug_barrier()
        done = tl.atomic_add(count_ptr, 1, sem="acq_rel")
        if done == n_groups - 1:
            tl.store(count_ptr, 0)
            _sum_rows(bpart_ptr + n_prog.to(tl.int64) * ld, n_groups, ld, C, db2_ptr, db1_ptr, BLOCK_Q, BLOCK_F, True)


@triton.jit
def _sum_rows(src, n_rows, ld, C, dst, dst2, BLOCK_Q: tl.constexpr, BLOCK_F: tl.constexpr, SPLIT: tl.constexpr):
    """Column sums of the n_rows x ld fp32 rows at src (row stride ld), in row order: [BLOCK_Q, BLOCK_F] tiles
    added elementwise, reduced once per column block; cdiv(n_rows, BLOCK_Q) * cdiv(ld, BLOCK_F) serial steps. To
    dst (fp32, ld) or, with SPLIT, columns [0, C) to dst and [C, ld) to dst2, in their dtypes."""
    f0 = 0
    while f0 < ld:
        offs_f = f0 + tl.arange(0, BLOCK_F)
        f_mask = offs_f < ld
        acc = tl.zeros([BLOCK_Q, BLOCK_F], dtype=tl.float32)
        q0 = 0
        while q0 < n_rows:
            offs_q = q0 + tl.arange(0, BLOCK_Q)
            m = (offs_q < n_rows)[:, None] & f_mask[None, :]
            acc += tl.load(src + (offs_q.to(tl.int64) * ld)[:, None] + offs_f[None, :], mask=m, other=0.0,
                           cache_modifier=".cg")
            q0 += BLOCK_Q
        s = tl.sum(acc, 0)
        if SPLIT:
            tl.store(dst + offs_f, s.to(dst.dtype.element_ty), mask=offs_f < C)
            tl.store(dst2 + (offs_f - C), s.to(dst2.dtype.element_ty), mask=f_mask & (offs_f >= C))
        else:
            tl.store(dst + offs_f, s, mask=f_mask)
        f0 += BLOCK_F
