"""gam_triton inside ultralytics (optional: ``pip install "gam_triton[ultralytics]"``; imported only by
``gam_triton.yolo``, the ``gam-yolo`` CLI).

Two routes:

* **Registration** - ``import gam_triton.ultralytics`` makes the yaml names ``GAM_Attention``, ``GAMAttention``
  (the YOLO form: identity channel gate, ``group=True`` grouped 7x7 convolutions, spatial map shuffled in 4)
  and ``GAM`` (the paper's form) resolve in ``ultralytics.nn.tasks`` (parse_model looks names up in that
  module's globals) to gam_triton blocks. A name the installed ultralytics already defines (a fork's own
  class) is left alone: that is the second route. Arguments: ``[c1, c2]``, ``[c1, c2, group, rate]`` or ``[]``;
  the channel count is read from parse_model's own bookkeeping (``ch[f]``, the input's channels at this
  scale), so ``[-1, 1, GAM_Attention, [1024, 1024]]`` builds with 256 channels after SPPF at scale n and 512 at
  s. Checkpoints hold these classes and load wherever gam_triton imports.
* **Forks with their own GAM class** - :func:`accelerate` (``model = accelerate(YOLO("my-gam.yaml"))``): the
  model is converted now, and its training runs a trainer subclass (:class:`GAMTrainer` mixed into the task's
  trainer) that converts every model it builds, so the trained network, the optimizer, the EMA, the validator
  (during training and the final one on best.pt) and every DDP worker run gam_triton blocks; last.pt and
  best.pt hold the user's own classes again (loadable without gam_triton); after training the reloaded model
  is converted again for ``predict``/``val``.

What runs in each process of a training:

* the launching process: ``Model.train`` builds the trainer (:class:`GAMTrainer` subclass on the fork route),
  whose ``get_model`` builds the network from the yaml, converts it and loads the weights into it; EMA and
  optimizer are made from that converted network (``BaseTrainer._setup_train``), so they hold its parameters.
* DDP workers (ultralytics >= 8.4 pickles the trainer class, its callbacks and its model for them): the
  trainer class and the model's classes are pickled by reference to this module, so unpickling imports it
  there, which registers the names; a worker that builds its model from the yaml calls the same
  ``get_model``. On the registration route with a stock trainer, the import comes from
  :func:`on_pretrain_routine_start`, a no-op callback this module adds to ultralytics' default callbacks
  (pickled into the workers with the trainer's callbacks). Older ultralytics whose DDP file imports only the
  trainer's module: use ``accelerate`` or ``trainer=GAMDetectionTrainer`` (any :class:`GAMTrainer` class).
* rank 0 saves checkpoints (:meth:`GAMTrainer.save_model`: the EMA with each converted block turned back into
  the user's class) and runs the final validation on best.pt through the converted blocks.

FLOPs: thop (``ultralytics.utils.torch_utils.get_flops``, ``model.info()``) hooks the inner layers, and a GAM
whose inner layers carry hooks calls them (see :meth:`gam_triton.GAM._plan`), so the figure is the unconverted
block's.
"""
from __future__ import annotations

import copy
import functools
import logging
import sys
from pathlib import Path
from typing import Optional

import torch
from torch import nn
from ultralytics.engine.model import Model
from ultralytics.models import yolo
from ultralytics.nn import tasks
from ultralytics.utils import callbacks as ul_callbacks

from . import forms
from .convert import convert
from .module import GAM

__all__ = ["GAM_Attention", "GAMAttention", "GAMPaper", "BLOCKS", "register", "accelerate", "GAMTrainer",
           "trainer_class", "GAMDetectionTrainer", "GAMSegmentationTrainer", "GAMPoseTrainer", "GAMOBBTrainer",
           "GAMClassificationTrainer", "on_pretrain_routine_start"]

log = logging.getLogger("gam_triton")

#: Attribute of a GAM converted by a GAMTrainer: the user's block it replaced (a template for checkpoints).
SOURCE = "_gam_triton_source"


# --- registration: yaml names -> gam_triton blocks -------------------------------------------------------------
def _parse_model_frame(cls: type) -> Optional[dict]:
    """The locals of ultralytics' (or a fork's) ``parse_model`` while it constructs a ``cls`` yaml row (not a
    container row whose own constructor builds a GAM: that one gets the channels it is given)."""
    frame = sys._getframe(2)
    for _ in range(8):
        if frame is None:
            return None
        if frame.f_code.co_name == "parse_model":
            loc = frame.f_locals
            return loc if "ch" in loc and "f" in loc and loc.get("m") is cls else None
        frame = frame.f_back
    return None


def _where(loc: dict, name: str) -> str:
    args = loc.get("args")
    return f"model yaml layer {loc.get('i', '?')} ({name}, from {loc['f']!r}, args {args!r})"


