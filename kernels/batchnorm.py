"""BatchNorm2d with batch statistics, as GAM trains it: the forward's statistics and the backward's reductions.

Tensors are B x C x HW views through their strides (NCHW-contiguous and channels_last alike), addressed by a
flat pixel index n = b * HW + p over the N = B*HW values of each channel. Each kernel runs on a grid
(cdiv(N, BLOCK_P), cdiv(C, BLOCK_C)); every program reduces its [BLOCK_P, BLOCK_C] tile to per-channel fp32
partials, stores them, and bumps an integer counter of its channel block (no float atomics). The program
that finds itself last combines the partials of its channel block in a fixed order (deterministic: the
result does not depend on which program finished last) and writes the per-channel results. The counters
(int32, ``cdiv(C, BLOCK_C) + 1`` of them) must be zero at launch; the kernels leave them zero.

* :func:`bn_stats_kernel` - forward statistics. Per tile: mean and M2 = sum (y - mean)^2 in fp32 (no fp32
  copy of y); combined with Chan's parallel formula (M2 = sum M2_i + sum n_i (mean_i - mean)^2), which
  stays accurate where sum y^2 - N mean^2 would cancel. Writes stats [4, C] fp32 = (mean, invstd,
  scale = gamma * invstd, shift = beta - mean * scale) and, when UPDATE, the running statistics as
  ``nn.BatchNorm2d`` does (momentum or cumulative average with ``num_batches_tracked``, unbiased variance).
  Reads y once (N*C elements), writes 2*C floats per tile of partials and O(C) results. FLOPs ~4 per element.
* :func:`bn_bwd_reduce_kernel` - the two per-channel sums of BatchNorm's backward, sum dt and sum dt * xhat,
  where dt is the gradient reaching BN's output t = scale * y + shift: MODE 0 (BN1 + ReLU) dt = dz * [t > 0];
  MODE 1 (BN2 + sigmoid + shuffle + final gate) dt = dout[dst(j)] * x1[dst(j)] * s (1 - s), s = sigmoid(t),
  dst the inverse shuffle. Writes dgamma = sum dt * xhat and dbeta = sum dt (in the parameters' dtype) and
  coef [2, C] fp32 = (mean dt, mean dt * xhat). Reads y and dz (MODE 0) or y2, dout, x1 (MODE 1) once.
* :func:`bn_bwd_apply_kernel` - the elementwise pass: dy = scale * (dt - mean dt - xhat * mean dt * xhat)
  (scale = gamma * invstd), and in MODE 1 also dx1 = dout * s at the shuffled channel. Reads what the
  reduction reads, writes dy (MODE 1: and dx1). ~15 FLOPs per element. Memory-bound.
"""
import triton
import triton.language as tl

#: Rows of partials summed at a time by the last program ([PARTIAL_ROWS, BLOCK_C] fp32 tiles). The loops over
#: them run to the runtime number of partials (a while loop: one binary for every batch and map size, and
#: registers that do not depend on the trip count; old interpreters cannot take a range over a runtime int).
PARTIAL_ROWS = tl.constexpr(32)


@triton.jit
def flat_ptrs(ptr, offs_n, offs_c, HW, stride_b, stride_c, stride_p):
    """Pointers of the [BLOCK_P, BLOCK_C] tile at flat pixels offs_n (int64) and channels offs_c."""
    b = offs_n // HW
    p = offs_n - b * HW
    return ptr + (b * stride_b + p * stride_p)[:, None] + offs_c[None, :].to(tl.int64) * stride_c


@triton.jit
def _tile_counts(offs_q, N, BLOCK_P: tl.constexpr):
    """Number of valid pixels in the tiles offs_q (fp32; garbage past the last tile, mask it)."""
    return tl.minimum(N - offs_q.to(tl.int64) * BLOCK_P, BLOCK_P).to(tl.float32)


@triton.jit
def _sum_partials(part_ptr, row, offs_c, c_mask, C, n_parts, BLOCK_C: tl.constexpr):
    """sum over tiles q of part[q, row, offs_c] (part: [n_parts, 2, C] fp32), in a fixed order."""
    acc = tl.zeros([BLOCK_C], dtype=tl.float32)
    q0 = 0
    while q0 < n_parts:
        offs_q = q0 + tl.arange(0, PARTIAL_ROWS)
        m = (offs_q < n_parts)[:, None] & c_mask[None, :]
        v = tl.load(part_ptr + (offs_q.to(tl.int64) * 2 * C + row * C)[:, None] + offs_c[None, :],
                    mask=m, other=0.0, cache_modifier=".cg")
        acc += tl.sum(v, 0)
        q0 += PARTIAL_ROWS
    return acc


