"""Where gam_triton runs: Triton on CUDA (or the interpreter on CPU), PyTorch elsewhere.

Also the small helpers the launch functions share: the B x C x HW stride view of a 4-D tensor,
output allocation (with optional NaN poisoning for tests), the device context of the launches and the
fp32 dot precision.
"""
from __future__ import annotations

import contextlib
import os

import torch

try:  # triton is a Linux-only dependency; elsewhere only the PyTorch path exists
    import triton  # noqa: F401

    HAS_TRITON = True
except ImportError:  # pragma: no cover - exercised only where triton is absent
    HAS_TRITON = False

#: TRITON_INTERPRET=1 runs the kernels on the CPU through Triton's interpreter (how CI tests them).
#: Triton reads it when kernels are decorated, so it is read once, at import, here too.
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

#: Dtypes the Triton kernels take; float64 goes through the PyTorch path.
KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def use_triton(x: torch.Tensor) -> bool:
    """True when the Triton kernels should handle ``x``: CUDA, or CPU under the interpreter."""
    if not HAS_TRITON or x.dtype not in KERNEL_DTYPES:
        return False
    return x.is_cuda or (INTERPRET and x.device.type == "cpu")


#: GAM_TRITON_POISON=1 (set by the tests) fills kernel outputs with NaN before launch, so that an
#: element a kernel fails to write shows up. Read once, at import.
POISON = os.environ.get("GAM_TRITON_POISON", "0") == "1"


def new_output(like: torch.Tensor, dtype: torch.dtype, channels_last: bool) -> torch.Tensor:
    """An uninitialised B x C x H x W output (NaN-poisoned when asked) in the requested layout."""
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    out = torch.empty(like.shape, dtype=dtype, device=like.device, memory_format=fmt)
    if POISON:
        out.fill_(float("nan"))
    return out


def is_channels_last(t: torch.Tensor) -> bool:
    """Channels-last in the sense that matters for speed: the channel stride is 1 and C > 1."""
    return t.dim() == 4 and t.shape[1] > 1 and t.stride(1) == 1


_NO_DEVICE = contextlib.nullcontext()


def on_device(t: torch.Tensor):
    """Context under which kernels for ``t`` launch on ``t``'s device: ``torch.cuda.device(t.device)`` for a
    CUDA tensor (a model on cuda:1 while cuda:0 is current), a shared no-op elsewhere (CPU, interpreter)."""
    return torch.cuda.device(t.device) if t.is_cuda else _NO_DEVICE


def device_index(t: torch.Tensor):
    """The CUDA device index of ``t``, or None for a tensor elsewhere (the autotuner's device)."""
    return t.device.index if t.is_cuda else None


