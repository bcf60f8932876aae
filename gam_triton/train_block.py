"""The GAM block in train mode (BatchNorm on batch statistics) as two custom ops, forward and backward.

* :func:`gam_train_block` - the entry point the module calls in train mode on the Triton path (CUDA, or CPU
  under ``TRITON_INTERPRET=1``).
* ``gam_triton::train_block_fwd`` - channel gate kernel, conv1 (cuDNN), BN1 statistics kernel (running
  statistics updated in the kernel), BN-apply + ReLU kernel, conv2, BN2 statistics kernel, final gate kernel;
  plus one zero-fill of the reductions' counters: 8 launches. Saves x, x1, y1, z1, y2 (and x1 in the
  convolution dtype under autocast) and two [4, C] fp32 statistics tensors.
* ``gam_triton::train_block_bwd`` - BN2 + sigmoid + shuffle + final gate backward (reduction kernel, then one
  elementwise kernel writing dy2 and x1's gradient from the gate), conv2's backward (cuDNN), BN1 + ReLU
  backward (reduction, elementwise), conv1's backward, the channel gate backward kernel (sums x1's two
  gradients as it reads them, recomputes h and a from x, writes dx and the (da | dh), h rows), then the
  weight gradients of the MLP as GEMMs over the pixels (cuBLAS) and its bias gradients as sums.

Both are ``torch.library.triton_op`` on a GPU (torch.compile traces into them, the kernels launched through
``wrap_triton``) and opaque ``custom_op`` under the interpreter, like the other ops (``_runtime.define_op``,
here with the running statistics declared as mutated). Reductions are deterministic: per-tile partials and
an integer "last program finalises" counter, no float atomics. Double backward is not supported: the
backward raises when asked to build a graph (``create_graph=True``).

Traffic counting: ``perf/traffic.py`` counts aten ops as they dispatch, and a custom op as one. These ops run
several kernels, so each launch is reported to the callbacks in :data:`LAUNCH_HOOKS` (name, tensors read,
tensors written), and their aten ops are counted by re-entering the counter (see ``perf/traffic.py``).
"""
from __future__ import annotations

import contextlib
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from . import autotune
from ._runtime import (HAS_TRITON, INTERPRET, bchw_view, define_op, is_channels_last, launcher,
                       new_output, on_device)
from .reference import uses_batch_stats
from .configs import (Config, bn_reduce_candidates, bn_reduce_heuristic, channel_gate_bwd_candidates,
                      channel_gate_bwd_heuristic, channel_gate_bwd_input_precision, next_pow2)

if HAS_TRITON:
    from triton import cdiv

    from .bn_relu import _bn_relu_impl
    from .channel_gate import _channel_gate_impl
    from .final_gate import _final_gate_impl
    from .kernels.batchnorm import bn_bwd_apply_kernel, bn_bwd_reduce_kernel, bn_stats_kernel
    from .kernels.channel_gate_bwd import channel_gate_bwd_kernel

__all__ = ["gam_train_block", "LAUNCH_HOOKS", "LAUNCH_SCOPES", "OPS"]

#: Callbacks ``hook(name, read_tensors, written_tensors)`` called after each kernel these ops launch.
LAUNCH_HOOKS: list[Callable] = []
#: Context-manager factories entered around each kernel launch (a traffic counter pauses itself there: the
#: interpreter's copies of the kernel arguments are not the kernel's traffic).
LAUNCH_SCOPES: list[Callable] = []
#: Names of the ops here, for counters that expand them into their launches.
OPS = ("gam_triton::train_block_fwd", "gam_triton::train_block_bwd")


@contextlib.contextmanager
def _kernel(name: str, read, written: Callable[[], tuple]):
    """Around one kernel launch: the scopes entered, then the hooks told (``written()`` after the launch)."""
    with contextlib.ExitStack() as stack:
        for scope in LAUNCH_SCOPES:
            stack.enter_context(scope())
        yield
    if LAUNCH_HOOKS:
        w = written()
        for hook in LAUNCH_HOOKS:
            hook(name, read, w)


def _empty(device) -> torch.Tensor:
    return torch.empty(0, device=device)


