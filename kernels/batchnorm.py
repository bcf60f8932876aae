"""BatchNorm2d with batch statistics, as GAM trains it: the forward's statistics and the backward's reductions.

Tensors are B x C x HW views through their strides (NCHW-contiguous and channels_last alike), addressed by a
flat pixel index n = b * HW + p over the N = B*HW values of each channel, in T = cdiv(N, BLOCK_P) pixel tiles.
Every kernel runs on a persistent grid (P, cdiv(C, BLOCK_C)) with P <= T sized to the device by the op: program
p of a channel block takes the tiles p, p + P, p + 2P, ... (a partition that depends only on N, BLOCK_P and P).

The reductions accumulate elementwise over their tiles ([BLOCK_P, BLOCK_C] fp32 accumulators) and reduce once
after the loop, store per-channel fp32 partials and bump integer counters (no float atomics). The finalisation
is a two-level tree of fixed shape: the programs of a channel block form groups of GROUP consecutive program
ids; the last program of a group to finish combines the group's partials (in program order) into a group
partial, and the last group to finish combines the group partials (in group order) and writes the results.
With P <= GROUP**2 each level is one step of GROUP rows, so no program runs more than two serial finalisation
steps, and the sums are bitwise reproducible for a given grid (they do not depend on which program finished
last). The grid follows the device's SM count, so results may differ in the last bits between GPUs with
different SM counts. The counters (int32, :func:`counter_slots` of them per reduction, laid out as
``[top per channel block, one, groups per channel block]``) must be zero at launch; the kernels leave them zero.
The partials buffer is [P + cdiv(P, GROUP), 2, C] fp32 (program partials, then group partials).

* :func:`bn_stats_kernel` - forward statistics. Per program: a Welford mean and M2 = sum (y - mean)^2 per
  accumulator element (no fp32 copy of y), merged over the tile rows after the loop; programs and groups are
  combined with Chan's parallel formula (M2 = M2_a + M2_b + (mean_b - mean_a)^2 n_a n_b / (n_a + n_b)), which
  stays accurate where sum y^2 - N mean^2 would cancel. Writes stats [4, C] fp32 = (mean, invstd,
  scale = gamma * invstd, shift = beta - mean * scale) and, when UPDATE, the running statistics as
  ``nn.BatchNorm2d`` does (momentum or cumulative average with ``num_batches_tracked``, unbiased variance).
  Reads y once (N*C elements), writes 2*C floats per program of partials and O(C) results. ~8 FLOPs per element.
* :func:`bn_bwd_reduce_kernel` - the two per-channel sums of BatchNorm's backward, sum dt and sum dt * xhat,
  where dt is the gradient reaching BN's output t = scale * y + shift: MODE 0 (BN1 + ReLU) dt = dz * [t > 0];
  MODE 1 (BN2 + sigmoid + shuffle + final gate) dt = dout[dst(j)] * x1[dst(j)] * s (1 - s), s = sigmoid(t),
  dst the inverse shuffle (with RUNS, where y's channels are contiguous, a program's channel block is
  consecutive output channels and y, dy are read and written as contiguous runs: ``kernels/shuffle.py``; else
  consecutive map channels, dout and x1 gathered). Writes dgamma = sum dt * xhat and dbeta = sum dt (in the
  parameters' dtype) and coef [2, C] fp32 = (mean dt, mean dt * xhat). Reads y and dz (MODE 0) or y2, dout,
  x1 (MODE 1) once.
* :func:`bn_bwd_apply_kernel` - the elementwise pass: dy = scale * (dt - mean dt - xhat * mean dt * xhat)
  (scale = gamma * invstd), and in MODE 1 also dx1 = dout * s at the shuffled channel. Reads what the
  reduction reads, writes dy (MODE 1: and dx1). ~15 FLOPs per element. Memory-bound.
"""
import triton
import triton.language as tl

from .align import aligned_view
from .shuffle import columns_to_runs, run_ptrs, runs_to_columns

#: Programs per group of the finalisation tree, and rows of partials combined per step ([GROUP, BLOCK_C] fp32
#: tiles). The op keeps P <= GROUP**2: one step per level.
GROUP = tl.constexpr(32)


