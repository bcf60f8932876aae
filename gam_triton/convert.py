"""Conversion from the GAM modules of public code: :func:`gam_from_module` and :func:`convert`.

Forms 1 (YOLO) and 2 (paper) have identical layers and names, so the structure gives the weights but not
the function. The function is found by experiment: a float64 copy of the source, with its parameters and
statistics replaced by random values (so that no trained weight can hide a difference), is run on a probe
input in eval mode, and each candidate configuration of :class:`~gam_triton.GAM` built from the same
copy is compared with it. The first that reproduces it is kept; if none does, ``ValueError``. The source
module itself is never run, so its BatchNorm statistics are untouched.

:func:`convert` puts each new block where the old one was and carries over what frameworks attach to a
layer (:func:`carry_over`): plain instance attributes (ultralytics' ``f``, ``i``, ``type``, ``np``, names,
pruning or quantisation flags), forward / forward-pre / backward / state-dict hooks, the training flag,
and the parameter and buffer objects themselves (so an optimizer or EMA built before the conversion still
holds the block's parameters).
"""
from __future__ import annotations

import copy
import logging
from typing import Optional

import torch
from torch import nn

from .module import GAM

__all__ = ["gam_from_module", "convert", "carry_over"]

log = logging.getLogger("gam_triton")

#: Hook tables of nn.Module that move with a layer when :func:`convert` replaces it. A table the new block
#: does not use itself is shared (the same dict object, so a RemovableHandle the user holds still removes
#: the hook); one the block fills in its own constructor gets the old entries added in front of its own.
HOOK_TABLES = (
    "_forward_hooks", "_forward_hooks_with_kwargs", "_forward_hooks_always_called",
    "_forward_pre_hooks", "_forward_pre_hooks_with_kwargs",
    "_backward_hooks", "_backward_pre_hooks",
    "_state_dict_hooks", "_state_dict_pre_hooks", "_load_state_dict_pre_hooks", "_load_state_dict_post_hooks",
)
_MODULE_INTERNALS = frozenset(vars(nn.Module())) | {"_is_full_backward_hook"}


# (channel_sigmoid, shuffle_groups), most common first.
_SEQUENTIAL_FORMS = [(False, 4), (True, None), (False, None), (True, 4)]
_SEED_FORMS = [(False, None), (True, None), (False, 4), (True, 4)]


def _layers(module: nn.Module) -> Optional[tuple[list[nn.Module], bool]]:
    """(fc1, fc2, conv1, bn1, conv2, bn2) of a GAM-shaped module and whether it is the seed form."""
    ca = getattr(module, "channel_attention", None)
    sa = getattr(module, "spatial_attention", None)
    if not isinstance(ca, nn.Module) or not isinstance(sa, nn.Module):
        return None
    if isinstance(ca, nn.Sequential) and isinstance(sa, nn.Sequential):
        if len(ca) != 3 or len(sa) != 5:
            return None
        layers, seed = [ca[0], ca[2], sa[0], sa[1], sa[3], sa[4]], False
        if not isinstance(ca[1], nn.ReLU) or not isinstance(sa[2], nn.ReLU):
            return None
    else:
        names = [(ca, "fc1"), (ca, "fc2"), (sa, "conv1"), (sa, "bn"), (sa, "conv2"), (sa, "bn1")]
        layers, seed = [getattr(parent, n, None) for parent, n in names], True
    kinds = (nn.Linear, nn.Linear, nn.Conv2d, nn.BatchNorm2d, nn.Conv2d, nn.BatchNorm2d)
    if not all(type(m) is k for m, k in zip(layers, kinds)):
        return None
    return layers, seed


