"""The elementwise ops: the final gate and BatchNorm-apply + ReLU (kernels: ``kernels/elementwise.py``).

* :func:`final_gate` - out = x1 * shuffle_G(sigmoid(scale * y2 + shift)): BatchNorm2 as a per-channel affine
  and the YOLO channel shuffle folded into the indexing. Output dtype ``promote_types(x1, y2)`` (what
  ``x1 * s`` gives under autocast), layout ``out_channels_last`` or x1's.
* :func:`bn_relu` - z = relu(scale * y + shift), between the convolutions where BatchNorm1 runs on batch
  statistics; z keeps y's dtype and layout.

Each is a checked public function (Triton where ``use_triton``, PyTorch elsewhere) over an op
(``gam_triton::final_gate``, ``gam_triton::bn_relu``) whose registered autograd formula gives the gradients
wherever the fused train block does not run; the module calls the ops (:data:`run_final_gate`,
:data:`run_bn_relu`) on trusted arguments.
"""
from __future__ import annotations

from typing import Optional

import torch

from . import _autotune, _runtime
from ._runtime import (HAS_TRITON, TARGET, bchw_view, check_bchw, check_groups, check_vector, is_channels_last,
                       new_output, next_pow2)
from ..reference import gate_multiply, shuffle, unshuffle

if HAS_TRITON:
    import triton
    from triton import cdiv

    from ..kernels.elementwise import bn_relu_kernel, final_gate_kernel

__all__ = ["final_gate", "bn_relu", "final_gate_torch", "bn_relu_torch", "heuristic", "candidates", "shuffle_runs",
           "final_gate_key", "bn_relu_key", "programs", "final_gate_launch_args", "bn_relu_launch_args"]


# --- launch choices ------------------------------------------------------------------------------------------
def odd(C: int, HW: int, channels_last: bool) -> bool:
    """The contiguous dimension's length (H*W, or C for channels_last) is not a multiple of 16: Triton's
    divisibility hint is lost, no load is vectorised and each element carries its own 64-bit address."""
    return bool((C if channels_last else HW) % 16)


def shuffle_runs(groups: int, block_c: int, shuffled: torch.Tensor) -> bool:
    """Read (or write) ``shuffled``, the map a channel shuffle in ``groups`` groups reorders, as contiguous runs of
    channels (``kernels/shuffle.py``): its channels are contiguous (stride 1) and ``groups`` is a power of two
    dividing the channel block; else element by element."""
    return bool(groups and groups & (groups - 1) == 0 and block_c % groups == 0
                and (shuffled.shape[1] == 1 or shuffled.stride(1) == 1))


#: The elementwise tile halves down to this many elements per thread (:func:`heuristic`).
MIN_PER_THREAD = 2
#: The least share of one full-occupancy wave a grid is left at: the elementwise tile stops halving there, the
#: BatchNorm elementwise pass takes more warps below it, a reduction's grid is not cut under it for balance.
MIN_WAVE = 0.6