@triton.jit
def flat_rows(offs_n, HW, stride_b, stride_p):
    """Element offsets [BLOCK_P] of the flat pixels offs_n (int64) of channel 0."""
    b = offs_n // HW
    return b * stride_b + (offs_n - b * HW) * stride_p


@triton.jit
def flat_ptrs(ptr, offs_n, offs_c, HW, stride_b, stride_c, stride_p):
    """Pointers of the [BLOCK_P, BLOCK_C] tile at flat pixels offs_n (int64) and channels offs_c."""
    return ptr + flat_rows(offs_n, HW, stride_b, stride_p)[:, None] + offs_c[None, :].to(tl.int64) * stride_c


@triton.jit
def _program_counts(offs_q, N, P, BLOCK_P: tl.constexpr):
    """Valid pixels of programs offs_q < P (fp32): their tiles offs_q, offs_q + P, ... below T, the last tile
    of the grid (held by program (T - 1) % P) short by T * BLOCK_P - N."""
    T = tl.cdiv(N, BLOCK_P)
    tiles = (T - 1 - offs_q) // P + 1
    short = tl.where(offs_q == (T - 1) % P, T * BLOCK_P - N, 0)
    return (tiles.to(tl.int64) * BLOCK_P - short).to(tl.float32)


@triton.jit
def _arrive(count_ptr, slot, n_arrivals):
    """Bump counter ``slot`` (after this program's stores); True for the last of ``n_arrivals``, which also
    zeroes the counter for the next reduction that uses it."""
    tl.debug_barrier()
    done = tl.atomic_add(count_ptr + slot, 1, sem="acq_rel")
    last = done == n_arrivals - 1
    if last:
        tl.store(count_ptr + slot, 0)
    return last


@triton.jit
def _chan_rows(part_ptr, row0, n_rows, nq_all, offs_c, c_mask, C, BLOCK_C: tl.constexpr):
    """(n, mean, M2) of partial rows row0 .. row0 + n_rows - 1 (n_rows <= GROUP, counts nq_all [GROUP]),
    combined in one fixed-order step (Chan)."""
    offs_r = tl.arange(0, GROUP)
    r_mask = offs_r < n_rows
    m = r_mask[:, None] & c_mask[None, :]
    rows = part_ptr + ((row0 + offs_r).to(tl.int64) * 2 * C)[:, None] + offs_c[None, :]
    mq = tl.load(rows, mask=m, other=0.0, cache_modifier=".cg")
    m2q = tl.load(rows + C, mask=m, other=0.0, cache_modifier=".cg")
    nq = tl.where(r_mask, nq_all, 0.0)
    n = tl.sum(nq, 0)
    mean = tl.sum(nq[:, None] * mq, 0) / n
    dm = mq - mean[None, :]
    m2 = tl.sum(tl.where(m, m2q + nq[:, None] * dm * dm, 0.0), 0)
    return n, mean, m2


@triton.jit
def _sum_rows(part_ptr, row0, n_rows, offs_c, c_mask, C):
    """(sum part[r, 0], sum part[r, 1]) over rows row0 .. row0 + n_rows - 1 (n_rows <= GROUP), one step."""
    offs_r = tl.arange(0, GROUP)
    m = (offs_r < n_rows)[:, None] & c_mask[None, :]
    rows = part_ptr + ((row0 + offs_r).to(tl.int64) * 2 * C)[:, None] + offs_c[None, :]
    return (tl.sum(tl.load(rows, mask=m, other=0.0, cache_modifier=".cg"), 0),
            tl.sum(tl.load(rows + C, mask=m, other=0.0, cache_modifier=".cg"), 0))