# --- BatchNorm kernels -------------------------------------------------------------------------------------
def _reduce_geometry(c: int, n: int, cfg: Config) -> tuple[int, int, int, int]:
    """(n_parts, n_cblocks, BLOCK_Q, N_Q_CHUNKS) of a reduction over n pixels and c channels."""
    n_parts, n_cb = cdiv(n, cfg.BLOCK_P), cdiv(c, cfg.BLOCK_C)
    block_q = min(32, next_pow2(n_parts))  # [BLOCK_Q, BLOCK_C] partial tiles in the final sum
    return n_parts, n_cb, block_q, cdiv(n_parts, block_q)


def _reduce_config(op: str, y: torch.Tensor, extra: tuple) -> Config:
    """Heuristic / tuned tile of a BatchNorm reduction over y. Not benchmarked (the kernel bumps counters
    that must start at zero): the heuristic unless a tuned entry exists."""
    c, n = y.shape[1], y.shape[0] * y.shape[2] * y.shape[3]
    cl = is_channels_last(y)
    key = (c, next_pow2(n), str(y.dtype), cl, *extra)
    return autotune.select(op, key, bn_reduce_heuristic(c, n, cl), lambda: bn_reduce_candidates(c, n, cl), None)


def counter_slots(channels: int) -> int:
    """Counters a reduction over ``channels`` channels may need: one per channel block (blocks hold at least
    16 channels, whatever the configuration), plus one."""
    return cdiv(channels, 16) + 1


def _bn_stats_launch_args(y: torch.Tensor, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor],
                          running: tuple, eps: float, momentum: float, update: bool, counts: torch.Tensor,
                          stats: torch.Tensor, cfg: Config):
    """(kernel, grid, args, kwargs) of the statistics launch (its partials buffer allocated here, args[1]):
    what :func:`bn_stats` runs and ``perf/compile_report.py`` compiles ahead of time."""
    b, c, h, w = y.shape
    n = b * h * w
    n_parts, n_cb, block_q, n_q = _reduce_geometry(c, n, cfg)
    part = torch.empty(n_parts, 2, c, dtype=torch.float32, device=y.device)
    yv, syb, syc, syp = bchw_view(y)
    dummy = stats
    args = (yv, part, counts, stats, dummy if weight is None else weight, dummy if bias is None else bias,
            *(t if update else dummy for t in running), n, h * w, c, syb, syc, syp, float(eps),
            float(max(momentum, 0.0)))
    kwargs = dict(HAS_WEIGHT=weight is not None, HAS_BIAS=bias is not None, UPDATE=bool(update),
                  CUMULATIVE=momentum < 0, BLOCK_P=cfg.BLOCK_P, BLOCK_C=cfg.BLOCK_C, BLOCK_Q=block_q, N_Q_CHUNKS=n_q,
                  num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    return bn_stats_kernel, (n_parts, n_cb), args, kwargs


def bn_stats(y: torch.Tensor, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor],
             running: tuple, eps: float, momentum: float, update: bool, counts: torch.Tensor) -> torch.Tensor:
    """stats [4, C] fp32 = (mean, invstd, scale, shift) of y's batch statistics; running stats updated.

    ``running`` = (running_mean, running_var, num_batches_tracked) (empty tensors when ``update`` is False);
    momentum < 0 means momentum=None (cumulative average). ``counts``: zeroed int32 counters.
    """
    c = y.shape[1]
    cfg = _reduce_config("bn_stats", y, ())
    stats = torch.empty(4, c, dtype=torch.float32, device=y.device)
    kernel, grid, args, kwargs = _bn_stats_launch_args(y, weight, bias, running, eps, momentum, update, counts,
                                                       stats, cfg)
    part = args[1]
    written = (stats, part, counts, *running) if update else (stats, part, counts)
    with _kernel("bn_stats", (y, weight, bias, counts, *running), lambda: written):
        launcher(kernel)[grid](*args, **kwargs)
    return stats


