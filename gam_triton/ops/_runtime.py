"""What every op shares: where the kernels run, allocation, strides, precision, checks, registration, launch.

* :func:`use_triton` - the Triton kernels handle a tensor on CUDA, or on the CPU under ``TRITON_INTERPRET=1``
  (:data:`INTERPRET`, read once at import as Triton does); float64 and other devices take PyTorch paths.
* :func:`new_output` - the one allocator of kernel outputs (NaN-poisoned under ``GAM_TRITON_POISON=1``, so an
  element a kernel fails to write shows up in the tests).
* :func:`bchw_view` - a B x C x H x W tensor as (tensor, stride_b, stride_c, stride_p): NCHW and channels_last
  read in place.
* :func:`dot_precision` - the fp32 dot precision PyTorch's own matmul would use ("ieee" or "tf32").
* :func:`check_bchw`, :func:`check_vector` - the ValueError/TypeError checks of the public op functions.
* :func:`entry` - registers an op (``torch.library.triton_op`` on a GPU, so torch.compile traces into it;
  an opaque ``custom_op`` with a fake under the interpreter) and returns the function the module and the other
  ops call: it runs the op on its first tensor's device (a model on cuda:1 while cuda:0 is current) and skips
  the dispatcher for a plain eager call that needs no autograd (:func:`call_directly`).
* :func:`launch` - the one place a kernel is launched (``wrap_triton`` on a GPU), always called as
  ``_runtime.launch``: the seam a caller may wrap to see every launch.
"""
from __future__ import annotations

import contextlib
import functools
import inspect
import math
import os
import re
import typing
from typing import Callable, Optional

import torch

try:  # triton is a Linux-only dependency; elsewhere only the PyTorch paths exist
    import triton  # noqa: F401

    HAS_TRITON = True
except ImportError:  # pragma: no cover - exercised only where triton is absent
    HAS_TRITON = False

#: The installed Triton's (major, minor); (0, 0) without one (some heuristics differ before 3.6: its ptxas).
TRITON = tuple(int(p) for p in re.findall(r"\d+", triton.__version__)[:2]) if HAS_TRITON else (0, 0)
#: TRITON_INTERPRET=1 runs the kernels on the CPU through Triton's interpreter (how CI tests them).
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
#: What the heuristics choose tiles for by default: "interpreter" (few large programs) or "gpu".
TARGET = "interpreter" if INTERPRET else "gpu"
#: Dtypes the Triton kernels take; float64 goes through the PyTorch paths.
KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
#: GAM_TRITON_POISON=1 (set by the tests) fills kernel outputs with NaN before launch. Read once.
POISON = os.environ.get("GAM_TRITON_POISON", "0") == "1"


def use_triton(x: torch.Tensor) -> bool:
    """True when the Triton kernels should handle ``x``: CUDA, or CPU under the interpreter."""
    if not HAS_TRITON or x.dtype not in KERNEL_DTYPES:
        return False
    return x.is_cuda or (INTERPRET and x.device.type == "cpu")


def autocast_dtype(device_type: str) -> Optional[torch.dtype]:
    """The autocast dtype active for ``device_type``, or None (also for types autocast does not know)."""
    try:
        if torch.is_autocast_enabled(device_type):
            return torch.get_autocast_dtype(device_type)
    except RuntimeError:  # e.g. "meta": no autocast there
        pass
    return None


def next_pow2(n: int) -> int:
    """Smallest power of two >= n (and >= 1)."""
    return 1 << max(0, int(n) - 1).bit_length()


#: Candidates an op times besides its heuristic (:func:`nearest`).
MAX_CANDIDATES = 12