@triton.jit
def bn_stats_kernel(
    y_ptr, part_ptr, count_ptr, stats_ptr, weight_ptr, bias_ptr, rmean_ptr, rvar_ptr, nbt_ptr,
    N, HW, C, stride_b, stride_c, stride_p, eps, momentum,
    HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, UPDATE: tl.constexpr, CUMULATIVE: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr, Y_ALIGN: tl.constexpr,
):
    """Batch mean / variance of y per channel (see the module docstring). part: [P + cdiv(P, GROUP), 2, C]
    fp32 scratch. Y_ALIGN: y's view alignment (``kernels/align.py``).

    CUMULATIVE: momentum=None (factor 1 / (num_batches_tracked + 1)); num_batches_tracked is incremented by
    the last channel block to finish, after every block has read it.
    """
    HW, C, stride_b, stride_c, stride_p = aligned_view(HW, C, stride_b, stride_c, stride_p, Y_ALIGN)
    N = N // HW * HW  # B * HW, as divisible as HW
    pid_n = tl.program_id(0)
    pid_c = tl.program_id(1)
    P = tl.num_programs(0)
    n_cblocks = tl.num_programs(1)
    T = tl.cdiv(N, BLOCK_P)
    offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = offs_c < C
    # Welford per accumulator element over this program's tiles (cnt: per tile row; only the grid's last tile
    # has invalid rows), then Chan over the rows.
    acc_mean = tl.zeros([BLOCK_P, BLOCK_C], dtype=tl.float32)
    acc_m2 = tl.zeros([BLOCK_P, BLOCK_C], dtype=tl.float32)
    cnt = tl.zeros([BLOCK_P], dtype=tl.float32)
    q = pid_n
    while q < T:
        offs_n = q.to(tl.int64) * BLOCK_P + tl.arange(0, BLOCK_P)
        n_mask = offs_n < N
        mask = n_mask[:, None] & c_mask[None, :]
        y = tl.load(flat_ptrs(y_ptr, offs_n, offs_c, HW, stride_b, stride_c, stride_p), mask=mask,
                    other=0.0).to(tl.float32)
        cnt += n_mask.to(tl.float32)
        r = tl.where(n_mask, 1.0 / tl.maximum(cnt, 1.0), 0.0)
        delta = y - acc_mean
        acc_mean += delta * r[:, None]
        acc_m2 += tl.where(n_mask[:, None], delta * (y - acc_mean), 0.0)
        q += P
    n_p = tl.sum(cnt, 0)
    mean_p = tl.sum(cnt[:, None] * acc_mean, 0) / n_p
    dm = acc_mean - mean_p[None, :]
    base = part_ptr + pid_n.to(tl.int64) * 2 * C
    tl.store(base + offs_c, mean_p, mask=c_mask)
    tl.store(base + C + offs_c, tl.sum(acc_m2 + cnt[:, None] * dm * dm, 0), mask=c_mask)
    # the tree: the last program of this group combines the group (rows GROUP*g ..), then the last group all
    G = tl.cdiv(P, GROUP)
    g = pid_n // GROUP
    g_rows = tl.minimum(P - g * GROUP, GROUP)
    gslot = n_cblocks + 1 + pid_c * G + g
    if _arrive(count_ptr, gslot, g_rows):
        nq = _program_counts(g * GROUP + tl.arange(0, GROUP), N, P, BLOCK_P)
        n_g, mean_g, m2_g = _chan_rows(part_ptr, g * GROUP, g_rows, nq, offs_c, c_mask, C, BLOCK_C)
        gbase = part_ptr + (P + g).to(tl.int64) * 2 * C
        tl.store(gbase + offs_c, mean_g, mask=c_mask)
        tl.store(gbase + C + offs_c, m2_g, mask=c_mask)
        if _arrive(count_ptr, pid_c, G):
            # counts of the groups: sums of their programs' counts (GROUP x GROUP, fixed)
            offs_g = tl.arange(0, GROUP)
            qq = offs_g[:, None] * GROUP + offs_g[None, :]
            ng = tl.sum(tl.where(qq < P, _program_counts(qq, N, P, BLOCK_P), 0.0), 1)
            n, mean, m2 = _chan_rows(part_ptr, P, G, ng, offs_c, c_mask, C, BLOCK_C)
            var = m2 / N
            invstd = 1.0 / tl.sqrt(var + eps)
            scale = invstd
            if HAS_WEIGHT:
                scale = scale * tl.load(weight_ptr + offs_c, mask=c_mask, other=0.0).to(tl.float32)
            shift = -mean * scale
            if HAS_BIAS:
                shift += tl.load(bias_ptr + offs_c, mask=c_mask, other=0.0).to(tl.float32)
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
                tl.store(rvar_ptr + offs_c,
                         ((1.0 - factor) * rv + factor * unbiased).to(rvar_ptr.dtype.element_ty), mask=c_mask)
                tl.debug_barrier()
                finished = tl.atomic_add(count_ptr + n_cblocks, 1, sem="acq_rel")
                if finished == n_cblocks - 1:
                    tl.store(nbt_ptr, nbt + 1)
                    tl.store(count_ptr + n_cblocks, 0)