def _structure(module: nn.Module) -> tuple[list[nn.Module], bool, dict]:
    """The layers, the seed flag and the GAM constructor arguments the structure implies."""
    found = _layers(module)
    if found is None:
        raise ValueError(f"{type(module).__name__} is not a GAM block: expected children channel_attention "
                         "(Linear, ReLU, Linear) and spatial_attention (Conv2d, BatchNorm2d, ReLU, Conv2d, "
                         "BatchNorm2d), or the seed form's fc1/fc2 and conv1/bn/conv2/bn1")
    layers, seed = found
    fc1, fc2, conv1, bn1, conv2, bn2 = layers
    c, cr = fc1.in_features, fc1.out_features
    k = conv1.kernel_size[0]
    ok = (fc2.in_features == cr and fc2.out_features == c and conv1.in_channels == c
          and conv1.out_channels == cr and conv2.in_channels == cr and conv2.out_channels == c
          and bn1.num_features == cr and bn2.num_features == c and conv1.groups == conv2.groups
          and all(cv.kernel_size == (k, k) and cv.padding == (k // 2, k // 2) and cv.stride == (1, 1)
                  and cv.dilation == (1, 1) and cv.padding_mode == "zeros" for cv in (conv1, conv2)))
    if not ok:
        raise ValueError(f"{type(module).__name__} has GAM's layers but not GAM's shapes (C={c}, C/r={cr}, "
                         f"conv kernel {conv1.kernel_size}, padding {conv1.padding}, groups {conv1.groups}); "
                         "gam_triton supports same-size odd square kernels, stride 1, no dilation")
    groups = conv1.groups
    rate = groups if groups > 1 else max(1, c // cr)
    if c // rate != cr:
        raise ValueError(f"{type(module).__name__}: hidden width {cr} is not in_channels // rate for any "
                         f"rate gam_triton can express (C={c}, groups={groups})")
    return layers, seed, dict(in_channels=c, rate=rate, kernel_size=k, group=groups > 1)


def _build(layers: list[nn.Module], args: dict, sigmoid: bool, shuffle: Optional[int], share: bool = False) -> GAM:
    """A GAM with the configuration given and the weights, statistics and BN settings of ``layers``.

    ``share``: the new block holds the very Parameter and buffer objects of ``layers`` (in-place
    replacement); otherwise copies of them.
    """
    gam = GAM(**args, channel_sigmoid=sigmoid, shuffle_groups=shuffle)
    ref = layers[0].weight
    gam.to(device=ref.device, dtype=ref.dtype)
    ours = [gam.channel_attention[0], gam.channel_attention[2],
            *(gam.spatial_attention[i] for i in (0, 1, 3, 4))]
    for mine, theirs in zip(ours, layers):
        if getattr(theirs, "bias", True) is None:
            mine.bias = None
        if isinstance(theirs, nn.BatchNorm2d):
            mine.eps, mine.momentum = theirs.eps, theirs.momentum
            mine.affine, mine.track_running_stats = theirs.affine, theirs.track_running_stats
            for name in ("weight", "bias"):
                if getattr(theirs, name) is None:
                    setattr(mine, name, None)
            for name in ("running_mean", "running_var", "num_batches_tracked"):
                if getattr(theirs, name) is None:
                    mine.register_buffer(name, None)
        if share:
            for name, p in theirs.named_parameters(recurse=False):
                setattr(mine, name, p)
            for name, b in theirs.named_buffers(recurse=False):
                setattr(mine, name, b)
            continue
        mine.load_state_dict(theirs.state_dict(), strict=True)
        for (_, p_mine), (_, p_theirs) in zip(mine.named_parameters(), theirs.named_parameters()):
            p_mine.requires_grad_(p_theirs.requires_grad)
    return gam


def _randomise(module: nn.Module, gen: torch.Generator) -> None:
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * 0.5)
        for name, b in module.named_buffers():
            if name.endswith("running_mean"):
                b.copy_(torch.randn(b.shape, generator=gen, dtype=b.dtype) * 0.5)
            elif name.endswith("running_var"):
                b.copy_(torch.rand(b.shape, generator=gen, dtype=b.dtype) + 0.5)


def _find_form(module: nn.Module, seed: bool, args: dict) -> tuple[bool, Optional[int]]:
    probe_src = copy.deepcopy(module).to(device="cpu", dtype=torch.float64).eval()
    for m in probe_src.modules():  # the block's own function: hooks (a user's, a framework's) are not part of it
        for table in HOOK_TABLES:
            if getattr(m, table, None):
                object.__setattr__(m, table, type(getattr(m, table))())
    gen = torch.Generator().manual_seed(1234)
    _randomise(probe_src, gen)
    x = torch.randn(2, args["in_channels"], 5, 6, generator=gen, dtype=torch.float64)
    with torch.no_grad():
        try:
            want = probe_src(x)
        except Exception as e:  # the source's own forward failed: nothing to compare against
            raise ValueError(f"{type(module).__name__}: running it on a probe input failed ({e!r})") from e
        if not isinstance(want, torch.Tensor) or want.shape != x.shape:
            raise ValueError(f"{type(module).__name__} returns {getattr(want, 'shape', type(want))} for "
                             f"input {tuple(x.shape)}: not a GAM block")
        layers = _structure(probe_src)[0]
        forms = _SEED_FORMS if seed else _SEQUENTIAL_FORMS
        for sigmoid, shuffle in forms:
            if shuffle and args["in_channels"] % shuffle:
                continue
            got = _build(layers, args, sigmoid, shuffle).eval()(x)
            if torch.allclose(got, want, rtol=1e-9, atol=1e-10):
                return sigmoid, shuffle
    raise ValueError(f"{type(module).__name__} has GAM's layers but computes none of the GAM forms "
                     "gam_triton implements (channel gate sigmoid or identity, spatial map shuffled in 4 "
                     "groups or not): refusing to convert it into a different function")


def _plain_attributes(old: nn.Module, new: nn.Module) -> dict:
    """The instance attributes of ``old`` that a framework or user set on it: not nn.Module's internals,
    not attributes the new block defines itself (its own construction, its class's attributes and properties;
    nn.Module's method names such as ``type`` stay free, as they were on ``old``)."""
    mine = set(vars(new))
    for cls in type(new).__mro__:
        if cls is nn.Module:
            break
        mine.update(vars(cls))
    return {k: v for k, v in vars(old).items() if k not in _MODULE_INTERNALS and k not in mine}


def carry_over(old: nn.Module, new: nn.Module, hooks: bool = True) -> nn.Module:
    """Give ``new`` what ``old`` held beyond its parameters and buffers; return ``new``.

    Copied: the plain instance attributes (by reference, see :func:`_plain_attributes`), the training flag
    and, with ``hooks``, every hook table in :data:`HOOK_TABLES` (and whether backward hooks are "full").
    Not copied: attributes the new block defines itself (``in_channels``, ``rate``, ...), class-level
    monkeypatches of ``type(old)``, and hooks registered globally (``nn.modules.module.register_module_*``
    apply to every module anyway).
    """
    if not isinstance(old, nn.Module) or not isinstance(new, nn.Module):
        raise TypeError(f"carry_over expects two nn.Modules, got {type(old).__name__} and {type(new).__name__}")
    for k, v in _plain_attributes(old, new).items():
        object.__setattr__(new, k, v)
    if hooks:
        for table in HOOK_TABLES:
            theirs = getattr(old, table, None)
            if theirs is None:  # older torch without this table
                continue
            own = getattr(new, table)
            if not own:
                object.__setattr__(new, table, theirs)
            elif theirs:
                merged = type(own)(theirs)
                merged.update(own)
                object.__setattr__(new, table, merged)
        if getattr(old, "_is_full_backward_hook", None) is not None:
            new._is_full_backward_hook = old._is_full_backward_hook
    new.train(old.training)
    return new


def gam_from_module(module: nn.Module, share: bool = False) -> GAM:
    """Build a :class:`GAM` equal to ``module`` (weights, statistics, mode, device and dtype).

    ``share`` (what :func:`convert` uses): hold ``module``'s own Parameter and buffer objects instead of
    copies. The plain attributes ``module`` carries (e.g. ultralytics' ``f``/``i``/``type``/``np``) are
    copied; its hooks are not: ``module`` still exists and keeps them, and a copy would make each hook fire
    for two blocks (``convert``, which replaces the block, moves them).
    """
    if not isinstance(module, nn.Module):
        raise TypeError(f"from_module expects an nn.Module, got {type(module).__name__}")
    layers, seed, args = _structure(module)
    sigmoid, shuffle = _find_form(module, seed, args)
    gam = _build(layers, args, sigmoid, shuffle, share=share)
    return carry_over(module, gam, hooks=False)


def convert(model: nn.Module) -> nn.Module:
    """Replace, in place, every GAM block of ``model`` by a :class:`GAM`; return ``model``.

    Each new block takes the old one's place under the same name and holds the old block's Parameter and
    buffer objects (an optimizer built before the conversion keeps working), its plain attributes and its
    hooks (:func:`carry_over`). A block with GAM's layers whose function matches no supported form is left as
    it is, with a warning. A ``model`` that is itself a GAM block cannot be replaced in place: use
    ``GAM.from_module``.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"convert expects an nn.Module, got {type(model).__name__}")
    replaced = 0

    def visit(parent: nn.Module, prefix: str) -> None:
        nonlocal replaced
        for name, child in list(parent.named_children()):
            path = f"{prefix}{name}"
            if not isinstance(child, GAM) and _layers(child) is not None:
                try:
                    new = carry_over(child, gam_from_module(child, share=True))
                except ValueError as e:
                    log.warning("gam_triton.convert: left %s as it is: %s", path, e)
                else:
                    setattr(parent, name, new)
                    replaced += 1
                    continue
            visit(child, path + ".")

    visit(model, "")
    log.info("gam_triton.convert: replaced %d GAM block(s)", replaced)
    return model