def _channels(cls: type, c1) -> tuple[int, Optional[dict]]:
    """The block's channel count: the input's, from parse_model's ``ch[f]`` while it builds the layer (the
    yaml's numbers are for another scale), else ``c1``."""
    name = cls.__name__
    loc = _parse_model_frame(cls)
    if loc is None:
        if c1 is None:
            raise TypeError(f"{name}: give the channel count, {name}(c1, c2=None, ...), outside a model yaml")
        return c1, None
    f, ch = loc["f"], loc["ch"]
    if not isinstance(f, int):
        raise ValueError(f"{_where(loc, name)}: a GAM takes one input, got 'from' = {f!r}")
    try:
        return ch[f], loc
    except (IndexError, TypeError) as e:
        raise ValueError(f"{_where(loc, name)}: no input channel count for 'from' = {f!r} ({e})") from None


class _Registered(GAM):
    """A gam_triton GAM built from a yaml row's arguments; the form is the class's."""

    _FORM: dict = {}

    def __init__(self, c1: Optional[int] = None, c2: Optional[int] = None, group: Optional[bool] = None,
                 rate: int = 4) -> None:
        name = type(self).__name__
        c, loc = _channels(type(self), c1)
        group = self._FORM["group"] if group is None else group
        try:  # in a yaml the output has the input's channels, whatever c2 says (it is written for one scale)
            super().__init__(c, c2 if loc is None else None, rate=rate, group=group,
                             channel_sigmoid=self._FORM["channel_sigmoid"], shuffle_groups=self._FORM["shuffle_groups"])
        except (TypeError, ValueError) as e:
            if loc is None:
                raise
            raise ValueError(f"{_where(loc, name)}: its input has {c} channels, which cannot work: {e}") from None


class GAM_Attention(_Registered):  # noqa: N801 - the name users write in their yaml files
    """The YOLO form ``GAM_Attention(c1, c2, group=True, rate=4)``: identity channel gate, grouped 7x7
    convolutions (``group=True``: groups = rate), spatial map shuffled in 4 groups. ``c1``/``c2`` are read from
    the model when built by parse_model; the output has the input's channels."""

    _FORM = {"group": True, "channel_sigmoid": False, "shuffle_groups": 4}


class GAMAttention(GAM_Attention):
    """``GAMAttention``: the same YOLO form under the other name forks use."""


class GAMPaper(_Registered):
    """The paper's form under the yaml name ``GAM``: ``GAM(c1, c2, group=False, rate=4)``, sigmoid on both
    branches, no shuffle."""

    _FORM = {"group": False, "channel_sigmoid": True, "shuffle_groups": None}


#: yaml name -> block: what :func:`register` puts into ``ultralytics.nn.tasks``.
BLOCKS = {"GAM_Attention": GAM_Attention, "GAMAttention": GAMAttention, "GAM": GAMPaper}


def register(overwrite: bool = False) -> dict:
    """Make the :data:`BLOCKS` names resolve in ``ultralytics.nn.tasks`` (done at import). A name the installed
    ultralytics already defines otherwise (a fork's class) is kept unless ``overwrite``. Returns {name: class}
    as registered now."""
    for name, cls in BLOCKS.items():
        have = getattr(tasks, name, None)
        if have is None or have is cls or overwrite:
            setattr(tasks, name, cls)
        else:
            log.info("gam_triton.ultralytics: ultralytics.nn.tasks.%s is the installed ultralytics' own (%s.%s): "
                     "kept; gam_triton.ultralytics.accelerate(model) runs it on gam_triton", name,
                     getattr(have, "__module__", "?"), getattr(have, "__qualname__", have))
    if on_pretrain_routine_start not in ul_callbacks.default_callbacks["on_pretrain_routine_start"]:
        ul_callbacks.default_callbacks["on_pretrain_routine_start"].append(on_pretrain_routine_start)
    return {name: getattr(tasks, name) for name in BLOCKS}


def on_pretrain_routine_start(trainer) -> None:
    """No-op ultralytics callback. It is in every trainer's callbacks, and ultralytics pickles those into its
    DDP workers by reference, so unpickling them imports this module there, which registers the yaml names."""


# --- the fork route: convert what the trainer builds, save the user's classes -------------------------------------
def _convert_keeping_sources(model: nn.Module) -> nn.Module:
    """``convert(model)``; each new GAM remembers (attribute :data:`SOURCE`, not a submodule) the block it
    replaced, which holds the parser's attributes and the user's class."""
    before = dict(model.named_modules())
    convert(model)
    for name, m in model.named_modules():
        old = before.get(name)
        if isinstance(m, GAM) and old is not None and old is not m and not isinstance(old, GAM):
            object.__setattr__(m, SOURCE, old)
    return model


def _as_source(gam: GAM) -> nn.Module:
    """The user's block again, holding ``gam``'s tensors (its own parameter and buffer objects) and modes."""
    block = copy.deepcopy(vars(gam)[SOURCE])
    layers = forms.structure(block).layers
    for theirs, mine in zip(layers, gam._layers()):
        for name in list(theirs._parameters):
            theirs._parameters[name] = mine._parameters[name]
        for name in list(theirs._buffers):
            theirs._buffers[name] = mine._buffers[name]
    block.train(gam.training)
    for theirs, mine in zip(layers, gam._layers()):
        theirs.training = mine.training
    tail = getattr(gam, "tail_name", None)
    if tail is not None:  # the module after GAM (a TailedGAM's): the trained one itself, its own modes
        block._modules[tail] = gam._modules[tail]
    return block