@triton.jit
def _bn_vectors(stats_ptr, offs_c, c_mask, C):
    """(mean, invstd, scale, shift) of channels offs_c from stats [4, C] fp32."""
    mean = tl.load(stats_ptr + offs_c, mask=c_mask, other=0.0)
    invstd = tl.load(stats_ptr + C + offs_c, mask=c_mask, other=0.0)
    scale = tl.load(stats_ptr + 2 * C + offs_c, mask=c_mask, other=0.0)
    shift = tl.load(stats_ptr + 3 * C + offs_c, mask=c_mask, other=0.0)
    return mean, invstd, scale, shift


@triton.jit
def _bwd_tile(q, N, g_ptr, x1_ptr, y_ptr, mean, invstd, scale, shift, cm, co, c_mask, HW, CPG,
              stride_gb, stride_gc, stride_gp, stride_xb, stride_xc, stride_xp,
              stride_yb, stride_yc, stride_yp, MODE: tl.constexpr, SHUFFLE_G: tl.constexpr, RUNS: tl.constexpr,
              BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    """(offs_n, n_mask, mask, dt, xhat, s, go) of pixel tile q, columns (map channel cm of y, output channel co
    of the block; see :func:`_columns`): dt the gradient at BN's output. RUNS: y read as contiguous runs
    (``kernels/shuffle.py``; its masked load leaves the columns past C at 0)."""
    offs_n = q.to(tl.int64) * BLOCK_P + tl.arange(0, BLOCK_P)
    n_mask = offs_n < N
    mask = n_mask[:, None] & c_mask[None, :]
    if RUNS:
        ptrs, run_mask = run_ptrs(y_ptr, flat_rows(offs_n, HW, stride_yb, stride_yp), CPG, stride_yc, SHUFFLE_G,
                                  BLOCK_C)
        y = runs_to_columns(tl.load(ptrs, mask=n_mask[:, None, None] & run_mask, other=0.0), BLOCK_P, BLOCK_C)
    else:
        y = tl.load(flat_ptrs(y_ptr, offs_n, cm, HW, stride_yb, stride_yc, stride_yp), mask=mask, other=0.0)
    y = y.to(tl.float32)
    t = y * scale[None, :] + shift[None, :]
    xhat = (y - mean[None, :]) * invstd[None, :]
    go = tl.load(flat_ptrs(g_ptr, offs_n, co, HW, stride_gb, stride_gc, stride_gp), mask=mask,
                 other=0.0).to(tl.float32)
    if MODE == 0:
        s = t
        dt = tl.where(t > 0, go, 0.0)
    else:
        xv = tl.load(flat_ptrs(x1_ptr, offs_n, co, HW, stride_xb, stride_xc, stride_xp), mask=mask,
                     other=0.0).to(tl.float32)
        s = tl.sigmoid(t)
        dt = go * xv * s * (1.0 - s)
    return offs_n, n_mask, mask, dt, xhat, s, go


@triton.jit
def _columns(C, CPG, MODE: tl.constexpr, SHUFFLE_G: tl.constexpr, RUNS: tl.constexpr, BLOCK_C: tl.constexpr):
    """(cm, co, c_mask) of this program's channel block: column k holds map channel cm[k] of y (and dy) and
    output channel co[k] of the block (g, x1, dx1); co = cm in MODE 0. MODE 1: the shuffle sends cm = r * CPG + i
    to co = SHUFFLE_G * i + r; the block is consecutive map channels (gathered outputs), or with RUNS
    consecutive output channels (map channels in contiguous runs)."""
    offs = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = offs < C
    if MODE == 1 and SHUFFLE_G > 0:
        if RUNS:
            return (offs % SHUFFLE_G) * CPG + offs // SHUFFLE_G, offs, c_mask
        else:
            return offs, (offs % CPG) * SHUFFLE_G + offs // CPG, c_mask
    else:
        return offs, offs, c_mask


@triton.jit
def bn_bwd_reduce_kernel(
    g_ptr, x1_ptr, y_ptr, stats_ptr, part_ptr, count_ptr, coef_ptr, dweight_ptr, dbias_ptr,
    N, HW, C, CPG,
    stride_gb, stride_gc, stride_gp, stride_xb, stride_xc, stride_xp, stride_yb, stride_yc, stride_yp,
    MODE: tl.constexpr, SHUFFLE_G: tl.constexpr, RUNS: tl.constexpr, HAS_WEIGHT: tl.constexpr,
    HAS_BIAS: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr, G_ALIGN: tl.constexpr,
    X_ALIGN: tl.constexpr, Y_ALIGN: tl.constexpr,
):
    """sum dt and sum dt * xhat per channel of y (see the module docstring). stats: [4, C] fp32 from
    :func:`bn_stats_kernel`; part: [P + cdiv(P, GROUP), 2, C] fp32 scratch; coef: [2, C] fp32 output. G_ALIGN,
    X_ALIGN, Y_ALIGN: the view alignments of g, x1 and y (``kernels/align.py``)."""
    HW, C, stride_gb, stride_gc, stride_gp = aligned_view(HW, C, stride_gb, stride_gc, stride_gp, G_ALIGN)
    HW, C, stride_xb, stride_xc, stride_xp = aligned_view(HW, C, stride_xb, stride_xc, stride_xp, X_ALIGN)
    HW, C, stride_yb, stride_yc, stride_yp = aligned_view(HW, C, stride_yb, stride_yc, stride_yp, Y_ALIGN)
    N = N // HW * HW  # B * HW, as divisible as HW
    pid_n = tl.program_id(0)
    pid_c = tl.program_id(1)
    P = tl.num_programs(0)
    n_cblocks = tl.num_programs(1)
    T = tl.cdiv(N, BLOCK_P)
    offs_c, co, c_mask = _columns(C, CPG, MODE, SHUFFLE_G, RUNS, BLOCK_C)
    mean, invstd, scale, shift = _bn_vectors(stats_ptr, offs_c, c_mask, C)
    acc_dt = tl.zeros([BLOCK_P, BLOCK_C], dtype=tl.float32)
    acc_dtx = tl.zeros([BLOCK_P, BLOCK_C], dtype=tl.float32)
    q = pid_n
    while q < T:
        offs_n, n_mask, mask, dt, xhat, s, go = _bwd_tile(
            q, N, g_ptr, x1_ptr, y_ptr, mean, invstd, scale, shift, offs_c, co, c_mask, HW, CPG, stride_gb, stride_gc,
            stride_gp, stride_xb, stride_xc, stride_xp, stride_yb, stride_yc, stride_yp, MODE, SHUFFLE_G, RUNS,
            BLOCK_P, BLOCK_C)
        acc_dt += dt
        acc_dtx += tl.where(mask, dt * xhat, 0.0)
        q += P
    base = part_ptr + pid_n.to(tl.int64) * 2 * C
    tl.store(base + offs_c, tl.sum(acc_dt, 0), mask=c_mask)
    tl.store(base + C + offs_c, tl.sum(acc_dtx, 0), mask=c_mask)
    # the tree (module docstring): group sums in program order, then the group sums in group order
    G = tl.cdiv(P, GROUP)
    g = pid_n // GROUP
    if _arrive(count_ptr, n_cblocks + 1 + pid_c * G + g, tl.minimum(P - g * GROUP, GROUP)):
        s_dt, s_dtx = _sum_rows(part_ptr, g * GROUP, tl.minimum(P - g * GROUP, GROUP), offs_c, c_mask, C)
        gbase = part_ptr + (P + g).to(tl.int64) * 2 * C
        tl.store(gbase + offs_c, s_dt, mask=c_mask)
        tl.store(gbase + C + offs_c, s_dtx, mask=c_mask)
        if _arrive(count_ptr, pid_c, G):
            sum_dt, sum_dtx = _sum_rows(part_ptr, P, G, offs_c, c_mask, C)
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
    MODE: tl.constexpr, SHUFFLE_G: tl.constexpr, RUNS: tl.constexpr, BLOCK_P: tl.constexpr,
    BLOCK_C: tl.constexpr, G_ALIGN: tl.constexpr, X_ALIGN: tl.constexpr, Y_ALIGN: tl.constexpr,
    D_ALIGN: tl.constexpr, E_ALIGN: tl.constexpr,
):
    """dy = scale * (dt - coef[0] - xhat * coef[1]) over this program's tiles; MODE 1 also dx1[co] = dout[co]
    * s. dy has y's strides (stride_d*), dx1 x1's shape (stride_e*). *_ALIGN: the view alignments of g, x1, y, dy
    and dx1 (``kernels/align.py``)."""
    HW, C, stride_gb, stride_gc, stride_gp = aligned_view(HW, C, stride_gb, stride_gc, stride_gp, G_ALIGN)
    HW, C, stride_xb, stride_xc, stride_xp = aligned_view(HW, C, stride_xb, stride_xc, stride_xp, X_ALIGN)
    HW, C, stride_yb, stride_yc, stride_yp = aligned_view(HW, C, stride_yb, stride_yc, stride_yp, Y_ALIGN)
    HW, C, stride_db, stride_dc, stride_dp = aligned_view(HW, C, stride_db, stride_dc, stride_dp, D_ALIGN)
    HW, C, stride_eb, stride_ec, stride_ep = aligned_view(HW, C, stride_eb, stride_ec, stride_ep, E_ALIGN)
    N = N // HW * HW  # B * HW, as divisible as HW
    P = tl.num_programs(0)
    T = tl.cdiv(N, BLOCK_P)
    offs_c, co, c_mask = _columns(C, CPG, MODE, SHUFFLE_G, RUNS, BLOCK_C)
    mean, invstd, scale, shift = _bn_vectors(stats_ptr, offs_c, c_mask, C)
    k1 = tl.load(coef_ptr + offs_c, mask=c_mask, other=0.0)
    k2 = tl.load(coef_ptr + C + offs_c, mask=c_mask, other=0.0)
    q = tl.program_id(0)
    while q < T:
        offs_n, n_mask, mask, dt, xhat, s, go = _bwd_tile(
            q, N, g_ptr, x1_ptr, y_ptr, mean, invstd, scale, shift, offs_c, co, c_mask, HW, CPG, stride_gb, stride_gc,
            stride_gp, stride_xb, stride_xc, stride_xp, stride_yb, stride_yc, stride_yp, MODE, SHUFFLE_G, RUNS,
            BLOCK_P, BLOCK_C)
        dy = (scale[None, :] * (dt - k1[None, :] - xhat * k2[None, :])).to(dy_ptr.dtype.element_ty)
        if RUNS:
            ptrs, run_mask = run_ptrs(dy_ptr, flat_rows(offs_n, HW, stride_db, stride_dp), CPG, stride_dc, SHUFFLE_G,
                                      BLOCK_C)
            tl.store(ptrs, columns_to_runs(dy, SHUFFLE_G, BLOCK_P, BLOCK_C), mask=n_mask[:, None, None] & run_mask)
        else:
            tl.store(flat_ptrs(dy_ptr, offs_n, offs_c, HW, stride_db, stride_dc, stride_dp), dy, mask=mask)
        if MODE == 1:
            tl.store(flat_ptrs(dx1_ptr, offs_n, co, HW, stride_eb, stride_ec, stride_ep),
                     (go * s).to(dx1_ptr.dtype.element_ty), mask=mask)
        q += P
