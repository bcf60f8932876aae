"""Deployment capture: when a GAM emits its plain-op graph instead of its Triton kernels.

A leaf module (torch only). :func:`deploying` is True while ``torch.jit.trace`` runs (TorchScript, and the
TorchScript-based ONNX exporter ``torch.onnx.export(dynamo=False)``), while the dynamo ONNX exporter
``torch.onnx.export(dynamo=True)`` captures the model, and inside :func:`plain_graph`; a GAM then runs
:func:`gam_triton.reference.plain_forward` (standard ops only). ``torch.export.export`` and
``torch.compile`` are not deployment: they keep the Triton custom ops. :func:`gam_triton.revert` turns
converted blocks back into the public forms' plain modules.
"""
from __future__ import annotations

import contextlib
import sys
from typing import Iterator

import torch

__all__ = ["deploying", "plain_graph"]

_forced = 0  # depth of plain_graph() contexts


@contextlib.contextmanager
def plain_graph() -> Iterator[None]:
    """Within this context every GAM runs :func:`plain_forward` (standard ops only), whatever captures it.

    For capture tools gam_triton cannot detect, e.g. ``torch.export.export`` of a model that is to be
    lowered to a runtime without the Triton ops, or the dynamo ONNX exporter's strict capture.
    """
    global _forced
    _forced += 1
    try:
        yield
    finally:
        _forced -= 1


def _flag_covers_dynamo_onnx() -> bool:
    """torch >= 2.8 sets ``torch.onnx.is_in_onnx_export()`` in the dynamo exporter too."""
    try:
        from torch.onnx._internal.exporter import _flags
    except ImportError:
        return False
    return hasattr(_flags, "_is_onnx_exporting")


_FLAG_COVERS_DYNAMO_ONNX = _flag_covers_dynamo_onnx()
_ONNX_EXPORTER_MODULES = ("torch.onnx._internal.exporter", "torch.onnx._internal._exporter_legacy")


def _dynamo_onnx_on_stack() -> bool:
    """Older torch (2.6, 2.7): is the dynamo ONNX exporter one of our callers?"""
    frame = sys._getframe(2)
    while frame is not None:
        if frame.f_globals.get("__name__", "").startswith(_ONNX_EXPORTER_MODULES):
            return True
        frame = frame.f_back
    return False


_is_exporting = getattr(torch.compiler, "is_exporting", lambda: False)  # torch.compiler.is_exporting: 2.7+


def deploying() -> bool:
    """True when GAM should emit :func:`plain_forward`: TorchScript tracing, ONNX export, :func:`plain_graph`.

    Cheap (two flag reads) on an eager call; the extra work happens only under ``torch.export``.
    """
    if _forced or torch.jit.is_tracing():  # jit.trace, and torch.onnx.export(dynamo=False), which traces
        return True
    if not _is_exporting():
        return False
    if torch.onnx.is_in_onnx_export():  # the dynamo exporter on torch >= 2.8
        return True
    # Under dynamo (strict capture) frames cannot be inspected; non-strict capture runs plain Python.
    return not _FLAG_COVERS_DYNAMO_ONNX and not torch.compiler.is_dynamo_compiling() and _dynamo_onnx_on_stack()
