"""Eval-mode spatial branch of GAM: two Triton implicit-GEMM convolutions with fused epilogues, or cuDNN.

    z1  = relu(conv1(x1) + b1)                                  BN1 folded into conv1's weights and bias
    out = x1 * shuffle(sigmoid(scale2 * (conv2(z1) + b2) + shift2))

* :func:`conv_bn_relu` - conv1 + bias + ReLU in one kernel (``kernels/conv.py``), z1 written once
  (channels_last).
* :func:`conv_gate` - conv2 with the final gate in its epilogue (BN2, sigmoid, channel shuffle, multiply
  by x1): writes the block's output; y2 never exists in memory.
* :func:`spatial_eval` - the whole branch, down the path ``GAM_TRITON_CONV`` asks for (read at each call):
  ``triton`` (the two kernels: on CUDA, or on the CPU under ``TRITON_INTERPRET=1``), ``cudnn`` (two
  ``F.conv2d`` calls, an in-place ReLU and the final-gate kernel: the path before this module existed) or
  ``auto`` (default): on a GPU the first call of a shape times the paths (Triton with its tuned tiles;
  cuDNN; cuDNN with its fused conv + bias + ReLU for conv1) and keeps the fastest (ties go to cuDNN),
  cached like every tuned config (:mod:`gam_triton.autotune`, op ``spatial``); where nothing can be timed
  (no GPU: the interpreter) auto means the cuDNN/PyTorch path. Under torch.compile auto mode compiles in
  the Triton path where an eager call of the process chose it for the shape, else cuDNN. The Triton path
  needs no autograd (eval / no_grad), inputs in one kernel dtype and no autocast; otherwise cuDNN runs.

Every tuning candidate (a conv tile, or the Triton path as a whole) is run once and checked against the
cuDNN path's output before it is timed; one that disagrees is dropped with a :class:`CandidateMismatch`
warning naming it (compiler bugs on hardware never tested: pytorch issue 173068). See
:func:`checked_bench`.

The ops are ``gam_triton::conv_bn_relu`` and ``gam_triton::conv_gate`` (``triton_op`` on a GPU, so
torch.compile traces into them); they have no autograd formula (eval only).
"""
from __future__ import annotations

import os
import warnings
from typing import Callable, Optional, Sequence, Union

import torch
import torch.nn.functional as F

from . import autotune
from ._runtime import (HAS_TRITON, INTERPRET, KERNEL_DTYPES, POISON, bchw_view, call_directly, check_bchw,
                       check_vector, define_op, dot_precision, is_channels_last, launcher, new_output,
                       use_triton)
from .configs import (SPATIAL_CUDNN, SPATIAL_CUDNN_RELU, SPATIAL_TRITON, Config, conv_candidates, conv_heuristic,
                      next_pow2)
from .final_gate import final_gate

if HAS_TRITON:
    from triton import cdiv

    from .kernels.conv import conv_bn_relu_kernel, conv_gate_kernel

__all__ = ["conv_bn_relu", "conv_gate", "spatial_eval", "conv_mode", "pack_weight", "checked_bench",
           "select_checked", "CandidateMismatch", "CandidateMismatchWarning", "MODES"]

#: Values of GAM_TRITON_CONV.
MODES = ("auto", "triton", "cudnn")


class CandidateMismatch(RuntimeError):
    """A tuning candidate's output disagreed with the cuDNN path's (raised inside the autotuner's bench)."""


class CandidateMismatchWarning(UserWarning):
    """A tuning candidate was dropped because its output disagreed with the cuDNN path's."""


def conv_mode() -> str:
    """GAM_TRITON_CONV (read at each call): auto (default), triton or cudnn."""
    mode = os.environ.get("GAM_TRITON_CONV", "auto").strip().lower() or "auto"
    if mode not in MODES:
        raise ValueError(f"GAM_TRITON_CONV must be one of {', '.join(MODES)}, got {mode!r}")
    return mode


def pack_weight(weight: torch.Tensor) -> torch.Tensor:
    """Conv weight [COUT, CIN/G, K, K] -> the kernels' layout [K, K, CIN/G, COUT] (contiguous)."""
    return weight.permute(2, 3, 1, 0).contiguous()