def bchw_view(t: torch.Tensor) -> tuple[torch.Tensor, int, int, int]:
    """Return (t', stride_b, stride_c, stride_p) so that t'[b, c, p] = t'.flat[b*sb + c*sc + p*sp].

    p = h * W + w runs over the H x W map. NCHW-contiguous and channels_last tensors (and any tensor
    whose H and W dims merge) are used in place; anything else is copied to contiguous first.
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


#: torch >= 2.9: the C++ getter behind ``torch.backends.cuda.matmul.fp32_precision`` (a fraction of a
#: microsecond; the attribute goes through a Python ``__getattr__``); None on older torch.
_FP32_GETTER = getattr(torch._C, "_get_fp32_precision_getter", None)


def fp32_matmul_allows_tf32() -> bool:
    """True when PyTorch's own fp32 CUDA matmuls may use TF32, read through whichever API exists.

    torch >= 2.9 has ``torch.backends.cuda.matmul.fp32_precision`` ("ieee", "tf32", or "none" = inherit
    ``torch.backends.fp32_precision``, resolved by the getter); once a user sets it, reading the legacy
    ``torch.backends.cuda.matmul.allow_tf32`` raises RuntimeError. The legacy setters (``allow_tf32``,
    ``torch.set_float32_matmul_precision``) also set the new value, and PyTorch's cuBLAS path uses TF32
    exactly when it is "tf32": that is the rule here. Older torch has only ``allow_tf32``. "ieee"
    (PyTorch's default) when nothing can be read. Called on every launch: well under a microsecond on
    torch >= 2.9.
    """
    try:
        if _FP32_GETTER is not None:
            return _FP32_GETTER("cuda", "matmul") == "tf32"
        return torch.backends.cuda.matmul.fp32_precision == "tf32"
    except (AttributeError, RuntimeError, TypeError):  # torch < 2.9: no such setting
        pass
    try:
        return bool(torch.backends.cuda.matmul.allow_tf32)
    except (AttributeError, RuntimeError):
        return False


def dot_precision(dtype: torch.dtype) -> str:
    """Triton ``input_precision`` for fp32 dots: "tf32" only where PyTorch's own fp32 matmul would use
    TF32 (:func:`fp32_matmul_allows_tf32`), else "ieee"; "tf32" for other dtypes (it does not apply)."""
    if dtype == torch.float32 and not fp32_matmul_allows_tf32():
        return "ieee"
    return "tf32"


def define_op(name: str, impl, fake, backward=None, setup_context=None, mutates: tuple = ()):
    """Register ``impl`` as the custom op ``gam_triton::<name>``, with its autograd formula when given.

    On a GPU it is a ``torch.library.triton_op``: torch.compile traces into it and sees the Triton
    kernels (launched through ``wrap_triton``). Under the interpreter the kernels cannot be traced with
    fake tensors, so it is an opaque ``torch.library.custom_op`` with ``fake`` as its shape function.
    ``mutates`` names the arguments the op writes in place (such an op cannot carry an autograd formula).
    """
    if INTERPRET:
        op = torch.library.custom_op(f"gam_triton::{name}", impl, mutates_args=tuple(mutates))
        op.register_fake(fake)
    else:
        op = torch.library.triton_op(f"gam_triton::{name}", impl, mutates_args=set(mutates))
    if backward is not None:
        op.register_autograd(backward, setup_context=setup_context)
    return op


def launcher(kernel):
    """The kernel as launched from inside an op: ``wrap_triton`` on a GPU, as is in the interpreter."""
    if INTERPRET:
        return kernel
    from torch.library import wrap_triton

    return wrap_triton(kernel)


def autocast_dtype(device_type: str):
    """The autocast dtype active for ``device_type``, or None (also for types autocast does not know)."""
    try:
        if torch.is_autocast_enabled(device_type):
            return torch.get_autocast_dtype(device_type)
    except RuntimeError:  # e.g. "meta": no autocast there
        pass
    return None


_PLAIN = (torch.Tensor, torch.nn.Parameter)


def call_directly(*tensors) -> bool:
    """True for a plain eager call that needs no autograd: the launch function may then be called
    without the custom-op dispatcher (tens of microseconds per op, which matter at batch 1).

    False under torch.compile / export, under any Python dispatch mode (FakeTensor, FlopCounterMode,
    profilers of ops), for tensor subclasses, and when a gradient must flow: those go through the op.
    """
    if torch.compiler.is_compiling() or _current_dispatch_mode() is not None:
        return False
    grad = torch.is_grad_enabled()
    return all(type(t) in _PLAIN and not (grad and t.requires_grad) for t in tensors if t is not None)


def _current_dispatch_mode():
    from torch.utils._python_dispatch import _get_current_dispatch_mode

    return _get_current_dispatch_mode()


def check_bchw(name: str, t, channels: int = None, like=None) -> None:
    """ValueError/TypeError unless ``t`` is a floating 4-D tensor (with ``channels`` channels, and the
    shape and device of ``like`` when given)."""
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


def check_vector(name: str, t, n: int, device) -> None:
    """ValueError/TypeError unless ``t`` is None or a floating vector of ``n`` elements on ``device``."""
    if t is None:
        return
    if not isinstance(t, torch.Tensor) or not t.is_floating_point():
        got = getattr(t, "dtype", type(t).__name__)
        raise TypeError(f"{name} must be a floating-point tensor, got {got}")
    if tuple(t.shape) != (n,) or t.device != device:
        raise ValueError(f"{name} must have shape ({n},) on {device}, got {tuple(t.shape)} on {t.device}")