def heuristic(C: int, HW: int, channels_last: bool, target: str = TARGET, batch: int = 1,
              sms: Optional[int] = None) -> "triton.Config":
    """A 1K-element tile (8 per thread), longer along the contiguous dimension (16-32 per thread took 140-240
    registers on odd maps and in the persistent loop; 8 keep them near 64); halved (pixels first where channels
    are contiguous, channels first where pixels are; down to :data:`MIN_PER_THREAD` elements per thread) while
    ``batch`` x the tiles fill less than :data:`MIN_WAVE` of one full-occupancy wave of ``sms`` SMs (default: this
    device's; the persistent grid, :func:`programs`, is at most that wave). Halving until a whole wave was full
    left BN1's ``bn_relu`` at 4 elements per thread and 18 of the 25 KB it reads per SM in flight (C64 80x80 B16).
    Interpreter: few large programs."""
    if target == "interpreter":
        return triton.Config(dict(BLOCK_P=min(256, max(16, next_pow2(HW))), BLOCK_C=min(64, max(16, next_pow2(C)))),
                             num_warps=4, num_stages=1)
    elements = 1024  # 8 per thread: in the persistent loop 4096 took 200-240 registers (spilled in fp32, 3.4)
    if channels_last:
        bc = max(16, min(64, next_pow2(C)))  # 16 x 128 took 120-134 registers, 8 B spilled in fp32 (3.4)
        bp = max(16, min(elements // bc, next_pow2(HW)))
    else:
        bp = max(16, min(64, next_pow2(HW)))
        bc = max(16, min(elements // bp, next_pow2(C)))
    sms = _runtime.sm_count() if sms is None else sms
    slots = sms * _runtime.max_ctas(4)
    while bp * bc // 2 >= MIN_PER_THREAD * 32 * 4 and max(1, batch) * cdiv(HW, bp) * cdiv(C, bc) < MIN_WAVE * slots:
        if bp > 16 and (channels_last or bc == 16):
            bp //= 2
        elif bc > 16:
            bc //= 2
        else:
            break
    return triton.Config(dict(BLOCK_P=bp, BLOCK_C=bc), num_warps=4, num_stages=1)


def programs(batch: int, HW: int, C: int, cfg: "triton.Config", device) -> tuple[int, int]:
    """The persistent grid (P, channel blocks) of a launch over ``batch`` images: at most one program per
    (image, pixel block) tile, together at most one wave at full occupancy on ``device`` (64 warps per SM);
    a smaller grid rounded to whole waves (:func:`_runtime.whole_waves`)."""
    n_cb = cdiv(C, cfg.kwargs["BLOCK_C"])
    tiles = batch * cdiv(HW, cfg.kwargs["BLOCK_P"])
    sms = _runtime.sm_count(device)
    p = max(1, min(tiles, sms * _runtime.max_ctas(cfg.num_warps) // n_cb))
    return _runtime.whole_waves(p, n_cb, cfg.num_warps, sms), n_cb


def candidates(C: int, HW: int, channels_last: bool) -> list:
    """At most MAX_CANDIDATES tiles of 256-8192 elements, 4-32 per thread, none larger than the (power-of-two)
    problem, nearest the heuristic first (one stage: there is no loop to pipeline)."""
    cmax, pmax = max(16, next_pow2(C)), max(16, next_pow2(HW))
    out = [triton.Config(dict(BLOCK_P=bp, BLOCK_C=bc), num_warps=nw, num_stages=1)
           for bp in (16, 32, 64, 128, 256, 512, 1024) for bc in (16, 32, 64, 128, 256) for nw in (2, 4, 8)
           if bp <= pmax and bc <= cmax and 4 <= bp * bc // (32 * nw) <= 32]
    return _runtime.nearest(out, heuristic(C, HW, channels_last, "gpu"))


def _select(op: str, k: tuple, t: torch.Tensor, go) -> "triton.Config":
    b, c, hw, cl = t.shape[0], t.shape[1], t.shape[2] * t.shape[3], is_channels_last(t)
    return _autotune.select(op, k, lambda: heuristic(c, hw, cl, batch=b), lambda: candidates(c, hw, cl),
                            _autotune.timed(go))


# --- final gate ----------------------------------------------------------------------------------------------
def final_gate_launch_args(x1, y2, scale, shift, groups: int, out, cfg: "triton.Config") -> tuple:
    """(kernel, grid, args, kwargs) of the final-gate launch writing ``out``."""
    bsz, c, h, w = x1.shape
    x1, sxb, sxc, sxp = bchw_view(x1)
    y2, syb, syc, syp = bchw_view(y2)
    _, sob, soc, sop = bchw_view(out)
    grid = programs(bsz, h * w, c, cfg, x1.device)
    args = (x1, y2, scale, shift, out, bsz, h * w, c, c // groups if groups else c, sxb, sxc, sxp, syb, syc, syp,
            sob, soc, sop)
    return final_gate_kernel, grid, args, dict(SHUFFLE_G=groups, RUNS=shuffle_runs(groups, cfg.kwargs["BLOCK_C"], y2),
                                               **_runtime.config_kwargs(cfg))


def final_gate_key(x1: torch.Tensor, y2: torch.Tensor, groups: int, out_channels_last: bool) -> tuple:
    """The final gate's tuning key: C, bucketed map and batch, shuffle groups, output layout, x1's and y2's
    dtype and layout (no dot)."""
    return _autotune.key((x1.shape[1], *_autotune.pixels(x1.shape[0], x1.shape[2] * x1.shape[3]), groups,
                          out_channels_last), x1, y2, precision=None)


def _final_gate(x1: torch.Tensor, y2: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor, groups: int,
                out_channels_last: bool) -> torch.Tensor:
    out = new_output(x1.shape, x1, torch.promote_types(x1.dtype, y2.dtype), out_channels_last)
    if out.numel() == 0:
        return out
    k = final_gate_key(x1, y2, groups, out_channels_last)

    def go(cfg):
        return _runtime.launch(*final_gate_launch_args(x1, y2, scale, shift, groups, out, cfg))

    go(_select("final_gate", k, y2, go))
    return out


def _final_gate_fake(x1, y2, scale, shift, groups, out_channels_last):
    fmt = torch.channels_last if out_channels_last else torch.contiguous_format
    return torch.empty_like(x1, dtype=torch.promote_types(x1.dtype, y2.dtype), memory_format=fmt)


def _final_gate_setup(ctx, inputs, output) -> None:
    x1, y2, scale, shift, groups, _ = inputs
    ctx.groups = groups
    ctx.save_for_backward(x1, y2, scale, shift)


def _final_gate_backward(ctx, dout):
    """dx1 = dout * s; dt = unshuffle(dout * x1 * s (1 - s)); dy2 = dt * scale; dscale, dshift summed."""
    x1, y2, scale, shift = ctx.saved_tensors
    g, c = ctx.groups, x1.shape[1]
    acc = torch.float64 if y2.dtype == torch.float64 else torch.float32
    s = shuffle(torch.sigmoid(y2.to(acc) * scale.view(1, c, 1, 1) + shift.view(1, c, 1, 1)), g)
    d = dout.to(acc)
    dt = unshuffle(d * x1.to(acc) * s * (1 - s), g)
    return ((d * s).to(x1.dtype), (dt * scale.view(1, c, 1, 1)).to(y2.dtype),
            (dt * y2.to(acc)).sum((0, 2, 3)).to(scale.dtype), dt.sum((0, 2, 3)).to(shift.dtype), None, None)


#: ``run_final_gate(x1, y2, scale, shift, groups, out_channels_last)``, scale/shift contiguous fp32.
run_final_gate = _runtime.entry("final_gate", _final_gate, _final_gate_fake, _final_gate_backward,
                                _final_gate_setup) if HAS_TRITON else None


def final_gate_torch(x1: torch.Tensor, y2: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor,
                     groups: int) -> torch.Tensor:
    """PyTorch final gate, differentiable: one affine pass, an in-place sigmoid, the gated multiply."""
    c = x1.shape[1]
    s = torch.addcmul(shift.view(1, c, 1, 1), y2, scale.view(1, c, 1, 1)).to(y2.dtype).sigmoid_()
    return gate_multiply(x1, s, groups)


def final_gate(x1: torch.Tensor, y2: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor, groups: int = 0,
               out_channels_last: Optional[bool] = None) -> torch.Tensor:
    """out = x1 * shuffle_groups(sigmoid(scale[c] * y2 + shift[c])) for B x C x H x W x1 and y2.

    ``scale``/``shift``: per-channel vectors (fp32 on the Triton path); ``groups`` 0: no shuffle. Shapes,
    dtypes, devices and groups are checked before any kernel runs.
    """
    check_bchw("x1", x1)
    check_bchw("y2", y2, like=x1)
    c = x1.shape[1]
    check_vector("scale", scale, c, x1.device, required=True)
    check_vector("shift", shift, c, x1.device, required=True)
    groups = check_groups("groups", groups, c)
    if not _runtime.use_triton(x1):
        return final_gate_torch(x1, y2, scale, shift, groups)
    out_cl = is_channels_last(x1) if out_channels_last is None else bool(out_channels_last)
    return run_final_gate(x1, y2, scale.float().contiguous(), shift.float().contiguous(), groups, out_cl)


# --- BatchNorm-apply + ReLU ----------------------------------------------------------------------------------
def bn_relu_launch_args(y, scale, shift, z, cfg: "triton.Config") -> tuple:
    """(kernel, grid, args, kwargs) of the BN-apply + ReLU launch writing ``z``."""
    bsz, c, h, w = y.shape
    y, syb, syc, syp = bchw_view(y)
    _, szb, szc, szp = bchw_view(z)
    grid = programs(bsz, h * w, c, cfg, y.device)
    return bn_relu_kernel, grid, (y, scale, shift, z, bsz, h * w, c, syb, syc, syp, szb, szc, szp), \
        dict(**_runtime.view_alignments("YZ", h * w, c, (syb, syc, syp), (szb, szc, szp)),
             **_runtime.config_kwargs(cfg))


def bn_relu_key(y: torch.Tensor) -> tuple:
    """BN-apply + ReLU's tuning key: C, bucketed map and batch, y's dtype and layout (no dot)."""
    return _autotune.key((y.shape[1], *_autotune.pixels(y.shape[0], y.shape[2] * y.shape[3])), y, precision=None)


def _bn_relu(y: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    z = new_output(y.shape, y, y.dtype, is_channels_last(y))
    if z.numel() == 0:
        return z
    k = bn_relu_key(y)

    def go(cfg):
        return _runtime.launch(*bn_relu_launch_args(y, scale, shift, z, cfg))

    go(_select("bn_relu", k, y, go))
    return z


def _bn_relu_fake(y, scale, shift):
    return torch.empty_like(y, memory_format=torch.channels_last if is_channels_last(y) else torch.contiguous_format)


def _bn_relu_setup(ctx, inputs, output) -> None:
    ctx.save_for_backward(*inputs)


def _bn_relu_backward(ctx, dz):
    y, scale, shift = ctx.saved_tensors
    c = y.shape[1]
    acc = torch.float64 if y.dtype == torch.float64 else torch.float32
    yf = y.to(acc)
    d = dz.to(acc) * ((yf * scale.view(1, c, 1, 1) + shift.view(1, c, 1, 1)) > 0)
    return (d * scale.view(1, c, 1, 1)).to(y.dtype), (d * yf).sum((0, 2, 3)).to(scale.dtype), \
        d.sum((0, 2, 3)).to(shift.dtype)


#: ``run_bn_relu(y, scale, shift)``, scale/shift contiguous fp32.
run_bn_relu = _runtime.entry("bn_relu", _bn_relu, _bn_relu_fake, _bn_relu_backward,
                             _bn_relu_setup) if HAS_TRITON else None


def bn_relu_torch(y: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """PyTorch BatchNorm-apply + ReLU, differentiable."""
    c = y.shape[1]
    return torch.relu(torch.addcmul(shift.view(1, c, 1, 1), y, scale.view(1, c, 1, 1)).to(y.dtype))


def bn_relu(y: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """z = relu(scale[c] * y + shift[c]) for a B x C x H x W ``y``; z keeps y's dtype and layout."""
    check_bchw("y", y)
    check_vector("scale", scale, y.shape[1], y.device, required=True)
    check_vector("shift", shift, y.shape[1], y.device, required=True)
    if not _runtime.use_triton(y):
        return bn_relu_torch(y, scale, shift)
    return run_bn_relu(y, scale.float().contiguous(), shift.float().contiguous())