def nearest(cands, ref, limit: int = MAX_CANDIDATES) -> list:
    """The ``limit`` candidate ``triton.Config`` closest to ``ref`` (log2 steps of its blocks, then warps and
    stages): what the ops time besides their heuristic."""
    def dist(c) -> tuple:
        lg = lambda v: max(1, int(v)).bit_length()  # noqa: E731
        d = sum(abs(lg(c.kwargs[k]) - lg(ref.kwargs[k])) for k in ref.kwargs if k in c.kwargs)
        return (d + 0.5 * abs(lg(c.num_warps) - lg(ref.num_warps)) + 0.25 * abs(c.num_stages - ref.num_stages),
                tuple(sorted(c.kwargs.items())), c.num_warps, c.num_stages)

    return sorted(cands, key=dist)[:limit]


def alignment(*values: int) -> int:
    """The largest power of two up to 16 dividing every value (0 divides by anything): what a launch may tell a
    kernel about a group of integer arguments (``kernels/align.py``)."""
    g = math.gcd(*values)
    return 16 if g == 0 else min(16, g & -g)


def view_alignment(hw: int, c: int, stride_b: int, stride_c: int, stride_p: int) -> int:
    """A B x C x HW view's alignment for ``kernels/align.py``: for an NCHW view (pixel stride 1) the power of two
    (up to 16) dividing HW and its batch and channel strides; for a channels_last one (channel stride 1) minus the
    one dividing C and its batch and pixel strides; 1 (nothing known) otherwise and where that power is 1."""
    if stride_p == 1 and stride_c != 1:
        return alignment(hw, stride_b, stride_c)
    if stride_c == 1 and stride_p != 1:
        a = alignment(c, stride_b, stride_p)
        return -a if a > 1 else 1
    return 1


def view_alignments(names: str, hw: int, c: int, *views: tuple) -> dict:
    """{NAME_ALIGN: :func:`view_alignment`} of ``views`` ((stride_b, stride_c, stride_p) each), one letter of
    ``names`` per view: a launch's alignment constexprs."""
    return {f"{n}_ALIGN": view_alignment(hw, c, *v) for n, v in zip(names, views)}


def new_output(shape, like: torch.Tensor, dtype: torch.dtype, channels_last: bool) -> torch.Tensor:
    """An uninitialised 4-D kernel output of ``shape`` on ``like``'s device (NaN-poisoned when asked)."""
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    out = torch.empty(shape, dtype=dtype, device=like.device, memory_format=fmt)
    if POISON:
        out.fill_(float("nan"))
    return out


def is_channels_last(t: torch.Tensor) -> bool:
    """Channels-last in the sense that matters for speed: the channel stride is 1 and C > 1."""
    return t.dim() == 4 and t.shape[1] > 1 and t.stride(1) == 1


def bchw_view(t: torch.Tensor) -> tuple[torch.Tensor, int, int, int]:
    """(t', stride_b, stride_c, stride_p) with t'[b, c, p] = t'.flat[b*sb + c*sc + p*sp], p = h * W + w.

    NCHW-contiguous and channels_last tensors (any tensor whose H and W dims merge) are used in place; any
    other is copied to contiguous first.
    """
    _, _, h, w = t.shape
    if h == 1 or t.stride(2) == w * t.stride(3):
        sp = t.stride(3)
    elif w == 1:
        sp = t.stride(2)
    else:
        t = t.contiguous()
        sp = t.stride(3)
    return t, t.stride(0), t.stride(1), sp


#: torch >= 2.9: the C++ getter behind ``torch.backends.cuda.matmul.fp32_precision``; None on older torch.
_FP32_GETTER = getattr(torch._C, "_get_fp32_precision_getter", None)