def _with_source_classes(model: nn.Module) -> nn.Module:
    """A copy of ``model`` whose GAMs that replaced a user's block are that user's block again."""
    out = copy.deepcopy(model)
    for parent in list(out.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, GAM) and SOURCE in vars(child):
                setattr(parent, name, _as_source(child))
    return out


def _validator_get_model(get_model, model, trainer=None, **kwargs):
    """A validator's ``get_model``, then its model converted: the final validation reads best.pt, which holds
    the user's classes. During training it gets the EMA, converted already."""
    model = get_model(model, trainer, **kwargs)
    if trainer is None:
        if isinstance(model, (str, Path)) and str(model).endswith(".pt"):
            with torch.inference_mode(False):  # the validator runs in inference mode: load ordinary tensors
                model = tasks.load_checkpoint(model)[0]  # what AutoBackend would load
        if isinstance(model, nn.Module):
            convert(model)
    return model


class GAMTrainer:
    """Mixed in front of an ultralytics trainer (:func:`trainer_class`): every model the trainer builds is
    converted before its optimizer and EMA exist, the final validation runs converted blocks, and checkpoints
    hold the user's classes."""

    def get_model(self, cfg=None, weights=None, verbose=True):
        """The task's model built from ``cfg``, converted, then ``weights`` loaded into it (converted first, so
        both sides name their tensors alike)."""
        model = _convert_keeping_sources(super().get_model(cfg=cfg, weights=None, verbose=verbose))
        if weights is not None:
            if isinstance(weights, nn.Module):
                convert(weights)
            model.load(weights)
        return model

    def get_validator(self):
        validator = super().get_validator()
        validator.get_model = functools.partial(_validator_get_model, validator.get_model)
        return validator

    def save_model(self):
        """ultralytics' checkpoint, written from the EMA with the user's blocks in place of converted ones."""
        ema = self.ema.ema
        if not any(SOURCE in vars(m) for m in ema.modules()):
            return super().save_model()
        self.ema.ema = _with_source_classes(ema)
        try:
            return super().save_model()
        finally:
            self.ema.ema = ema


_TRAINERS: dict = {}


def trainer_class(base: type) -> type:
    """The :class:`GAMTrainer` subclass of the ultralytics trainer class ``base`` (``base`` itself if it is
    one). Those of the five YOLO tasks are this module's ``GAM<Name>`` attributes; others are made here, and
    ultralytics >= 8.4 pickles them by value into DDP workers."""
    if issubclass(base, GAMTrainer):
        return base
    if base not in _TRAINERS:
        _TRAINERS[base] = type(f"GAM{base.__name__}", (GAMTrainer, base),
                               {"__module__": __name__, "__doc__": f"{base.__name__} running gam_triton blocks."})
    return _TRAINERS[base]


GAMDetectionTrainer = trainer_class(yolo.detect.DetectionTrainer)
GAMSegmentationTrainer = trainer_class(yolo.segment.SegmentationTrainer)
GAMPoseTrainer = trainer_class(yolo.pose.PoseTrainer)
GAMOBBTrainer = trainer_class(yolo.obb.OBBTrainer)
GAMClassificationTrainer = trainer_class(yolo.classify.ClassificationTrainer)


class _Accelerated:
    """Mixed in front of a user's ultralytics Model class by :func:`accelerate`."""

    def _smart_load(self, key: str):
        found = super()._smart_load(key)
        return trainer_class(found) if key == "trainer" else found

    def train(self, trainer=None, **kwargs):
        metrics = super().train(trainer=None if trainer is None else trainer_class(trainer), **kwargs)
        if isinstance(self.model, nn.Module):  # reloaded from best.pt: the user's classes
            convert(self.model)
        return metrics


_MODELS: dict = {}


def accelerate(model: Model) -> Model:
    """Run an ultralytics model (``YOLO(...)``) whose GAM blocks are a fork's own class on gam_triton blocks,
    through training, validation, prediction and export; returns ``model``.

    ``model.model`` is converted now (:func:`gam_triton.convert`); ``model`` becomes an instance of a subclass
    of its own class whose ``train`` uses :func:`trainer_class` of the task's trainer (or of ``trainer=``) and
    converts the model reloaded from best.pt afterwards.
    """
    if not isinstance(model, Model):
        raise TypeError(f"accelerate expects an ultralytics Model such as YOLO(...), got {type(model).__name__}")
    cls = type(model)
    if not issubclass(cls, _Accelerated):
        if cls not in _MODELS:
            _MODELS[cls] = type(cls.__name__, (_Accelerated, cls), {"__module__": cls.__module__})
        model.__class__ = _MODELS[cls]
    if isinstance(model.model, nn.Module):
        convert(model.model)
    return model


register()
