"""Swap GAM blocks in and out of a model: :func:`convert` (public forms -> :class:`~gam_triton.GAM`) and
:func:`revert` (back to the public forms' plain modules). Tree walks only: what a block is and what a
replacement takes over live in :mod:`gam_triton.reference`, how a GAM is built from a block in
:meth:`gam_triton.GAM.from_module`.
"""
from __future__ import annotations

import logging

from torch import nn

from . import reference
from .module import GAM

__all__ = ["convert", "revert"]

log = logging.getLogger("gam_triton")


def convert(model: nn.Module) -> nn.Module:
    """Replace, in place, every GAM block of ``model`` by a :class:`GAM`; return ``model``.

    Each new block takes the old one's place under the same name and holds the old block's Parameter and
    buffer objects (an optimizer built before the conversion keeps working), its plain attributes and its
    hooks (:func:`gam_triton.reference.carry_over`). A block with GAM's layers whose function matches no
    supported form is left as it is, with a warning. A ``model`` that is itself a GAM block cannot be
    replaced in place: use ``GAM.from_module``.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"convert expects an nn.Module, got {type(model).__name__}")
    replaced = 0

    def visit(parent: nn.Module, prefix: str) -> None:
        nonlocal replaced
        for name, child in list(parent.named_children()):
            path = f"{prefix}{name}"
            if not isinstance(child, GAM) and reference.layers(child) is not None:
                try:
                    new = reference.carry_over(child, GAM.from_module(child, share=True))
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