@torch.compiler.assume_constant_result  # a setting: read at trace time under torch.compile
def fp32_allows_tf32(op: str = "matmul") -> bool:
    """True when PyTorch's own fp32 CUDA ``op`` ("matmul": cuBLAS; "conv": cuDNN's convolutions) may use TF32,
    read through whichever API exists.

    torch >= 2.9 has ``torch.backends.cuda.matmul.fp32_precision`` / ``torch.backends.cudnn.conv.fp32_precision``
    ("ieee", "tf32", or "none" = inherit ``torch.backends.fp32_precision``, resolved by the getter); once a
    user sets one, reading the legacy ``allow_tf32`` flags may raise RuntimeError. The legacy setters also set
    the new values, and PyTorch uses TF32 exactly when it is "tf32": that is the rule here. Older torch has
    only the legacy flags (matmul default off, cuDNN default on). Well under a microsecond on torch >= 2.9.
    """
    try:
        if _FP32_GETTER is not None:
            return _FP32_GETTER("cuda", op) == "tf32"
        backend = torch.backends.cuda.matmul if op == "matmul" else torch.backends.cudnn.conv
        return backend.fp32_precision == "tf32"
    except (AttributeError, RuntimeError, TypeError):  # torch < 2.9: no such setting
        pass
    try:
        return bool(torch.backends.cuda.matmul.allow_tf32 if op == "matmul" else torch.backends.cudnn.allow_tf32)
    except (AttributeError, RuntimeError):
        return op != "matmul"


def fp32_matmul_allows_tf32() -> bool:
    """:func:`fp32_allows_tf32` for matmuls (what the channel gate's dots follow)."""
    return fp32_allows_tf32("matmul")


def dot_precision(dtype: torch.dtype) -> str:
    """The fp32 dot precision PyTorch's matmul would use: "tf32" where it allows TF32
    (:func:`fp32_matmul_allows_tf32`), else "ieee"; "tf32" for other dtypes (it does not apply to them)."""
    if dtype == torch.float32 and not fp32_matmul_allows_tf32():
        return "ieee"
    return "tf32"