def unpack_weight(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`pack_weight`, as a view (what F.conv2d takes)."""
    return packed.permute(3, 2, 0, 1)


def conv_precision(dtype: torch.dtype) -> str:
    """tl.dot input precision of the fp32 convolutions: TF32 where cuDNN's own fp32 convolutions use it
    (``torch.backends.cudnn.allow_tf32``), else full precision (tf32x3: three TF32 products, fp32 accuracy
    on tensor cores). fp16/bf16 are unaffected."""
    if dtype != torch.float32:
        return dot_precision(dtype)
    return "tf32" if torch.backends.cudnn.allow_tf32 else "tf32x3"


def tolerance(dtype: torch.dtype) -> tuple[float, float]:
    """(rtol, atol) within which a Triton candidate must agree with the cuDNN path at tuning time: loose
    enough for rounding and summation order (and TF32), tight enough to catch a wrong kernel."""
    if dtype == torch.float32:
        return (2e-2, 2e-2) if conv_precision(dtype) == "tf32" else (1e-3, 1e-3)
    return (2e-2, 2e-2) if dtype == torch.float16 else (6e-2, 6e-2)


# --- checked tuning: every candidate is compared with the reference before it is timed -------------------
def checked_bench(op: str, run: Callable[[Config], torch.Tensor], reference: Callable[[], torch.Tensor],
                  tol: tuple[float, float]) -> Callable[[Config], float]:
    """A ``bench(cfg)`` for :func:`gam_triton.autotune.select` that first runs ``run(cfg)`` once and compares
    its output with ``reference()`` (computed once, lazily); a candidate that disagrees is dropped (warning
    naming it, then CandidateMismatch, which the autotuner counts as a failed config). Agreeing candidates
    are timed with ``autotune.bench_ms`` (looked up at call time)."""
    ref: list[torch.Tensor] = []

    def bench(cfg: Config) -> float:
        if not ref:
            ref.append(reference())
        got = run(cfg)
        rtol, atol = tol
        want = ref[0]
        if got.shape != want.shape or not torch.allclose(got.float(), want.float(), rtol=rtol, atol=atol):
            err = (got.float() - want.float()).abs().max().item() if got.shape == want.shape else float("nan")
            msg = (f"gam_triton: {op} candidate {cfg} disagrees with the cuDNN path (max abs error {err:.3g}, "
                   f"rtol {rtol}, atol {atol}): dropped")
            warnings.warn(msg, CandidateMismatchWarning, stacklevel=2)
            raise CandidateMismatch(msg)
        return autotune.bench_ms(lambda: run(cfg))

    return bench


def select_checked(op: str, key: tuple, heuristic: Config, candidates: Callable[[], Sequence[Config]],
                   run: Callable[[Config], torch.Tensor], reference: Callable[[], torch.Tensor],
                   tol: tuple[float, float]) -> Config:
    """:func:`gam_triton.autotune.select` with every candidate checked against ``reference()`` first."""
    return autotune.select(op, key, heuristic, candidates, checked_bench(op, run, reference, tol))


# --- launches ----------------------------------------------------------------------------------------------
def _empty(shape: tuple, like: torch.Tensor, dtype: torch.dtype, channels_last: bool) -> torch.Tensor:
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    out = torch.empty(shape, dtype=dtype, device=like.device, memory_format=fmt)
    if POISON:
        out.fill_(float("nan"))
    return out


def _image_span(*tensors) -> int:
    """The largest element offset within one image of any of ``tensors`` (B x C x H x W, any strides)."""
    return max(sum((n - 1) * abs(st) for n, st in zip(t.shape[1:], t.stride()[1:])) for t in tensors)


def _common_kwargs(cfg: Config, k: int, cin_g: int, dtype: torch.dtype, *tensors,
                   precision: Optional[str] = None) -> dict:
    return dict(KSIZE=k, BLOCK_P=cfg.BLOCK_P, BLOCK_N=cfg.BLOCK_C, BLOCK_K=cfg.BLOCK_R,
                K_BLOCKS=cdiv(cin_g, cfg.BLOCK_R), DOT_F32=INTERPRET or dtype == torch.float32,
                INPUT_PRECISION=precision or conv_precision(dtype), I64=_image_span(*tensors) >= 2**31 - 1,
                num_warps=cfg.num_warps, num_stages=cfg.num_stages)


def _dims(x: torch.Tensor, wp: torch.Tensor) -> tuple[int, int, int, int, int]:
    """(K, CIN_G, COUT, groups, COUT_G) of a packed weight applied to x."""
    k, _, cin_g, cout = wp.shape
    groups = x.shape[1] // cin_g
    return k, cin_g, cout, groups, cout // groups


def _conv1_launch_args(x1, wp, b, z, cfg: Config, precision: Optional[str] = None):
    """(kernel, grid, args, kwargs) of conv1 + bias + ReLU writing z: what :func:`_launch_conv1` runs and
    ``perf/compile_report.py`` compiles ahead of time (``precision`` overrides :func:`conv_precision`)."""
    bsz, _, h, w = x1.shape
    k, cin_g, cout, groups, cout_g = _dims(x1, wp)
    n_blocks = cdiv(cout_g, cfg.BLOCK_C)
    _, szb, szc, szp = bchw_view(z)
    grid = (bsz * cdiv(h * w, cfg.BLOCK_P), groups * n_blocks)
    args = (x1, wp, b, z, h, w, cin_g, cout, cout_g, n_blocks, *x1.stride(), szb, szc, szp)
    return conv_bn_relu_kernel, grid, args, _common_kwargs(cfg, k, cin_g, wp.dtype, x1, z, precision=precision)


def _launch_conv1(x1, wp, b, z, cfg: Config) -> None:
    kernel, grid, args, kwargs = _conv1_launch_args(x1, wp, b, z, cfg)
    launcher(kernel)[grid](*args, **kwargs)


def _conv2_launch_args(z1, wp, b, scale, shift, x1, shuffle, out, cfg: Config, precision: Optional[str] = None):
    """(kernel, grid, args, kwargs) of conv2 + BN2 + sigmoid + shuffle + gate writing out (see
    :func:`_conv1_launch_args`)."""
    bsz, _, h, w = z1.shape
    k, cin_g, cout, groups, cout_g = _dims(z1, wp)
    n_blocks = cdiv(cout_g, cfg.BLOCK_C)
    x1v, sxb, sxc, sxp = bchw_view(x1)
    _, sob, soc, sop = bchw_view(out)
    grid = (bsz * cdiv(h * w, cfg.BLOCK_P), groups * n_blocks)
    args = (z1, wp, scale if b is None else b, scale, shift, x1v, out,
            h, w, cin_g, cout, cout_g, n_blocks, cout // shuffle if shuffle else cout, *z1.stride(),
            sxb, sxc, sxp, sob, soc, sop)
    kwargs = dict(SHUFFLE_G=shuffle, HAS_BIAS=b is not None,
                  **_common_kwargs(cfg, k, cin_g, wp.dtype, z1, x1, out, precision=precision))
    return conv_gate_kernel, grid, args, kwargs


def _launch_conv2(z1, wp, b, scale, shift, x1, shuffle, out, cfg: Config) -> None:
    kernel, grid, args, kwargs = _conv2_launch_args(z1, wp, b, scale, shift, x1, shuffle, out, cfg)
    launcher(kernel)[grid](*args, **kwargs)


def _tile(op: str, x: torch.Tensor, wp: torch.Tensor, extra: tuple, run, reference) -> Config:
    k, cin_g, cout, groups, cout_g = _dims(x, wp)
    hw = x.shape[2] * x.shape[3]
    key = (cin_g, cout_g, groups, k, next_pow2(hw), autotune.batch_bucket(x.shape[0], hw), str(x.dtype),
           is_channels_last(x), *extra)
    return select_checked(op, key, conv_heuristic(cin_g, cout_g, hw, wp.dtype),
                          lambda: conv_candidates(cin_g, cout_g, hw, wp.dtype), run, reference,
                          tolerance(wp.dtype))


def _conv_bn_relu_impl(x1: torch.Tensor, wp: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    bsz, _, h, w = x1.shape
    z = _empty((bsz, wp.shape[3], h, w), x1, wp.dtype, True)
    if z.numel() == 0:
        return z
    k, _, _, groups, _ = _dims(x1, wp)

    def run(cfg: Config) -> torch.Tensor:
        _launch_conv1(x1, wp, b, z, cfg)
        return z

    def reference() -> torch.Tensor:
        return torch.relu(F.conv2d(x1, unpack_weight(wp), b, padding=k // 2, groups=groups))

    _launch_conv1(x1, wp, b, z, _tile("conv_bn_relu", x1, wp, (), run, reference))
    return z


def _conv_gate_impl(z1: torch.Tensor, wp: torch.Tensor, b: Optional[torch.Tensor], scale: torch.Tensor,
                    shift: torch.Tensor, x1: torch.Tensor, shuffle: int, out_channels_last: bool) -> torch.Tensor:
    out = new_output(x1, x1.dtype, out_channels_last)
    if out.numel() == 0:
        return out
    k, _, _, groups, _ = _dims(z1, wp)

    def run(cfg: Config) -> torch.Tensor:
        _launch_conv2(z1, wp, b, scale, shift, x1, shuffle, out, cfg)
        return out

    def reference() -> torch.Tensor:
        y2 = F.conv2d(z1, unpack_weight(wp), b, padding=k // 2, groups=groups)
        return final_gate(x1, y2, scale, shift, shuffle, out_channels_last=out_channels_last)

    extra = (shuffle, is_channels_last(x1), out_channels_last)
    _launch_conv2(z1, wp, b, scale, shift, x1, shuffle, out, _tile("conv_gate", z1, wp, extra, run, reference))
    return out


def _fake_conv1(x1, wp, b):
    bsz, _, h, w = x1.shape
    return torch.empty((bsz, wp.shape[3], h, w), dtype=wp.dtype, device=x1.device,
                       memory_format=torch.channels_last)


def _fake_conv2(z1, wp, b, scale, shift, x1, shuffle, out_channels_last):
    fmt = torch.channels_last if out_channels_last else torch.contiguous_format
    return torch.empty_like(x1, memory_format=fmt)


def _no_setup(ctx, inputs, output) -> None:
    pass


def _no_backward(ctx, *grads):
    raise RuntimeError("gam_triton: the Triton spatial convolutions are eval-only (no autograd formula); "
                       "the module runs cuDNN whenever a gradient is needed")


if HAS_TRITON:
    _op_conv1 = define_op("conv_bn_relu", _conv_bn_relu_impl, _fake_conv1, _no_backward, _no_setup)
    _op_conv2 = define_op("conv_gate", _conv_gate_impl, _fake_conv2, _no_backward, _no_setup)


# --- public entry points -------------------------------------------------------------------------------------
def _check_weight(name: str, weight, x: torch.Tensor, groups: int, cout: Optional[int] = None) -> None:
    if not isinstance(weight, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(weight).__name__}")
    if isinstance(groups, bool) or not isinstance(groups, int) or groups < 1:
        raise ValueError(f"groups must be an int >= 1, got {groups!r}")
    if weight.dim() != 4 or weight.shape[2] != weight.shape[3] or weight.shape[2] % 2 == 0:
        raise ValueError(f"{name} must be [COUT, CIN/groups, K, K] with K odd, got {tuple(weight.shape)}")
    cin = x.shape[1]
    if cin % groups or weight.shape[1] * groups != cin or weight.shape[0] % groups:
        raise ValueError(f"{name} {tuple(weight.shape)} does not fit {cin} input channels in {groups} groups")
    if cout is not None and weight.shape[0] != cout:
        raise ValueError(f"{name} has {weight.shape[0]} output channels, expected {cout}")
    if weight.device != x.device:
        raise ValueError(f"{name} is on {weight.device}, the input on {x.device}")
    if weight.dtype != x.dtype:
        raise TypeError(f"{name} dtype {weight.dtype} differs from the input's {x.dtype}")


def _triton_ok(*tensors) -> bool:
    """The Triton kernels can run these: CUDA or the interpreter, a kernel dtype, no autograd, no autocast."""
    x = tensors[0]
    if not use_triton(x) or x.dtype not in KERNEL_DTYPES:
        return False
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors):
        return False
    try:
        return not torch.is_autocast_enabled(x.device.type)
    except RuntimeError:  # pragma: no cover - a device type autocast does not know
        return True


def conv_bn_relu(x1: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None,
                 groups: int = 1) -> torch.Tensor:
    """z = relu(conv2d(x1, weight, bias, padding=K // 2, groups=groups)) for a KxK weight (K odd).

    Triton kernel where it can run (CUDA / interpreter, no autograd); ``F.conv2d`` + ReLU elsewhere. The
    output is channels_last (what the second convolution reads fastest). Inputs are checked first.
    """
    check_bchw("x1", x1)
    _check_weight("weight", weight, x1, groups)
    check_vector("bias", bias, weight.shape[0], x1.device)
    if not _triton_ok(x1, weight, bias):
        z = torch.relu(F.conv2d(x1, weight, bias, padding=weight.shape[2] // 2, groups=groups))
        return z.contiguous(memory_format=torch.channels_last)
    b = bias if bias is not None else torch.zeros(weight.shape[0], dtype=weight.dtype, device=x1.device)
    return _run_conv1(x1, pack_weight(weight), b.contiguous())


def _check_gate_args(z1, weight, bias, scale, shift, x1, groups, shuffle) -> int:
    check_bchw("z1", z1)
    check_bchw("x1", x1)
    c = x1.shape[1]
    _check_weight("weight", weight, z1, groups, cout=c)
    if z1.shape[0] != x1.shape[0] or z1.shape[2:] != x1.shape[2:] or z1.device != x1.device:
        raise ValueError(f"z1 {tuple(z1.shape)} on {z1.device} does not match x1 {tuple(x1.shape)} on "
                         f"{x1.device} in batch, height, width and device")
    if scale is None or shift is None:
        raise TypeError("scale and shift are required")
    check_vector("bias", bias, c, x1.device)
    check_vector("scale", scale, c, x1.device)
    check_vector("shift", shift, c, x1.device)
    shuffle = int(shuffle or 0)
    if shuffle < 0 or (shuffle and c % shuffle):
        raise ValueError(f"shuffle ({shuffle}) must be 0 (no shuffle) or divide the {c} channels")
    if x1.dtype != z1.dtype:
        raise TypeError(f"x1 dtype {x1.dtype} differs from z1's {z1.dtype}")
    return shuffle


def conv_gate(z1: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], scale: torch.Tensor,
              shift: torch.Tensor, x1: torch.Tensor, groups: int = 1, shuffle: int = 0,
              out_channels_last: Optional[bool] = None) -> torch.Tensor:
    """out = x1 * shuffle_G(sigmoid(scale * conv2d(z1, weight, bias, padding=K // 2, groups) + shift)).

    ``shuffle`` = G > 0 shuffles the map's channels in G groups (the YOLO form); 0 for none. One Triton
    kernel where it can run (y2 is never stored); ``F.conv2d`` + the final gate elsewhere. Output layout:
    ``out_channels_last`` or x1's. Inputs are checked first.
    """
    shuffle = _check_gate_args(z1, weight, bias, scale, shift, x1, groups, shuffle)
    if out_channels_last is None:
        out_channels_last = is_channels_last(x1)
    scale, shift = scale.float().contiguous(), shift.float().contiguous()
    if not _triton_ok(z1, weight, bias, x1, scale, shift):
        y2 = F.conv2d(z1, weight, bias, padding=weight.shape[2] // 2, groups=groups)
        return final_gate(x1, y2, scale, shift, shuffle, out_channels_last=out_channels_last)
    return _run_conv2(z1, pack_weight(weight), None if bias is None else bias.contiguous(), scale, shift, x1,
                      shuffle, bool(out_channels_last))


def _run_conv1(*args) -> torch.Tensor:
    """The conv1 kernel on checked, packed arguments: directly, or through the custom op."""
    return _conv_bn_relu_impl(*args) if call_directly(*args) else _op_conv1(*args)


def _run_conv2(*args) -> torch.Tensor:
    """The conv2 + final-gate kernel on checked, packed arguments: directly, or through the custom op."""
    return _conv_gate_impl(*args) if call_directly(*args[:6]) else _op_conv2(*args)


Packed = Union[None, tuple, Callable[[], tuple]]


def spatial_eval(x1: torch.Tensor, w1: torch.Tensor, b1: Optional[torch.Tensor], w2: torch.Tensor,
                 b2: Optional[torch.Tensor], scale2: torch.Tensor, shift2: torch.Tensor, groups: int = 1,
                 shuffle: int = 0, out_channels_last: Optional[bool] = None, packed: Packed = None) -> torch.Tensor:
    """GAM's eval spatial branch and final gate: x1 * shuffle(sigmoid(BN2(conv2(relu(conv1(x1)))))).

    ``w1``, ``b1``: conv1 with BatchNorm1 folded in; ``w2``, ``b2``: conv2; ``scale2``, ``shift2``: BatchNorm2
    as a per-channel affine. ``packed``: (pack_weight(w1), pack_weight(w2)), or a callable returning it, or
    None (packed here: two small copies per call). The path follows GAM_TRITON_CONV (module docstring).
    """
    check_bchw("x1", x1)
    c = x1.shape[1]
    _check_weight("w1", w1, x1, groups)
    check_vector("b1", b1, w1.shape[0], x1.device)
    if w1.shape[0] > c:
        raise ValueError(f"w1 has {w1.shape[0]} output channels, more than the {c} of x1 (GAM: C/r)")
    # z1 has conv1's channels and x1's batch, map, dtype and device: a slice of x1 stands in for it.
    _check_gate_args(x1[:, : w1.shape[0]], w2, b2, scale2, shift2, x1, groups, shuffle)
    shuffle = int(shuffle or 0)
    mode = conv_mode()
    if out_channels_last is None:
        out_channels_last = is_channels_last(x1)
    scale2, shift2 = scale2.float().contiguous(), shift2.float().contiguous()
    k = w1.shape[2]

    def cudnn() -> torch.Tensor:
        z1 = torch.relu_(F.conv2d(x1, w1, b1, padding=k // 2, groups=groups))
        y2 = F.conv2d(z1, w2, b2, padding=k // 2, groups=groups)
        return final_gate(x1, y2, scale2, shift2, shuffle, out_channels_last=out_channels_last)

    if mode == "cudnn" or x1.numel() == 0 or not _triton_ok(x1, w1, b1, w2, b2, scale2, shift2):
        return cudnn()

    def triton() -> torch.Tensor:
        w1p, w2p = _packed(packed, w1, w2)
        bias1 = b1 if b1 is not None else torch.zeros(w1.shape[0], dtype=w1.dtype, device=x1.device)
        z1 = _run_conv1(x1, w1p, bias1.contiguous())
        return _run_conv2(z1, w2p, None if b2 is None else b2.contiguous(), scale2, shift2, x1, shuffle,
                          bool(out_channels_last))

    if mode == "triton":
        return triton()
    hw = x1.shape[2] * x1.shape[3]
    key = (c, w1.shape[0], groups, k, shuffle, next_pow2(hw), autotune.batch_bucket(x1.shape[0], hw),
           str(x1.dtype), is_channels_last(x1), bool(out_channels_last))
    if not torch.compiler.is_compiling():
        if not autotune.can_benchmark():  # no GPU (interpreter): nothing to time, today's path
            return cudnn()
        runners = {SPATIAL_CUDNN: cudnn, SPATIAL_TRITON: triton}
        if x1.is_cuda:
            def cudnn_relu() -> torch.Tensor:  # cuDNN's fused conv + bias + ReLU for conv1
                z1 = torch.cudnn_convolution_relu(x1, w1, b1, (1, 1), (k // 2, k // 2), (1, 1), groups)
                y2 = F.conv2d(z1, w2, b2, padding=k // 2, groups=groups)
                return final_gate(x1, y2, scale2, shift2, shuffle, out_channels_last=out_channels_last)

            runners[SPATIAL_CUDNN_RELU] = cudnn_relu
        path = select_paths(key, runners, SPATIAL_CUDNN, tolerance(x1.dtype))
        _DECIDED[key] = path
        return runners[path]() if path in runners else cudnn()
    # torch.compile bakes the path in: the Triton one if this process chose it eagerly for the shape, else
    # cuDNN (the autotuner's lock and timing cannot be traced: run one eager call first).
    return triton() if _DECIDED.get(key) == SPATIAL_TRITON else cudnn()


#: Auto mode's path (a SPATIAL_* Config) per shape key, as chosen by eager calls in this process (read under
#: torch.compile).
_DECIDED: dict = {}


def select_paths(key: tuple, runners: dict, reference: Config, tol: tuple[float, float],
                 op: str = "spatial") -> Config:
    """Pick among whole-branch ``runners`` ({Config: zero-arg callable returning the output}) by timing,
    through the autotuner; ``reference`` (the heuristic, and the winner of ties) is the cuDNN path, which
    every other runner is checked against first."""
    ref_run = runners[reference]

    def run(cfg: Config) -> torch.Tensor:
        return runners[cfg]()

    bench = checked_bench(op, run, ref_run, tol)

    def timed(cfg: Config) -> float:
        return autotune.bench_ms(ref_run) if cfg == reference else bench(cfg)

    return autotune.select(op, key, reference, lambda: [c for c in runners if c != reference], timed)


def _packed(packed: Packed, w1: torch.Tensor, w2: torch.Tensor) -> tuple:
    if packed is None:
        return pack_weight(w1), pack_weight(w2)
    return packed() if callable(packed) else packed
