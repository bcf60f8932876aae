"""Deployment: the plain-op graph GAM emits while a model is traced or exported, and :func:`revert`.

* :func:`deploying` - True while ``torch.jit.trace`` runs (TorchScript, and the TorchScript-based ONNX
  exporter ``torch.onnx.export(dynamo=False)``), while the dynamo ONNX exporter
  ``torch.onnx.export(dynamo=True)`` captures the model, and inside :func:`plain_graph`.
  ``torch.export.export`` and ``torch.compile`` are not deployment: they keep the Triton custom ops.
* :func:`plain_forward` - GAM's forward in standard aten ops only, written for the graph deployment
  tools fuse well: the channel MLP as two 1x1 convolutions, in eval mode BatchNorm1 and BatchNorm2 folded
  into the 7x7 convolutions, ``sigmoid``, the YOLO channel shuffle as reshape/transpose/reshape. It reads
  no cache, so two traces of the same module give the same graph (``check_trace``). In train mode (and
  wherever a BatchNorm uses batch statistics) the BatchNorm modules themselves run, so running statistics
  update and ``nn.SyncBatchNorm`` synchronises exactly as in the reference.
* :func:`revert` - every :class:`~gam_triton.GAM` of a model back to a plain PyTorch module of the
  public form with its configuration (:mod:`gam_triton.reference`), sharing its layers.
"""
from __future__ import annotations

import contextlib
import sys
import warnings
from typing import Iterator, Optional

import torch
import torch.nn.functional as F
from torch import nn

from .batchnorm import fold_conv_bn, uses_batch_stats
from .reference import PaperGAM, PlainGAM, SeedGAM, YoloGAM

__all__ = ["deploying", "plain_graph", "plain_forward", "foreign_batchnorm", "to_reference", "revert"]

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


def foreign_batchnorm(gam: nn.Module) -> bool:
    """True when a BatchNorm of ``gam`` that uses batch statistics is not a plain ``nn.BatchNorm2d``
    (e.g. after ``nn.SyncBatchNorm.convert_sync_batchnorm``): only the module itself knows how to
    normalise then, so GAM runs :func:`plain_forward`, which calls it."""
    layers = gam.spatial_attention._modules  # indexing the Sequential costs microseconds per call
    for key in ("1", "4"):
        bn = layers[key]
        if type(bn) is not nn.BatchNorm2d and uses_batch_stats(bn):
            return True
    return False


def _conv_bn(x: torch.Tensor, conv: nn.Conv2d, bn: nn.Module) -> torch.Tensor:
    """bn(conv(x)): folded into one convolution when ``bn`` uses its running statistics."""
    if uses_batch_stats(bn):
        return bn(F.conv2d(x, conv.weight, conv.bias, padding=conv.padding, groups=conv.groups))
    w, b = fold_conv_bn(conv.weight, conv.bias, bn)
    return F.conv2d(x, w, b, padding=conv.padding, groups=conv.groups)