# --- checks of the public op functions ---------------------------------------------------------------------
def check_bchw(name: str, t, channels: Optional[int] = None, like: Optional[torch.Tensor] = None) -> None:
    """ValueError/TypeError unless ``t`` is a floating 4-D tensor (with ``channels`` channels, and the shape
    and device of ``like`` when given)."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != 4:
        raise ValueError(f"{name} must be 4-D (B, C, H, W), got shape {tuple(t.shape)}")
    if not t.is_floating_point():
        raise TypeError(f"{name} must be floating-point, got {t.dtype}")
    if channels is not None and t.shape[1] != channels:
        raise ValueError(f"{name} has {t.shape[1]} channels, expected {channels}")
    if like is not None and (t.shape != like.shape or t.device != like.device):
        raise ValueError(f"{name} must match the shape and device of the input: got {tuple(t.shape)} on "
                         f"{t.device}, expected {tuple(like.shape)} on {like.device}")


def check_vector(name: str, t, n: int, device, required: bool = False) -> None:
    """ValueError/TypeError unless ``t`` is a floating vector of ``n`` elements on ``device`` (or None, unless
    ``required``)."""
    if t is None:
        if required:
            raise TypeError(f"{name} is required")
        return
    if not isinstance(t, torch.Tensor) or not t.is_floating_point():
        got = getattr(t, "dtype", type(t).__name__)
        raise TypeError(f"{name} must be a floating-point tensor, got {got}")
    if tuple(t.shape) != (n,) or t.device != device:
        raise ValueError(f"{name} must have shape ({n},) on {device}, got {tuple(t.shape)} on {t.device}")


def check_groups(name: str, groups, channels: int) -> int:
    """``groups`` as an int: 0 (none) or a divisor of ``channels``; ValueError otherwise."""
    if isinstance(groups, bool) or not isinstance(groups, (int, type(None))):
        raise TypeError(f"{name} must be an int, got {type(groups).__name__}")
    groups = int(groups or 0)
    if groups < 0 or (groups and channels % groups):
        raise ValueError(f"{name} ({groups}) must be 0 (none) or divide the {channels} channels")
    return groups


# --- registration and launch -------------------------------------------------------------------------------
_PLAIN = (torch.Tensor, torch.nn.Parameter)
_NO_DEVICE = contextlib.nullcontext()


def on_device(t: torch.Tensor):
    """``torch.cuda.device(t.device)`` for a CUDA tensor, a shared no-op elsewhere (CPU, interpreter)."""
    return torch.cuda.device(t.device) if t.is_cuda else _NO_DEVICE


#: The device name of the interpreter (and of a process without CUDA) for the tuning cache.
CPU_DEVICE = "cpu-interpreter"
DEVICE_NAMES: dict = {}
_CUDA: list = []


def has_cuda() -> bool:
    """A CUDA device and no interpreter (asked once): kernels can be timed here."""
    if not _CUDA:
        _CUDA.append(not INTERPRET and torch.cuda.is_available())
    return _CUDA[0]


#: The SM count launch grids are sized for where no GPU is present (the interpreter, the compile check): H100/H200.
DEFAULT_SMS = 132
_SMS: dict = {}


def sm_count(device=None) -> int:
    """Streaming multiprocessors of CUDA ``device`` (default: the current one), asked once per device;
    :data:`DEFAULT_SMS` without a GPU (the interpreter) and for a non-CUDA device (meta tensors, CPU)."""
    if not torch.cuda.is_available() or (device is not None and torch.device(device).type != "cuda"):
        return DEFAULT_SMS
    index = torch.device(device).index if device is not None else None
    index = torch.cuda.current_device() if index is None else index
    if index not in _SMS:
        _SMS[index] = torch.cuda.get_device_properties(index).multi_processor_count
    return _SMS[index]


#: Resident warps and CTAs per SM at most (sm_80 / sm_90 / sm_100).
WARPS_PER_SM, MAX_CTAS_PER_SM = 64, 32


def max_ctas(num_warps: int) -> int:
    """CTAs of ``num_warps`` warps an SM holds at most (registers and shared memory aside)."""
    return min(MAX_CTAS_PER_SM, WARPS_PER_SM // num_warps)


def register_ctas(regs: int, num_warps: int) -> int:
    """CTAs of ``num_warps`` warps an SM holds at ``regs`` registers per thread (65,536 per SM, allocated in
    granules of 8 per thread, 255 at most), at least 1 and at most :func:`max_ctas`."""
    return max(1, min(max_ctas(num_warps), 65536 // (num_warps * 32 * min(-(-regs // 8) * 8, 255))))


def whole_waves(programs: int, n_cblocks: int, num_warps: int, sms: int) -> int:
    """``programs`` (per channel block, of a grid (programs, n_cblocks)) rounded down so that the grid is m x
    ``sms`` CTAs (less what rounding to channel blocks drops) with m chosen so that the grid's waves, grid /
    (``sms`` x CTAs per SM), are never in (1, 1.15] whatever the registers allow
    (CTAs per SM = min(:func:`max_ctas`, 65536 / (32 num_warps regs)) for regs in steps of 8); unchanged for a
    grid under ``sms`` CTAs or a full-occupancy wave (m = max_ctas is always whole or >= 4/3)."""
    m = programs * n_cblocks // sms
    top = max_ctas(num_warps)
    if m < 1 or m >= top:
        return programs
    occs = {register_ctas(r, num_warps) for r in range(8, 256, 8)}
    p = max(1, m * sms // n_cblocks)
    while m > 1 and any(o < p * n_cblocks / sms <= 1.15 * o for o in occs):  # judged on the grid rounded to blocks
        m -= 1
        p = max(1, m * sms // n_cblocks)
    return p


def capturing() -> bool:
    """The current CUDA stream is capturing a graph."""
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


def tracing() -> bool:
    """torch.compile / export, or any Python dispatch mode (fake tensors, functionalization, proxies, profilers
    of ops): the tensors may hold no data, or what runs is being watched."""
    return torch.compiler.is_compiling() or _current_dispatch_mode() is not None


def device_name(index: Optional[int] = None) -> str:
    """The GPU name of CUDA device ``index`` (default: the current one), CPU_DEVICE without a GPU."""
    if not has_cuda():
        return CPU_DEVICE
    index = torch.cuda.current_device() if index is None else index
    if index not in DEVICE_NAMES:
        DEVICE_NAMES[index] = torch.cuda.get_device_name(index)
    return DEVICE_NAMES[index]


def call_directly(tensors) -> bool:
    """True for a plain eager call that needs no autograd: the op's function may then run without the
    custom-op dispatcher (tens of microseconds per op, which matter at batch 1).

    False under torch.compile / export, under any Python dispatch mode (FakeTensor, FlopCounterMode,
    profilers of ops), for tensor subclasses, and when a gradient must flow: those go through the op.
    """
    if tracing():
        return False
    grad = torch.is_grad_enabled()
    return all(type(t) in _PLAIN and not (grad and t.requires_grad) for t in tensors)


def _current_dispatch_mode():
    from torch.utils._python_dispatch import _get_current_dispatch_mode

    return _get_current_dispatch_mode()


def entry(name: str, impl: Callable, fake: Callable, backward: Optional[Callable] = None,
          setup_context: Optional[Callable] = None, mutates: tuple = ()) -> Callable:
    """Register ``impl`` as the custom op ``gam_triton::<name>`` and return the function that runs it.

    The op is a ``torch.library.triton_op`` on a GPU (torch.compile traces into it and sees the kernels) and
    an opaque ``torch.library.custom_op`` with ``fake`` as its shape function under the interpreter (its
    kernels cannot be traced with fake tensors). ``backward``/``setup_context``: its autograd formula;
    ``mutates``: the arguments it writes in place (such an op carries no autograd formula).

    The returned ``run(*args)`` runs ``impl`` under the device of its first tensor argument, either directly
    (:func:`call_directly`) or through the op. ``run.op`` is the op; ``run.impl`` the guarded function itself,
    for the body of another op (one dispatch, one traced graph). Arguments are trusted: the public op
    functions check them first.
    """
    @functools.wraps(impl)
    def guarded(*args):
        first = next(a for a in args if isinstance(a, torch.Tensor))
        with on_device(first):
            return impl(*args)

    # triton_op / custom_op read the schema from the signature: give them impl's, annotations resolved
    hints = typing.get_type_hints(impl)
    sig = inspect.signature(impl)
    guarded.__signature__ = sig.replace(
        parameters=[p.replace(annotation=hints.get(p.name, p.annotation)) for p in sig.parameters.values()],
        return_annotation=hints.get("return", sig.return_annotation))
    del guarded.__wrapped__  # the schema must come from __signature__, not from impl's string annotations
    if INTERPRET:
        op = torch.library.custom_op(f"gam_triton::{name}", guarded, mutates_args=tuple(mutates))
        op.register_fake(fake)
    else:
        op = torch.library.triton_op(f"gam_triton::{name}", guarded, mutates_args=set(mutates))
    if backward is not None:
        op.register_autograd(backward, setup_context=setup_context)

    def run(*args):
        if call_directly([a for a in args if isinstance(a, torch.Tensor)]):
            return guarded(*args)
        return run.op(*args)

    run.op, run.impl, run.__doc__ = op, guarded, impl.__doc__
    return run


def config_kwargs(cfg) -> dict:
    """A ``triton.Config`` as launch keyword arguments: its constexprs, num_warps, num_stages and maxnreg if set."""
    kw = dict(cfg.kwargs, num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    return dict(kw, maxnreg=cfg.maxnreg) if cfg.maxnreg else kw


def launch(kernel, grid: tuple, args: tuple, kwargs: dict):
    """``kernel[grid](*args, **kwargs)``: through ``wrap_triton`` on a GPU (so it traces inside a triton_op),
    as is under the interpreter. Returns what Triton's launch returns (the compiled kernel on a GPU, which
    the tuner asks about register spills)."""
    if INTERPRET:
        return kernel[grid](*args, **kwargs)
    from torch.library import wrap_triton

    return wrap_triton(kernel)[grid](*args, **kwargs)