def _bn_bwd_views(g: torch.Tensor, x1: Optional[torch.Tensor], y: torch.Tensor) -> tuple:
    """(gv, xv, yv, strides of g, of x1 (g's when absent), of y) of BatchNorm's backward launches."""
    gv, sgb, sgc, sgp = bchw_view(g)
    yv, syb, syc, syp = bchw_view(y)
    if x1 is None:
        xv, sxb, sxc, sxp = gv, sgb, sgc, sgp
    else:
        xv, sxb, sxc, sxp = bchw_view(x1)
    return gv, xv, yv, (sgb, sgc, sgp, sxb, sxc, sxp, syb, syc, syp)


def _bn_bwd_reduce_launch_args(mode: int, g: torch.Tensor, x1: Optional[torch.Tensor], y: torch.Tensor,
                               stats: torch.Tensor, coef: torch.Tensor, dweight: Optional[torch.Tensor],
                               dbias: Optional[torch.Tensor], shuffle: int, counts: torch.Tensor, cfg: Config):
    """(kernel, grid, args, kwargs) of the backward's reduction (partials allocated here, args[4]): what
    :func:`bn_backward` runs and ``perf/compile_report.py`` compiles ahead of time."""
    b, c, h, w = y.shape
    n, hw = b * h * w, h * w
    n_parts, n_cb, block_q, n_q = _reduce_geometry(c, n, cfg)
    part = torch.empty(n_parts, 2, c, dtype=torch.float32, device=y.device)
    gv, xv, yv, strides = _bn_bwd_views(g, x1, y)
    cpg = c // shuffle if shuffle else c
    args = (gv, xv, yv, stats, part, counts, coef, coef if dweight is None else dweight,
            coef if dbias is None else dbias, n, hw, c, cpg, *strides)
    kwargs = dict(MODE=mode, SHUFFLE_G=shuffle, HAS_WEIGHT=dweight is not None, HAS_BIAS=dbias is not None,
                  BLOCK_P=cfg.BLOCK_P, BLOCK_C=cfg.BLOCK_C, BLOCK_Q=block_q, N_Q_CHUNKS=n_q,
                  num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    return bn_bwd_reduce_kernel, (n_parts, n_cb), args, kwargs


def _bn_bwd_apply_launch_args(mode: int, g: torch.Tensor, x1: Optional[torch.Tensor], y: torch.Tensor,
                              stats: torch.Tensor, coef: torch.Tensor, dy: torch.Tensor, dx1: Optional[torch.Tensor],
                              shuffle: int, cfg: Config):
    """(kernel, grid, args, kwargs) of the backward's elementwise pass writing dy (and dx1 in mode 1)."""
    b, c, h, w = y.shape
    n, hw = b * h * w, h * w
    gv, xv, yv, strides = _bn_bwd_views(g, x1, y)
    cpg = c // shuffle if shuffle else c
    _, sdb, sdc, sdp = bchw_view(dy)
    if dx1 is None:
        seb, sec, sep = sdb, sdc, sdp
    else:
        _, seb, sec, sep = bchw_view(dx1)
    args = (gv, xv, yv, stats, coef, dy, dy if dx1 is None else dx1, n, hw, c, cpg, *strides,
            sdb, sdc, sdp, seb, sec, sep)
    kwargs = dict(MODE=mode, SHUFFLE_G=shuffle, **cfg.launch_kwargs())
    return bn_bwd_apply_kernel, (cdiv(n, cfg.BLOCK_P), cdiv(c, cfg.BLOCK_C)), args, kwargs


def bn_backward(mode: int, g: torch.Tensor, x1: Optional[torch.Tensor], y: torch.Tensor, stats: torch.Tensor,
                weight: Optional[torch.Tensor], bias: Optional[torch.Tensor], shuffle: int,
                counts: torch.Tensor) -> tuple:
    """BatchNorm's backward with batch statistics: (dy, dx1 or None, dweight or None, dbias or None).

    mode 0: BN1 + ReLU, g = dz (the gradient of relu(BN(y))). mode 1: BN2 + sigmoid + shuffle + final gate,
    g = dout, x1 the gate's other input; dx1 = dout * s is returned too. Two launches (reduce, apply).
    """
    b, c, h, w = y.shape
    n = b * h * w
    cfg = _reduce_config("bn_bwd_reduce", y, (mode, shuffle))
    dev = y.device
    coef = torch.empty(2, c, dtype=torch.float32, device=dev)
    dweight = None if weight is None else torch.empty_like(weight)
    dbias = None if bias is None else torch.empty_like(bias)
    kernel, grid, args, kwargs = _bn_bwd_reduce_launch_args(mode, g, x1, y, stats, coef, dweight, dbias, shuffle,
                                                            counts, cfg)
    part = args[4]
    with _kernel("bn_bwd_reduce", (g, x1, y, stats, counts), lambda: (part, counts, coef, dweight, dbias)):
        launcher(kernel)[grid](*args, **kwargs)

    dy = new_output(y, y.dtype, is_channels_last(y))
    dx1 = None if mode == 0 else new_output(x1, x1.dtype, is_channels_last(x1))
    cl = is_channels_last(y)
    key = (c, next_pow2(n), str(y.dtype), str(g.dtype), cl, is_channels_last(g), mode, shuffle)
    acfg = autotune.select("bn_bwd_apply", key, bn_reduce_heuristic(c, n, cl),
                           lambda: bn_reduce_candidates(c, n, cl), None)
    kernel, grid, args, kwargs = _bn_bwd_apply_launch_args(mode, g, x1, y, stats, coef, dy, dx1, shuffle, acfg)
    with _kernel("bn_bwd_apply", (g, x1, y, stats, coef), lambda: (dy, dx1)):
        launcher(kernel)[grid](*args, **kwargs)
    return dy, dx1, dweight, dbias


# --- channel gate backward ---------------------------------------------------------------------------------
def _channel_gate_bwd_launch_args(x: torch.Tensor, ga: torch.Tensor, gb: torch.Tensor, w1: torch.Tensor,
                                  b1: torch.Tensor, w2: torch.Tensor, b2: torch.Tensor, sigmoid: bool,
                                  dx: torch.Tensor, dah: torch.Tensor, hid: torch.Tensor, counts: torch.Tensor,
                                  db1: torch.Tensor, db2: torch.Tensor, cfg: Config, precision: Optional[str] = None):
    """(kernel, grid, args, kwargs) of the channel-gate backward (its bias partials allocated here, args[10]):
    what :func:`channel_gate_backward` runs and ``perf/compile_report.py`` compiles ahead of time. fp32 dots
    follow the forward's mapping ("ieee" runs as 3xTF32) up to BLOCK_R = 64
    (``configs.channel_gate_bwd_input_precision``)."""
    bsz, c, h, w = x.shape
    hw, cr = h * w, w1.shape[0]
    wdt = w1.dtype
    xv, sxb, sxc, sxp = bchw_view(x)
    av, sab, sac, sap = bchw_view(ga)
    bv, sbb, sbc, sbp = bchw_view(gb)
    _, sdb, sdc, sdp = bchw_view(dx)
    block_f = min(64, next_pow2(c + cr))
    n_prog = bsz * cdiv(hw, cfg.BLOCK_P)
    block_q = min(32, next_pow2(n_prog))
    bpart = torch.empty(n_prog, c + cr, dtype=torch.float32, device=x.device)
    args = (xv, av, bv, w1, b1, w2, b2, dx, dah, hid, bpart, counts, db1, db2, hw, c, cr,
            sxb, sxc, sxp, sab, sac, sap, sbb, sbc, sbp, sdb, sdc, sdp)
    kwargs = dict(SIGMOID=sigmoid, DOT_F32=INTERPRET or wdt == torch.float32,
                  INPUT_PRECISION=channel_gate_bwd_input_precision(wdt, cfg.BLOCK_R, precision),
                  N_CHUNKS=cdiv(c, cfg.BLOCK_C), BLOCK_Q=block_q, N_Q_CHUNKS=cdiv(n_prog, block_q),
                  BLOCK_F=block_f, N_F_CHUNKS=cdiv(c + cr, block_f), **cfg.launch_kwargs())
    return channel_gate_bwd_kernel, (n_prog,), args, kwargs


def channel_gate_backward(x: torch.Tensor, ga: torch.Tensor, gb: torch.Tensor, w1: torch.Tensor,
                          b1: torch.Tensor, w2: torch.Tensor, b2: torch.Tensor, sigmoid: bool,
                          counts: torch.Tensor) -> tuple:
    """(dx, dw1, db1, dw2, db2) of x1 = x * g(W2 relu(W1 x + b1) + b2) with dx1 = ga + gb.

    One kernel (dx, the (da | dh) and h rows, the bias gradients; ``counts``: one zeroed int32 counter),
    then dW2 = da^T h and dW1 = dh^T x as GEMMs (one mm each; NCHW with B > 1: a bmm and a sum)."""
    bsz, c, h, w = x.shape
    hw, n, cr = h * w, bsz * h * w, w1.shape[0]
    wdt = w1.dtype
    dx = new_output(x, x.dtype, is_channels_last(x))
    dah = torch.empty(n, c + cr, dtype=wdt, device=x.device)
    hid = torch.empty(n, cr, dtype=wdt, device=x.device)
    heur = channel_gate_bwd_heuristic(c, cr, hw, x.dtype)
    key = (c, cr, next_pow2(hw), autotune.batch_bucket(bsz, hw), str(x.dtype), str(wdt), is_channels_last(x))
    db1, db2 = torch.empty_like(b1), torch.empty_like(b2)

    def launch(cfg: Config) -> torch.Tensor:
        kernel, grid, args, kwargs = _channel_gate_bwd_launch_args(x, ga, gb, w1, b1, w2, b2, sigmoid, dx, dah, hid,
                                                                   counts, db1, db2, cfg)
        launcher(kernel)[grid](*args, **kwargs)
        return args[10]

    cfg = autotune.select("channel_gate_bwd", key, heur, lambda: channel_gate_bwd_candidates(c, cr, hw, x.dtype),
                          lambda cfg: autotune.bench_ms(lambda: launch(cfg)))
    parts = []
    with _kernel("channel_gate_bwd", (x, ga, gb, w1, b1, w2, b2, counts),
                 lambda: (dx, dah, hid, parts[0], db1, db2)):
        parts.append(launch(cfg))
    da, dh = dah[:, :c], dah[:, c:]
    dw2 = torch.mm(da.t(), hid)
    if is_channels_last(x) or bsz == 1:
        xf = x.permute(0, 2, 3, 1).reshape(n, c)  # a view for channels_last and for B = 1 NCHW
        dw1 = torch.mm(dh.t(), xf if xf.dtype == wdt else xf.to(wdt))
    else:
        xb = x.reshape(bsz, c, hw)
        xb = xb if xb.dtype == wdt else xb.to(wdt)
        dw1 = torch.bmm(dah.view(bsz, hw, c + cr)[:, :, c:].transpose(1, 2), xb.transpose(1, 2))
        dw1 = dw1.sum(0, dtype=torch.float32).to(wdt)
    return dx, dw1, db1, dw2, db2


# --- the two ops -------------------------------------------------------------------------------------------
def _fwd_impl(x: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor, w2: torch.Tensor, b2: torch.Tensor,
              k1: torch.Tensor, kb1: Optional[torch.Tensor], k2: torch.Tensor, kb2: Optional[torch.Tensor],
              g1: Optional[torch.Tensor], be1: Optional[torch.Tensor], g2: Optional[torch.Tensor],
              be2: Optional[torch.Tensor], rm1: torch.Tensor, rv1: torch.Tensor, nbt1: torch.Tensor,
              rm2: torch.Tensor, rv2: torch.Tensor, nbt2: torch.Tensor, sigmoid: bool, pad: int, groups: int,
              shuffle: int, eps1: float, eps2: float, mom1: float, mom2: float, update1: bool, update2: bool,
              x1_cl: bool, out_cl: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                                                   torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                                                   torch.Tensor]:
    with on_device(x):  # the tensors' device (a model on cuda:1 while cuda:0 is current)
        res = {}
        with _kernel("channel_gate", (x, w1, b1, w2, b2), lambda: (res["x1"],)):
            res["x1"] = _channel_gate_impl(x, w1, b1, w2, b2, sigmoid, x1_cl)
        x1 = res["x1"]
        cast = x1.dtype != k1.dtype
        x1c = x1.to(k1.dtype) if cast else x1
        y1 = F.conv2d(x1c, k1, kb1, padding=pad, groups=groups)
        n1, n2 = counter_slots(y1.shape[1]), counter_slots(x.shape[1])
        # counters of every reduction of the forward and the backward (the kernels leave them zero)
        counts = torch.zeros(n1 + n2 + 1, dtype=torch.int32, device=x.device)
        stats1 = bn_stats(y1, g1, be1, (rm1, rv1, nbt1), eps1, mom1, update1, counts[:n1])
        with _kernel("bn_relu", (y1, stats1), lambda: (res["z1"],)):
            res["z1"] = _bn_relu_impl(y1, stats1[2], stats1[3])
        z1 = res["z1"]
        y2 = F.conv2d(z1, k2, kb2, padding=pad, groups=groups)
        stats2 = bn_stats(y2, g2, be2, (rm2, rv2, nbt2), eps2, mom2, update2, counts[n1:n1 + n2])
        with _kernel("final_gate", (x1, y2, stats2), lambda: (res["out"],)):
            res["out"] = _final_gate_impl(x1, y2, stats2[2], stats2[3], shuffle, out_cl)
        out = res["out"]
        return out, x1, (x1c if cast else _empty(x.device)), y1, z1, y2, stats1, stats2, counts


def _fwd_fake(x, w1, b1, w2, b2, k1, kb1, k2, kb2, g1, be1, g2, be2, rm1, rv1, nbt1, rm2, rv2, nbt2, sigmoid,
              pad, groups, shuffle, eps1, eps2, mom1, mom2, update1, update2, x1_cl, out_cl):
    b, c, h, w = x.shape
    cr = k1.shape[0]
    fmt = torch.channels_last if x1_cl else torch.contiguous_format
    x1 = torch.empty_like(x, memory_format=fmt)
    cast = x.dtype != k1.dtype
    x1c = torch.empty_like(x1, dtype=k1.dtype) if cast else x.new_empty(0, dtype=torch.float32)
    fmt1 = torch.channels_last if (x1_cl and cr > 1) else torch.contiguous_format
    y1 = torch.empty((b, cr, h, w), dtype=k1.dtype, device=x.device, memory_format=fmt1)
    z1 = torch.empty_like(y1)
    fmt2 = torch.channels_last if x1_cl else torch.contiguous_format
    y2 = torch.empty((b, c, h, w), dtype=k2.dtype, device=x.device, memory_format=fmt2)
    ofmt = torch.channels_last if out_cl else torch.contiguous_format
    out = torch.empty_like(x, dtype=torch.promote_types(x.dtype, k2.dtype), memory_format=ofmt)
    slots = counter_slots(cr) + counter_slots(c) + 1
    return (out, x1, x1c, y1, z1, y2, x.new_empty((4, cr), dtype=torch.float32),
            x.new_empty((4, c), dtype=torch.float32), x.new_empty((slots,), dtype=torch.int32))


_GRAD_NAMES = ("dx", "dw1", "db1", "dw2", "db2", "dk1", "dkb1", "dk2", "dkb2", "dg1", "dbe1", "dg2", "dbe2")


def _conv_backward(dy, inp, weight, has_bias: bool, pad: int, groups: int):
    return torch.ops.aten.convolution_backward(
        dy, inp, weight, [weight.shape[0]] if has_bias else None, [1, 1], [pad, pad], [1, 1], False, [0, 0],
        groups, [True, True, has_bias])


#: 13 gradients (a fixed tuple: a list output of an op that mutates an input cannot be functionalised)
_GRADS = tuple[(torch.Tensor,) * 13]


def _bwd_impl(dout: torch.Tensor, x: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor, w2: torch.Tensor,
              b2: torch.Tensor, k1: torch.Tensor, k2: torch.Tensor, g1: Optional[torch.Tensor],
              be1: Optional[torch.Tensor], g2: Optional[torch.Tensor], be2: Optional[torch.Tensor],
              x1: torch.Tensor, x1c: torch.Tensor, y1: torch.Tensor, z1: torch.Tensor, y2: torch.Tensor,
              stats1: torch.Tensor, stats2: torch.Tensor, counts: torch.Tensor, sigmoid: bool, pad: int,
              groups: int, shuffle: int, has_kb1: bool, has_kb2: bool) -> _GRADS:
    with on_device(x):  # the tensors' device (a model on cuda:1 while cuda:0 is current)
        n1, n2 = counter_slots(y1.shape[1]), counter_slots(y2.shape[1])  # the forward's counters, zero again
        dy2, dx1_gate, dg2, dbe2 = bn_backward(1, dout, x1, y2, stats2, g2, be2, shuffle, counts[:n2])
        dz1, dk2, dkb2 = _conv_backward(dy2, z1, k2, has_kb2, pad, groups)
        dy1, _, dg1, dbe1 = bn_backward(0, dz1, None, y1, stats1, g1, be1, 0, counts[n2:n2 + n1])
        conv_in = x1c if x1c.numel() else x1
        dx1_conv, dk1, dkb1 = _conv_backward(dy1, conv_in, k1, has_kb1, pad, groups)
        dx, dw1, db1, dw2, db2 = channel_gate_backward(x, dx1_gate, dx1_conv, w1, b1, w2, b2, sigmoid,
                                                       counts[n1 + n2:])
        grads = [dx, dw1, db1, dw2, db2, dk1, dkb1, dk2, dkb2, dg1, dbe1, dg2, dbe2]
        return tuple(torch.empty(0, device=x.device) if t is None else t for t in grads)


def _bwd_fake(dout, x, w1, b1, w2, b2, k1, k2, g1, be1, g2, be2, x1, x1c, y1, z1, y2, stats1, stats2, counts,
              sigmoid, pad, groups, shuffle, has_kb1, has_kb2):
    def like(t):
        return x.new_empty(0) if t is None else torch.empty_like(t)

    dx = torch.empty_like(x)
    # the convolutions' gradients as aten's own meta kernel lays them out (cuDNN may pick channels_last)
    _, dk2, dkb2 = _conv_backward(torch.empty_like(y2), z1, k2, has_kb2, pad, groups)
    _, dk1, dkb1 = _conv_backward(torch.empty_like(y1), x1c if x1c.numel() else x1, k1, has_kb1, pad, groups)
    return (dx, like(w1), like(b1), like(w2), like(b2), dk1, dkb1 if has_kb1 else x.new_empty(0), dk2,
            dkb2 if has_kb2 else x.new_empty(0), like(g1), like(be1), like(g2), like(be2))


class _TrainBlock(torch.autograd.Function):
    """Autograd around the two ops (the forward op mutates the running statistics, so it cannot carry a
    registered autograd formula of its own)."""

    @staticmethod
    def forward(ctx, x, w1, b1, w2, b2, k1, kb1, k2, kb2, g1, be1, g2, be2, running: tuple, args: tuple):
        out, x1, x1c, y1, z1, y2, stats1, stats2, counts = _fwd_op(
            x, w1, b1, w2, b2, k1, kb1, k2, kb2, g1, be1, g2, be2, *running, *args)
        sigmoid, pad, groups, shuffle = args[:4]
        ctx.args = (sigmoid, pad, groups, shuffle, kb1 is not None, kb2 is not None)
        ctx.save_for_backward(x, w1, b1, w2, b2, k1, k2, g1, be1, g2, be2, x1, x1c, y1, z1, y2, stats1, stats2,
                              counts)
        return out

    @staticmethod
    def backward(ctx, dout):
        if torch.is_grad_enabled() and not torch.compiler.is_compiling():
            raise RuntimeError("gam_triton: the train-mode GAM block does not support double backward "
                               "(create_graph=True / higher-order gradients): its backward runs fused kernels "
                               "with no autograd formula of their own. Use the PyTorch reference module for that.")
        saved = ctx.saved_tensors
        sigmoid, pad, groups, shuffle, has_kb1, has_kb2 = ctx.args
        grads = _bwd_op(dout, *saved, sigmoid, pad, groups, shuffle, has_kb1, has_kb2)
        dx, dw1, db1, dw2, db2, dk1, dkb1, dk2, dkb2, dg1, dbe1, dg2, dbe2 = grads
        # absent biases / affine parameters come back as empty tensors: None for autograd
        present = (has_kb1, has_kb2) + tuple(t is not None for t in saved[7:11])
        dkb1, dkb2, dg1, dbe1, dg2, dbe2 = (t if keep else None for t, keep in
                                            zip((dkb1, dkb2, dg1, dbe1, dg2, dbe2), present))
        return dx, dw1, db1, dw2, db2, dk1, dkb1, dk2, dkb2, dg1, dbe1, dg2, dbe2, None, None


_RUNNING = ("rm1", "rv1", "nbt1", "rm2", "rv2", "nbt2")


if HAS_TRITON:
    _fwd_op = define_op("train_block_fwd", _fwd_impl, _fwd_fake, mutates=_RUNNING)
    _bwd_op = define_op("train_block_bwd", _bwd_impl, _bwd_fake, mutates=("counts",))


def _bn_args(bn: nn.BatchNorm2d, device) -> tuple:
    """(weight, bias, running_mean, running_var, num_batches_tracked, eps, momentum, update) of one BN."""
    update = bool(bn.training and bn.track_running_stats and bn.running_mean is not None)
    if update:
        running = (bn.running_mean, bn.running_var, bn.num_batches_tracked)
    else:
        running = (_empty(device), _empty(device), _empty(device))
    mom = -1.0 if bn.momentum is None else float(bn.momentum)
    return bn.weight, bn.bias, running, float(bn.eps), mom, update


def train_block_applies(bn1: nn.BatchNorm2d, bn2: nn.BatchNorm2d) -> bool:
    """True when both BatchNorms use batch statistics (the case this op computes)."""
    return uses_batch_stats(bn1) and uses_batch_stats(bn2)


def gam_train_block(x: torch.Tensor, lin: list, sigmoid: bool, conv1: nn.Conv2d, bn1: nn.BatchNorm2d,
                    conv2: nn.Conv2d, bn2: nn.BatchNorm2d, shuffle: int, x1_cl: bool, out_cl: bool,
                    conv_dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """The whole GAM block with both BatchNorms on batch statistics (see the module docstring).

    ``lin`` = (w1, b1, w2, b2) in the dtype the MLP runs in; ``conv_dtype`` the dtype the convolutions run
    in (autocast), default the convolutions' weights'. Raises ValueError for one value per channel.
    """
    n = x.shape[0] * x.shape[2] * x.shape[3]
    if n <= 1 and (bn1.training or bn2.training):  # as nn.BatchNorm2d checks
        raise ValueError(f"Expected more than 1 value per channel when training, got input size "
                         f"{tuple(x.shape)}")
    w1, b1, w2, b2 = lin
    if b1 is None:
        b1 = torch.zeros(w1.shape[0], dtype=w1.dtype, device=w1.device)
    if b2 is None:
        b2 = torch.zeros(w2.shape[0], dtype=w2.dtype, device=w2.device)
    k1, kb1, k2, kb2 = conv1.weight, conv1.bias, conv2.weight, conv2.bias
    if conv_dtype is not None and conv_dtype != k1.dtype:
        k1, k2 = k1.to(conv_dtype), k2.to(conv_dtype)
        kb1 = None if kb1 is None else kb1.to(conv_dtype)
        kb2 = None if kb2 is None else kb2.to(conv_dtype)
    g1, be1, run1, eps1, mom1, up1 = _bn_args(bn1, x.device)
    g2, be2, run2, eps2, mom2, up2 = _bn_args(bn2, x.device)
    args = (bool(sigmoid), int(conv1.padding[0]), int(conv1.groups), int(shuffle or 0), eps1, eps2, mom1, mom2,
            up1, up2, bool(x1_cl), bool(out_cl))
    return _TrainBlock.apply(x, w1.contiguous(), b1.contiguous(), w2.contiguous(), b2.contiguous(), k1, kb1, k2,
                             kb2, g1, be1, g2, be2, (*run1, *run2), args)
