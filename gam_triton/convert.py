"""Swap GAM blocks in and out of a model: :func:`convert` (public forms -> :class:`~gam_triton.GAM`) and
:func:`revert` (back to the public forms' plain modules). Tree walks only: what a block is and what a
replacement takes over live in :mod:`gam_triton.forms`, how a GAM is built from a block in
:meth:`gam_triton.GAM.from_module`.
"""
from __future__ import annotations

import logging

from torch import nn

from . import forms
from .module import GAM

__all__ = ["convert", "revert"]

log = logging.getLogger("gam_triton")


def convert(model: nn.Module, strict: bool = False) -> nn.Module:
    """Replace, in place, every GAM block of ``model`` by a :class:`GAM`; return ``model``.

    Each new block takes the old one's place under the same name and holds the old block's Parameter and
    buffer objects (an optimizer built before the conversion keeps working), its plain attributes, its hooks
    (:func:`gam_triton.forms.carry_over`) and its modes, layer for layer (:meth:`GAM.from_module`). A block
    is converted only when :func:`gam_triton.forms.detect_form` proves the new one computes the same
    function, in eval and in train mode.

    Every block that looks like a GAM (:func:`gam_triton.forms.looks_like_gam`: "GAM" in its class name,
    or GAM-like ``channel_attention`` and ``spatial_attention`` children) and is left as it is gets a WARNING
    naming it and the first mismatch; with ``strict=True`` a ``ValueError`` listing them all is raised
    instead, before anything is replaced. A block named like a GAM that only contains GAM blocks (a
    ``C2f_GAM``) is searched, not reported. A ``model`` that is itself a GAM block cannot be replaced in
    place: use ``GAM.from_module``.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"convert expects an nn.Module, got {type(model).__name__}")
    plan: list = []     # (parent, name, new block)
    refused: list = []  # (path, reason)

    def visit(parent: nn.Module, prefix: str) -> None:
        for name, child in list(parent.named_children()):
            path = f"{prefix}{name}"
            if isinstance(child, GAM):
                continue
            if forms.layers(child) is not None or forms.looks_like_gam(child):
                seen = len(plan) + len(refused)
                try:
                    new = forms.carry_over(child, GAM.from_module(child, share=True))
                except ValueError as e:
                    reason = e
                else:
                    plan.append((parent, name, new))
                    continue
                visit(child, path + ".")
                if len(plan) + len(refused) == seen:  # nothing GAM-like below: the block itself is the GAM
                    refused.append((path, reason))
                continue
            visit(child, path + ".")

    visit(model, "")
    if strict and refused:
        lines = "\n".join(f"  {path}: {reason}" for path, reason in refused)
        raise ValueError(f"gam_triton.convert(strict=True): {len(refused)} GAM-looking block(s) cannot be "
                         f"converted exactly:\n{lines}")
    for parent, name, new in plan:
        setattr(parent, name, new)
    for path, reason in refused:
        log.warning("gam_triton.convert: left %s as it is: %s", path, reason)
    log.info("gam_triton.convert: replaced %d GAM block(s)%s", len(plan),
             f", left {len(refused)} GAM-looking block(s) as they are" if refused else "")
    return model


def revert(model: nn.Module) -> nn.Module:
    """Replace, in place, every :class:`GAM` of ``model`` by :meth:`GAM.to_reference` of it.

    Returns ``model``; a ``model`` that is itself a GAM cannot be replaced in place, so its reference
    module is returned instead. The weights are not copied: the reference modules share the GAMs' layers,
    so an optimizer built on the converted model goes on updating the reverted one.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"revert expects an nn.Module, got {type(model).__name__}")
    if isinstance(model, GAM):
        return model.to_reference()
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, GAM):
                setattr(parent, name, child.to_reference())
    return model