def plain_forward(gam: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """GAM's function in standard aten ops (see the module docstring); ``gam`` is a GAM."""
    with warnings.catch_warnings():  # the channel count is fixed by the weights: a constant in the trace
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        gam._check_input(x)
    fc1, fc2 = gam.channel_attention[0], gam.channel_attention[2]
    conv1, bn1, conv2, bn2 = (gam.spatial_attention[i] for i in (0, 1, 3, 4))
    c, cr = fc1.in_features, fc1.out_features
    hid = torch.relu(F.conv2d(x, fc1.weight.reshape(cr, c, 1, 1), fc1.bias))
    a = F.conv2d(hid, fc2.weight.reshape(c, cr, 1, 1), fc2.bias)
    x1 = x * (torch.sigmoid(a) if gam.channel_sigmoid else a)
    z1 = torch.relu(_conv_bn(x1, conv1, bn1))
    s = torch.sigmoid(_conv_bn(z1, conv2, bn2))
    g = gam.shuffle_groups
    if g:  # out[:, c] = s[:, (c % G) * (C / G) + c // G]; batch left free (-1) for dynamic-batch export
        h, w = s.shape[2], s.shape[3]
        s = s.reshape(-1, g, c // g, h, w).transpose(1, 2).reshape(-1, c, h, w)
    return x1 * s


# -- revert --------------------------------------------------------------------------------------------------
_OWN_STATE: Optional[frozenset] = None  # instance attributes every GAM has (nn.Module internals + config)


def _own_state() -> frozenset:
    global _OWN_STATE
    if _OWN_STATE is None:
        from .module import GAM

        _OWN_STATE = frozenset(vars(GAM(16)))
    return _OWN_STATE


def _is_rename_hook(hook) -> bool:
    from .module import _rename_seed_keys

    return getattr(hook, "hook", hook) is _rename_seed_keys


def _reference_for(gam: nn.Module) -> nn.Module:
    """An empty-layered instance of the public form with ``gam``'s configuration (PlainGAM if none fits)."""
    c, r, k = gam.in_channels, gam.rate, gam.kernel_size
    sig, shuffle, group = gam.channel_sigmoid, gam.shuffle_groups, gam.group
    with torch.device("meta"):  # layers are replaced by gam's own right after: allocate nothing
        if k == 7 and not sig and shuffle == 4:
            return YoloGAM(c, c, group=group, rate=r)
        if k == 7 and sig and shuffle is None and not group:
            return PaperGAM(c, rate=r)
        if k == 7 and not sig and shuffle is None and not group:
            return SeedGAM(c, c, ratio=r)
        return PlainGAM(c, rate=r, kernel_size=k, group=group, channel_sigmoid=sig, shuffle_groups=shuffle)


def to_reference(gam: nn.Module) -> nn.Module:
    """A plain PyTorch module computing what ``gam`` computes, of the public form its configuration names.

    YOLO form (identity channel gate, shuffle 4, 7x7) -> :class:`YoloGAM`; paper form -> :class:`PaperGAM`;
    identity gate without shuffle or grouping -> :class:`SeedGAM` (the seed's children names ``fc1``...);
    anything else -> :class:`PlainGAM`. The new module SHARES ``gam``'s layers (the same Linear, Conv2d and
    BatchNorm objects: parameters, buffers, BN settings, hooks on them) and, as :func:`gam_triton.convert`
    does the other way (:func:`~gam_triton.convert.carry_over`), takes its mode, its hook tables (the same
    dict objects, so handles still remove hooks; GAM's own seed-name renamer excepted) and the instance
    attributes that GAM itself does not define (e.g. the ``f``, ``i``, ``type`` a YOLO parser sets).
    """
    from .convert import carry_over
    from .module import GAM

    if not isinstance(gam, GAM):
        raise TypeError(f"to_reference expects a gam_triton.GAM, got {type(gam).__name__}")
    ref = _reference_for(gam)
    ca, sa = gam.channel_attention, gam.spatial_attention
    if isinstance(ref, SeedGAM):
        for name, layer in (("fc1", ca[0]), ("fc2", ca[2])):
            setattr(ref.channel_attention, name, layer)
        for name, i in (("conv1", 0), ("bn", 1), ("conv2", 3), ("bn1", 4)):
            setattr(ref.spatial_attention, name, sa[i])
    else:
        ref.channel_attention, ref.spatial_attention = ca, sa
    own = _own_state()
    before = set(vars(ref))
    carry_over(gam, ref)  # what convert() carried from the original block, carried back
    for name in own & (set(vars(ref)) - before):  # GAM's own configuration and cache stay with GAM
        delattr(ref, name)
    table = ref._load_state_dict_pre_hooks
    if any(_is_rename_hook(h) for h in table.values()):  # GAM's seed-name renamer stays with GAM
        object.__setattr__(ref, "_load_state_dict_pre_hooks",
                           type(table)((k, h) for k, h in table.items() if not _is_rename_hook(h)))
    return ref


def revert(model: nn.Module) -> nn.Module:
    """Replace, in place, every :class:`~gam_triton.GAM` of ``model`` by :func:`to_reference` of it.

    Returns ``model``; a ``model`` that is itself a GAM cannot be replaced in place, so its reference
    module is returned instead. The weights are not copied: the reference modules share the GAMs' layers,
    so an optimizer built on the converted model goes on updating the reverted one.
    """
    from .module import GAM

    if not isinstance(model, nn.Module):
        raise TypeError(f"revert expects an nn.Module, got {type(model).__name__}")
    if isinstance(model, GAM):
        return to_reference(model)
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, GAM):
                setattr(parent, name, to_reference(child))
    return model