@triton.jit
def bn_stats_kernel(
    y_ptr, part_ptr, count_ptr, stats_ptr, weight_ptr, bias_ptr, rmean_ptr, rvar_ptr, nbt_ptr,
    N, HW, C, stride_b, stride_c, stride_p, eps, momentum,
    HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, UPDATE: tl.constexpr, CUMULATIVE: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """Batch mean / variance of y per channel (see the module docstring). part: [n_parts, 2, C] fp32 scratch.

    CUMULATIVE: momentum=None (factor 1 / (num_batches_tracked + 1)); num_batches_tracked is incremented by
    the last channel block to finish, after every block has read it.
    """
    pid_n = tl.program_id(0)
    pid_c = tl.program_id(1)
    n_parts = tl.num_programs(0)
    n_cblocks = tl.num_programs(1)
    offs_n = pid_n.to(tl.int64) * BLOCK_P + tl.arange(0, BLOCK_P)
    offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = offs_c < C
    mask = (offs_n < N)[:, None] & c_mask[None, :]
    y = tl.load(flat_ptrs(y_ptr, offs_n, offs_c, HW, stride_b, stride_c, stride_p), mask=mask,
                other=0.0).to(tl.float32)
    cnt = tl.minimum(N - pid_n.to(tl.int64) * BLOCK_P, BLOCK_P).to(tl.float32)
    tile_mean = tl.sum(y, 0) / cnt
    d = tl.where(mask, y - tile_mean[None, :], 0.0)
    base = part_ptr + pid_n.to(tl.int64) * 2 * C
    tl.store(base + offs_c, tile_mean, mask=c_mask)
    tl.store(base + C + offs_c, tl.sum(d * d, 0), mask=c_mask)
    tl.debug_barrier()
    done = tl.atomic_add(count_ptr + pid_c, 1, sem="acq_rel")
    if done == n_parts - 1:
        # Chan: mean = sum n_q mean_q / N; M2 = sum M2_q + sum n_q (mean_q - mean)^2, fixed order.
        total = tl.zeros([BLOCK_C], dtype=tl.float32)
        q0 = 0
        while q0 < n_parts:
            offs_q = q0 + tl.arange(0, PARTIAL_ROWS)
            q_mask = offs_q < n_parts
            m = q_mask[:, None] & c_mask[None, :]
            mq = tl.load(part_ptr + (offs_q.to(tl.int64) * 2 * C)[:, None] + offs_c[None, :], mask=m, other=0.0,
                         cache_modifier=".cg")
            nq = tl.where(q_mask, _tile_counts(offs_q, N, BLOCK_P), 0.0)
            total += tl.sum(nq[:, None] * mq, 0)
            q0 += PARTIAL_ROWS
        mean = total / N
        m2 = tl.zeros([BLOCK_C], dtype=tl.float32)
        q0 = 0
        while q0 < n_parts:
            offs_q = q0 + tl.arange(0, PARTIAL_ROWS)
            q_mask = offs_q < n_parts
            m = q_mask[:, None] & c_mask[None, :]
            rows = part_ptr + (offs_q.to(tl.int64) * 2 * C)[:, None] + offs_c[None, :]
            mq = tl.load(rows, mask=m, other=0.0, cache_modifier=".cg")
            m2q = tl.load(rows + C, mask=m, other=0.0, cache_modifier=".cg")
            nq = tl.where(q_mask, _tile_counts(offs_q, N, BLOCK_P), 0.0)
            dm = mq - mean[None, :]
            m2 += tl.sum(tl.where(m, m2q + nq[:, None] * dm * dm, 0.0), 0)
            q0 += PARTIAL_ROWS
        var = m2 / N
        invstd = 1.0 / tl.sqrt(var + eps)
        scale = invstd
        if HAS_WEIGHT:
            scale = scale * tl.load(weight_ptr + offs_c, mask=c_mask, other=0.0).to(tl.float32)
        shift = -mean * scale
        if HAS_BIAS:
            shift += tl.load(bias_ptr + offs_c, mask=c_mask, other=0.0).to(tl.float32)
        tl.store(count_ptr + pid_c, 0)  # left zeroed for the next reduction that uses it
        tl.store(stats_ptr + offs_c, mean, mask=c_mask)
        tl.store(stats_ptr + C + offs_c, invstd, mask=c_mask)
        tl.store(stats_ptr + 2 * C + offs_c, scale, mask=c_mask)
        tl.store(stats_ptr + 3 * C + offs_c, shift, mask=c_mask)
        if UPDATE:
            nbt = tl.load(nbt_ptr, cache_modifier=".cg")
            if CUMULATIVE:
                factor = 1.0 / (nbt + 1).to(tl.float32)
            else:
                factor = momentum
            rm = tl.load(rmean_ptr + offs_c, mask=c_mask, other=0.0).to(tl.float32)
            rv = tl.load(rvar_ptr + offs_c, mask=c_mask, other=0.0).to(tl.float32)
            unbiased = m2 / (N - 1)
            tl.store(rmean_ptr + offs_c, ((1.0 - factor) * rm + factor * mean).to(rmean_ptr.dtype.element_ty),
                     mask=c_mask)
            tl.store(rvar_ptr + offs_c, ((1.0 - factor) * rv + factor * unbiased).to(rvar_ptr.dtype.element_ty),
                     mask=c_mask)
            tl.debug_barrier()
            finished = tl.atomic_add(count_ptr + n_cblocks, 1, sem="acq_rel")
            if finished == n_cblocks - 1:
                tl.store(nbt_ptr, nbt + 1)
                tl.store(count_ptr + n_cblocks, 0)


@triton.jit
def _bwd_tile(g_ptr, x1_ptr, y_ptr, stats_ptr, offs_n, offs_c, c_mask, mask, HW, C, CPG,
              stride_gb, stride_gc, stride_gp, stride_xb, stride_xc, stride_xp,
              stride_yb, stride_yc, stride_yp,
              MODE: tl.constexpr, SHUFFLE_G: tl.constexpr):
    """(dt, xhat, s, dst, go) of one tile: dt the gradient at BN's output, channels offs_c of y."""
    mean = tl.load(stats_ptr + offs_c, mask=c_mask, other=0.0)
    invstd = tl.load(stats_ptr + C + offs_c, mask=c_mask, other=0.0)
    scale = tl.load(stats_ptr + 2 * C + offs_c, mask=c_mask, other=0.0)
    shift = tl.load(stats_ptr + 3 * C + offs_c, mask=c_mask, other=0.0)
    y = tl.load(flat_ptrs(y_ptr, offs_n, offs_c, HW, stride_yb, stride_yc, stride_yp), mask=mask,
                other=0.0).to(tl.float32)
    t = y * scale[None, :] + shift[None, :]
    xhat = (y - mean[None, :]) * invstd[None, :]
    if MODE == 0:
        dst = offs_c
        go = tl.load(flat_ptrs(g_ptr, offs_n, offs_c, HW, stride_gb, stride_gc, stride_gp), mask=mask,
                     other=0.0).to(tl.float32)
        s = t
        dt = tl.where(t > 0, go, 0.0)
    else:
        if SHUFFLE_G > 0:  # output channel dst(j) reads map channel j (inverse of src(c))
            dst = (offs_c % CPG) * SHUFFLE_G + offs_c // CPG
        else:
            dst = offs_c
        go = tl.load(flat_ptrs(g_ptr, offs_n, dst, HW, stride_gb, stride_gc, stride_gp), mask=mask,
                     other=0.0).to(tl.float32)
        xv = tl.load(flat_ptrs(x1_ptr, offs_n, dst, HW, stride_xb, stride_xc, stride_xp), mask=mask,
                     other=0.0).to(tl.float32)
        s = tl.sigmoid(t)
        dt = go * xv * s * (1.0 - s)
    return dt, xhat, s, dst, go, scale


@triton.jit
def bn_bwd_reduce_kernel(
    g_ptr, x1_ptr, y_ptr, stats_ptr, part_ptr, count_ptr, coef_ptr, dweight_ptr, dbias_ptr,
    N, HW, C, CPG,
    stride_gb, stride_gc, stride_gp, stride_xb, stride_xc, stride_xp, stride_yb, stride_yc, stride_yp,
    MODE: tl.constexpr, SHUFFLE_G: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """sum dt and sum dt * xhat per channel of y (see the module docstring). stats: [4, C] fp32 from
    :func:`bn_stats_kernel`; part: [n_parts, 2, C] fp32 scratch; coef: [2, C] fp32 output."""
    pid_n = tl.program_id(0)
    pid_c = tl.program_id(1)
    n_parts = tl.num_programs(0)
    offs_n = pid_n.to(tl.int64) * BLOCK_P + tl.arange(0, BLOCK_P)
    offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = offs_c < C
    mask = (offs_n < N)[:, None] & c_mask[None, :]
    dt, xhat, s, dst, go, scale = _bwd_tile(g_ptr, x1_ptr, y_ptr, stats_ptr, offs_n, offs_c, c_mask, mask, HW, C,
                                            CPG, stride_gb, stride_gc, stride_gp, stride_xb, stride_xc, stride_xp,
                                            stride_yb, stride_yc, stride_yp, MODE, SHUFFLE_G)
    base = part_ptr + pid_n.to(tl.int64) * 2 * C
    tl.store(base + offs_c, tl.sum(dt, 0), mask=c_mask)
    tl.store(base + C + offs_c, tl.sum(tl.where(mask, dt * xhat, 0.0), 0), mask=c_mask)
    tl.debug_barrier()
    done = tl.atomic_add(count_ptr + pid_c, 1, sem="acq_rel")
    if done == n_parts - 1:
        tl.store(count_ptr + pid_c, 0)  # left zeroed for the next reduction that uses it
        sum_dt = _sum_partials(part_ptr, 0, offs_c, c_mask, C, n_parts, BLOCK_C)
        sum_dtx = _sum_partials(part_ptr, 1, offs_c, c_mask, C, n_parts, BLOCK_C)
        tl.store(coef_ptr + offs_c, sum_dt / N, mask=c_mask)
        tl.store(coef_ptr + C + offs_c, sum_dtx / N, mask=c_mask)
        if HAS_WEIGHT:
            tl.store(dweight_ptr + offs_c, sum_dtx.to(dweight_ptr.dtype.element_ty), mask=c_mask)
        if HAS_BIAS:
            tl.store(dbias_ptr + offs_c, sum_dt.to(dbias_ptr.dtype.element_ty), mask=c_mask)


@triton.jit
def bn_bwd_apply_kernel(
    g_ptr, x1_ptr, y_ptr, stats_ptr, coef_ptr, dy_ptr, dx1_ptr,
    N, HW, C, CPG,
    stride_gb, stride_gc, stride_gp, stride_xb, stride_xc, stride_xp, stride_yb, stride_yc, stride_yp,
    stride_db, stride_dc, stride_dp, stride_eb, stride_ec, stride_ep,
    MODE: tl.constexpr, SHUFFLE_G: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """dy = scale * (dt - coef[0] - xhat * coef[1]) for one tile; MODE 1 also dx1[dst] = dout[dst] * s.

    dy has y's strides (stride_d*), dx1 x1's shape (stride_e*)."""
    offs_n = tl.program_id(0).to(tl.int64) * BLOCK_P + tl.arange(0, BLOCK_P)
    offs_c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = offs_c < C
    mask = (offs_n < N)[:, None] & c_mask[None, :]
    dt, xhat, s, dst, go, scale = _bwd_tile(g_ptr, x1_ptr, y_ptr, stats_ptr, offs_n, offs_c, c_mask, mask, HW, C,
                                            CPG, stride_gb, stride_gc, stride_gp, stride_xb, stride_xc, stride_xp,
                                            stride_yb, stride_yc, stride_yp, MODE, SHUFFLE_G)
    k1 = tl.load(coef_ptr + offs_c, mask=c_mask, other=0.0)
    k2 = tl.load(coef_ptr + C + offs_c, mask=c_mask, other=0.0)
    dy = scale[None, :] * (dt - k1[None, :] - xhat * k2[None, :])
    tl.store(flat_ptrs(dy_ptr, offs_n, offs_c, HW, stride_db, stride_dc, stride_dp),
             dy.to(dy_ptr.dtype.element_ty), mask=mask)
    if MODE == 1:
        tl.store(flat_ptrs(dx1_ptr, offs_n, dst, HW, stride_eb, stride_ec, stride_ep),
                 (go * s).to(dx1_ptr.dtype.element_ty), mask=mask)
