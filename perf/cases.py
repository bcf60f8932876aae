"""What one sweep row times: the callable of a provider for a (kind, shape, dtype, mode).

Kinds: ``gam`` (the whole block, YOLO form ``gam_triton.reference.YoloGAM``), ``channel_gate`` and
``final_gate`` (the fused components alone, forward only; see ``components.py``). Providers:

* ``eager``: the reference in plain PyTorch;
* ``compile`` / ``compile-max-autotune``: ``torch.compile`` of the reference (default mode /
  ``mode="max-autotune"``), after ``torch._dynamo.reset()`` so each shape compiles afresh;
* ``gam_triton``: ``gam_triton.GAM.from_module(reference)`` (the public conversion) or the component op;
* ``gam_triton-tconv``: the same with GAM_TRITON_CONV=triton (the fused Triton convolutions), whole block,
  forward mode only.

Modes: ``forward`` (eval, the caller runs it under ``torch.no_grad()``) and ``train`` (``module.train()``,
forward + backward with a random output gradient; the input requires grad as inside a network).
Inputs rotate over several sets on a GPU when one set is small enough to stay in L2.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Callable

import torch

import components as comp
from common import Shape, gam_bytes, gam_flops, rotation_count


@dataclass
class Case:
    """One timed call (``step``), what to clear between calls, and the work it does."""

    step: Callable[[], object]
    bytes: int
    flops: int
    grads: list = field(default_factory=list)


def compiled(fn, provider: str, reset_dynamo: bool = True):
    """torch.compile of ``fn`` for a compile provider, from a clean dynamo state (``reset_dynamo=False``:
    the caller resets once per shape, so that the providers of one shape all stay compiled)."""
    import torch._dynamo

    if reset_dynamo:
        torch._dynamo.reset()  # no cache-size limit reached, no automatic dynamic shapes across rows
    return torch.compile(fn, mode="max-autotune" if provider == "compile-max-autotune" else None)


def _cycle(n: int) -> Callable[[], int]:
    it = itertools.cycle(range(n))
    return lambda: next(it)


def gam_case(shape: Shape, dtype: torch.dtype, mode: str, provider: str, device: str,
             reset_dynamo: bool = True) -> Case:
    from gam_triton import GAM
    from gam_triton.reference import YoloGAM

    train = mode == "train"
    torch.manual_seed(0)
    ref = YoloGAM(shape.channels, shape.channels, group=shape.group, rate=shape.rate)
    ref = ref.to(device=device, dtype=dtype).train(train)
    if provider == "gam_triton":
        model = GAM.from_module(ref)
    elif provider == "gam_triton-tconv":  # eval only: the spatial branch on the Triton convolutions
        if train:
            raise ValueError("gam_triton-tconv is an eval (forward) provider: training keeps cuDNN")
        model = _forced_conv(GAM.from_module(ref), "triton")
    elif provider == "eager":
        model = ref
    else:
        model = compiled(ref, provider, reset_dynamo)
    nbytes = gam_bytes(shape, dtype, mode)
    n = rotation_count(nbytes, device != "cpu")
    size = (shape.batch, shape.channels, shape.height, shape.width)
    xs = [torch.randn(size, device=device, dtype=dtype).requires_grad_(train) for _ in range(n)]
    nxt = _cycle(n)
    if train:
        gs = [torch.randn(size, device=device, dtype=dtype) for _ in range(n)]

        def step():
            i = nxt()
            model(xs[i]).backward(gs[i])

        grads = xs + list(model.parameters())
    else:
        def step():
            return model(xs[nxt()])

        grads = []
    return Case(step, nbytes, gam_flops(shape, mode), grads)


def _forced_conv(model, conv: str):
    """``model`` called with GAM_TRITON_CONV=``conv`` (set around each call: about a microsecond)."""
    import os

    def call(x):
        old = os.environ.get("GAM_TRITON_CONV")
        os.environ["GAM_TRITON_CONV"] = conv
        try:
            return model(x)
        finally:
            if old is None:
                del os.environ["GAM_TRITON_CONV"]
            else:
                os.environ["GAM_TRITON_CONV"] = old

    return call


def channel_gate_case(shape: Shape, dtype: torch.dtype, provider: str, device: str,
                      reset_dynamo: bool = True) -> Case:
    nbytes = comp.channel_gate_bytes(shape, dtype)
    n = rotation_count(nbytes, device != "cpu")
    sets = [comp.make_channel_gate(shape, dtype, device, seed=i) for i in range(n)]
    if provider == "gam_triton":
        fn = comp.channel_gate_triton
    elif provider == "eager":
        fn = comp.channel_gate_eager
    else:
        fn = compiled(comp.channel_gate_eager, provider, reset_dynamo)
    nxt = _cycle(n)
    return Case(lambda: fn(*sets[nxt()]), nbytes, comp.channel_gate_flops(shape))


def final_gate_case(shape: Shape, dtype: torch.dtype, provider: str, device: str,
                    reset_dynamo: bool = True) -> Case:
    nbytes = comp.final_gate_bytes(shape, dtype)
    n = rotation_count(nbytes, device != "cpu")
    sets = [comp.make_final_gate(shape, dtype, device, seed=i) for i in range(n)]
    nxt = _cycle(n)
    if provider == "gam_triton":
        folded = [(x1, y2, *comp.final_gate_scale_shift(bn, y2)) for x1, y2, bn in sets]
        return Case(lambda: comp.final_gate_triton(*folded[nxt()]), nbytes, comp.final_gate_flops(shape))
    fn = comp.final_gate_eager if provider == "eager" else compiled(comp.final_gate_eager, provider, reset_dynamo)
    return Case(lambda: fn(*sets[nxt()]), nbytes, comp.final_gate_flops(shape))


def build_case(kind: str, shape: Shape, dtype: torch.dtype, mode: str, provider: str, device: str,
               reset_dynamo: bool = True) -> Case:
    """The Case of one row; components exist in forward mode only."""
    if kind == "gam":
        return gam_case(shape, dtype, mode, provider, device, reset_dynamo)
    if mode != "forward":
        raise ValueError(f"{kind} rows are forward-only (got mode {mode!r})")
    if kind == "channel_gate":
        return channel_gate_case(shape, dtype, provider, device, reset_dynamo)
    if kind == "final_gate":
        return final_gate_case(shape, dtype, provider, device, reset_dynamo)
    raise ValueError(f"unknown kind {kind!r}")
