"""The measuring tool: gam_triton against eager PyTorch and torch.compile, timed in interleaved rounds, one CSV.

    python perf/bench.py                      # GPU: the full sweep; no GPU: the quick CPU sweep (CPU figures)
    python perf/bench.py --quick              # GPU: the headline shapes, kernels alone first (any machine)
    python perf/bench.py --quick --budget 200 --out DIR      # stop starting new shapes after 200 s
    python perf/bench.py --rehearse --out DIR # any machine: every kind on tiny shapes (NOT figures)

Kinds (:data:`KINDS`, data: a builder, its providers, its modes): ``gam``, the whole block (``YoloGAM``, grouped
"g" or plain "p") in ``forward`` (eval, no grad) and ``train`` (forward + backward); ``channel_gate`` and
``final_gate``, the fused components alone; the kernels of issue 22 alone (:data:`KERNELS`, from the ops' own
objects, against their byte or FLOP floor); ``model``, the detector of ``perf/model.py`` (``no_gam``: without its
GAMs). Block providers (:data:`BLOCK`): ``eager``, ``compile``, ``compile-max-autotune`` (full GPU sweep, eval, or
when named), ``gam_triton`` (``GAM.from_module``), ``gam_triton-tconv`` (GAM_TRITON_CONV=triton, eval only).

The first call of each provider is untimed (``compile_s``); the providers of one shape are then timed in
interleaved rounds (:func:`bench_interleaved`; ``triton.testing.do_bench`` on a GPU): speedups are medians of
per-round ratios, a row whose rounds disagree is flagged ``noisy``. Writes ``results.csv`` (:data:`COLUMNS`, rows
appended as measured; rows already there are skipped, so a run resumes) and ``env.json`` into ``--out`` (default
``perf/results/<gpu name>/``, or ``perf/results/cpu/``), then ``perf/report.py`` draws. Without a GPU every figure
is a CPU figure, under ``TRITON_INTERPRET=1`` gam_triton's are interpreter times (the ``note`` column says so).
"""
from __future__ import annotations

import argparse
import contextlib
import csv
import datetime
import gc
import importlib
import json
import math
import os
import platform
import re
import sys
import time
from dataclasses import dataclass
from typing import Callable, NamedTuple, Optional, Sequence

import torch

PERF_DIR = os.path.dirname(os.path.abspath(__file__))
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
MODES = ("forward", "train")
CPU_NOTE = "CPU figures, not GPU performance"
INTERPRET_NOTE = "TRITON_INTERPRET=1: gam_triton ran in Triton's interpreter; not performance figures"
REHEARSAL_NOTE = "REHEARSAL on the CPU (tiny shapes): it checks that every step runs; NOT performance figures"
#: Ceilings of the target GPUs (GAM_NOTES.md): copy bandwidth (read + written), bytes/s; bf16 dense matmul, FLOP/s.
GPU_BANDWIDTH = {"H100": 3.0e12, "H200": 4.3e12}
GPU_PEAK_FLOPS = {"H100": 798e12, "H200": 790e12}
#: results.csv's columns (units: ms per call, median / p20 / p80; gbps over the compulsory bytes; roofline_frac =
#: floor / ms, the floor being bytes / copy_gbps, or FLOPs / the measured matmul rate where higher; vs_* the
#: medians of per-round speedups; spread = p80 / p20 across rounds; noisy when spread > NOISY_SPREAD).
COLUMNS = ["device", "torch", "triton", "dtype", "mode", "kind", "batch", "channels", "height", "width", "rate",
           "group", "provider", "ms", "ms_p20", "ms_p80", "gbps", "tflops", "peak_mem_mb", "roofline_frac",
           "copy_gbps", "compile_s", "reps", "error", "note", "date",
           "rounds", "vs_eager", "vs_eager_p20", "vs_eager_p80", "vs_compile", "spread", "noisy"]
KEY_COLUMNS = COLUMNS[:13]


# --- the machine -------------------------------------------------------------------------------------------
def interpreting() -> bool:
    return importlib.import_module("gam_triton.ops._runtime").INTERPRET


@dataclass(frozen=True)
class Machine:
    device: str
    is_gpu: bool
    torch: str
    triton: str
    date: str
    note: str

    @property
    def results_dir(self) -> str:  # 'NVIDIA H100 80GB HBM3' -> perf/results/NVIDIA-H100-80GB-HBM3
        return os.path.join(PERF_DIR, "results", re.sub(r"[^A-Za-z0-9._-]+", "-", self.device).strip("-"))


def machine(rehearse: bool = False) -> Machine:
    """The first CUDA GPU if there is one (and this is no rehearsal), else the CPU, with the labels it needs."""
    import triton

    is_gpu = torch.cuda.is_available() and not rehearse and not interpreting()
    notes = ([REHEARSAL_NOTE] if rehearse else []) + ([] if is_gpu else [CPU_NOTE])
    notes += [INTERPRET_NOTE] if interpreting() else []
    return Machine(torch.cuda.get_device_name(0) if is_gpu else "cpu", is_gpu, torch.__version__, triton.__version__,
                   datetime.datetime.now().astimezone().isoformat(timespec="seconds"), "; ".join(notes))


# --- shapes ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Shape:
    """One GAM input: batch x channels x height x width, reduction rate, grouped convolutions (YOLO form) or not."""

    batch: int
    channels: int
    height: int
    width: int
    rate: int = 4
    group: bool = True

    def __post_init__(self) -> None:
        if min(self.batch, self.channels, self.height, self.width, self.rate) < 1 or self.channels % 4 or \
                self.hidden < 1 or (self.group and (self.channels % self.rate or self.hidden % self.rate)):
            raise ValueError(f"Shape {self}: sizes >= 1, channels divisible by 4 (the shuffle) and by rate, and "
                             "for grouped convolutions channels // rate too")

    hidden = property(lambda self: self.channels // self.rate)
    groups = property(lambda self: self.rate if self.group else 1)
    pixels = property(lambda self: self.height * self.width)
    numel = property(lambda self: self.batch * self.channels * self.pixels)

    def label(self) -> str:
        return f"B{self.batch} C{self.channels} {self.height}x{self.width} {'g' if self.group else 'p'}"


#: (channels, map) of the YOLO models at a 640 input: P3 80x80, P4 40x40, P5 20x20 (GAM_NOTES.md).
YOLO_CHANNELS_AT = {80: (64, 128, 192, 256, 320), 40: (128, 256, 384, 512, 640), 20: (256, 512, 576, 640, 1024)}
FULL_BATCHES = (1, 16, 32)
HEADLINE_PAIRS = ((128, 80), (256, 40), (512, 20))   # the YOLOv8 neck; --quick on a GPU, batch 16
QUICK_CPU_PAIRS = ((64, 40), (128, 20))
#: Where the kernels of issue 22 are timed alone (B16 YOLO form): one headline shape, and C64 80x80 for the
#: small-group convolutions.
KERNEL_SHAPES = ((256, 40), (64, 80))


yolo_pairs = lambda: [(c, s) for s, cs in YOLO_CHANNELS_AT.items() for c in cs]  # noqa: E731


_elt = lambda dtype: torch.empty((), dtype=dtype).element_size()  # noqa: E731


def gam_flops(shape: Shape, mode: str, kernel_size: int = 7) -> int:
    """Channel MLP 4*N*C*C/r + two 7x7 convolutions 2 * 2*N*(C/r)*(C/g)*k*k, N = B*H*W; train counts 3x forward."""
    n, c, cr, kk = shape.batch * shape.pixels, shape.channels, shape.hidden, kernel_size**2
    return (4 * n * c * cr + 4 * n * cr * (c // shape.groups) * kk) * (3 if mode == "train" else 1)


def gam_bytes(shape: Shape, dtype: torch.dtype, mode: str) -> int:
    """What one perfect kernel would move: read x and the weights, write out (train: also read the output's
    gradient, write the input's and the weights' gradients). ``perf/traffic.py`` counts what each provider moves."""
    c, cr, g, kk = shape.channels, shape.hidden, shape.groups, 49
    params = 2 * c * cr + c + cr + cr * (c // g) * kk + cr + c * (cr // g) * kk + c + 4 * cr + 4 * c
    act = shape.numel
    return ((4 * act + 2 * params) if mode == "train" else (2 * act + params)) * _elt(dtype)


# --- timing ------------------------------------------------------------------------------------------------
Timing = NamedTuple("Timing", [("ms", float), ("ms_p20", float), ("ms_p80", float), ("reps", int)])
#: Per provider its Timing, and the median of each of its rounds (``rounds[name][r]``, ms).
Interleaved = NamedTuple("Interleaved", [("timings", dict), ("rounds", dict)])


ROUNDS, MIN_ROUNDS, GPU_ROUNDS = 5, 3, 3
NOISY_SPREAD = 1.5   # p80 / p20 across rounds above this: the row's figure is not known to about +-20 %


def _quantile(sorted_values: Sequence[float], q: float) -> float:
    pos = (len(sorted_values) - 1) * q
    lo, hi = math.floor(pos), math.ceil(pos)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo)


def _median(values: Sequence[float]) -> float:
    return _quantile(sorted(values), 0.5)


def _clear(grads: Sequence[torch.Tensor]) -> None:
    for t in grads:
        t.grad = None


def bench_interleaved(fns: dict, on_gpu: bool, budget_s: float = 0.5, max_reps: int = 200,
                      rounds: int = ROUNDS) -> Interleaved:
    """Time callables of one shape in rounds, each taking every one in turn (the order rotates): a busy neighbour
    slows every provider of a round alike. ``fns``: name -> (fn, grads set to None before each call), run once.
    GPU: ``GPU_ROUNDS`` rounds of ``triton.testing.do_bench`` (L2 flushed before each call), Timing = medians over
    rounds. CPU: a warm-up call each, then ``rounds`` rounds (down to ``MIN_ROUNDS`` for slow calls) of equal
    wall-clock slots (``budget_s / rounds``, at least one call), Timing = quantiles over all calls."""
    names = list(fns)
    per_round: dict = {n: [] for n in names}
    order = lambda r: names[r % len(names):] + names[:r % len(names)]  # noqa: E731
    if on_gpu:
        from triton.testing import do_bench

        qs: dict = {n: [] for n in names}
        rep = max(10, 100 // GPU_ROUNDS)
        for r in range(GPU_ROUNDS):
            for n in order(r):
                fn, grads = fns[n]
                q = do_bench(fn, warmup=25 if r == 0 else 5, rep=rep, grad_to_none=list(grads) or None,
                             quantiles=[0.5, 0.2, 0.8])
                per_round[n].append(q[0])
                qs[n].append(q)
        return Interleaved({n: Timing(*(_median([q[i] for q in qs[n]]) for i in range(3)),
                                      GPU_ROUNDS * max(1, int(rep / max(per_round[n][0], 1e-6)))) for n in names},
                           per_round)
    est = {}
    for n in names:
        fn, grads = fns[n]
        _clear(grads)
        t0 = time.perf_counter()
        fn()
        est[n] = time.perf_counter() - t0
    if sum(est.values()) * rounds > budget_s * len(names):
        rounds = max(min(MIN_ROUNDS, rounds), int(budget_s * len(names) / max(sum(est.values()), 1e-9)))
    slot, cap = budget_s / rounds, max(1, max_reps // rounds)
    times: dict = {n: [] for n in names}
    for r in range(rounds):
        for n in order(r):
            fn, grads = fns[n]
            ts: list = []
            start = time.perf_counter()
            while not ts or (len(ts) < cap and time.perf_counter() - start < slot):
                _clear(grads)
                t0 = time.perf_counter()
                fn()
                ts.append((time.perf_counter() - t0) * 1e3)
            times[n] += ts
            per_round[n].append(_median(ts))
    return Interleaved({n: Timing(*(_quantile(sorted(times[n]), q) for q in (0.5, 0.2, 0.8)), len(times[n]))
                        for n in names}, per_round)


def ratio_stats(base_rounds: Sequence[float], rounds: Sequence[float]) -> tuple[float, float, float]:
    """Median, p20 and p80 of the per-round ratios base / provider (the speedup over base)."""
    r = sorted(b / p for b, p in zip(base_rounds, rounds) if p > 0)
    return tuple(_quantile(r, q) for q in (0.5, 0.2, 0.8)) if r else (math.nan,) * 3


def spread(values: Sequence[float]) -> float:
    """p80 / p20 of per-round values: 1.0 when every round agrees."""
    v = sorted(x for x in values if x == x and x > 0)
    return _quantile(v, 0.8) / _quantile(v, 0.2) if len(v) > 1 else math.nan


def peak_memory_mb(fn: Callable[[], object], grads: Sequence[torch.Tensor] = ()) -> float:
    """GPU memory one call allocates beyond what was allocated before it."""
    _clear(grads)
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def ceilings(on_gpu: bool, dtype: torch.dtype) -> tuple[float, float]:
    """(GB/s of a large copy, read + written; TFLOP/s of a large matmul in ``dtype``) on this device: the floors'
    ceilings, measured in the same run."""
    big = 2**27 if on_gpu else 2**24
    src, n = torch.empty(big, device="cuda" if on_gpu else "cpu").uniform_(), 8192 if on_gpu else 512
    dst, a = torch.empty_like(src), src[:n * n].view(n, n).to(dtype)
    ms = bench_interleaved({"copy": (lambda: dst.copy_(src), []), "mm": (lambda: a @ a, [])}, on_gpu, 0.3).timings
    return 8 * big / ms["copy"].ms / 1e6, 2 * n**3 / ms["mm"].ms / 1e9


# --- what one row times ------------------------------------------------------------------------------------
#: One timed call (``step``), the work it does, and the gradients to set to None between calls.
Case = NamedTuple("Case", [("step", Callable), ("bytes", int), ("flops", int), ("grads", list)])
Case.__new__.__defaults__ = ([],)


@contextlib.contextmanager
def conv_mode(mode: str):
    """GAM_TRITON_CONV set to ``mode`` for the duration."""
    old, os.environ["GAM_TRITON_CONV"] = os.environ.get("GAM_TRITON_CONV"), mode
    try:
        yield
    finally:
        os.environ.pop("GAM_TRITON_CONV") if old is None else os.environ.update(GAM_TRITON_CONV=old)


def _gam(m, conv: Optional[str] = None):
    from gam_triton import GAM

    gam = GAM.from_module(m)

    def forced(x):
        with conv_mode(conv):
            return gam(x)
    return gam if conv is None else forced


#: The providers of the whole block and the components: what each makes of the eager module or function.
BLOCK = {"eager": lambda m: m, "compile": torch.compile, "compile-max-autotune":
         lambda m: torch.compile(m, mode="max-autotune"), "gam_triton": _gam, "gam_triton-tconv": lambda m:
         _gam(m, "triton")}
EVAL_ONLY = ("gam_triton-tconv",)


def gam_case(shape: Shape, dtype: torch.dtype, mode: str, provider: str, device: str) -> Case:
    from gam_triton.reference import YoloGAM

    train = mode == "train"
    torch.manual_seed(0)
    ref = YoloGAM(shape.channels, shape.channels, group=shape.group, rate=shape.rate).to(device, dtype).train(train)
    if train and provider in EVAL_ONLY:
        raise ValueError(f"{provider} is an eval (forward) provider: training keeps cuDNN")
    model, work = BLOCK[provider](ref), (gam_bytes(shape, dtype, mode), gam_flops(shape, mode))
    x, g = (torch.randn(shape.batch, shape.channels, shape.height, shape.width, device=device, dtype=dtype)
            for _ in range(2))  # one input: do_bench flushes the L2 cache before every call
    if train:
        x.requires_grad_()
        return Case(lambda: model(x).backward(g), *work, [x, *ref.parameters()])
    return Case(lambda: model(x), *work)


def channel_gate_eager(x, w1, b1, w2, b2):
    """The YOLO reference's channel branch and gate, op for op."""
    b, c, h, w = x.shape
    att = torch.nn.functional.linear(torch.relu(torch.nn.functional.linear(
        x.permute(0, 2, 3, 1).reshape(b, -1, c), w1, b1)), w2, b2).view(b, h, w, c)
    return x * att.permute(0, 3, 1, 2)


def final_gate_eager(x1, y2, bn):
    """The YOLO reference's last steps: BN2 (eval), sigmoid, shuffle in 4 groups, multiply."""
    from gam_triton.reference import channel_shuffle

    return x1 * channel_shuffle(torch.sigmoid(bn(y2)), 4)


def component_args(kind: str, shape: Shape, dtype: torch.dtype, device: str, seed: int = 0) -> tuple:
    """The eager function's arguments: (x, W1, b1, W2, b2) as nn.Linear makes them, or (x1, y2, BN2 in eval)."""
    gen = torch.Generator().manual_seed(seed)
    c, cr, size = shape.channels, shape.hidden, (shape.batch, shape.channels, shape.height, shape.width)
    rand = lambda: torch.randn(size, generator=gen).to(device, dtype)  # noqa: E731
    if kind == "channel_gate":
        lin1, lin2 = torch.nn.Linear(c, cr), torch.nn.Linear(cr, c)
        # requires_grad as in a model: PyTorch's matmul picks its kernels by it
        return (rand(), *(t.detach().to(device, dtype).requires_grad_() for t in (lin1.weight, lin1.bias,
                                                                                  lin2.weight, lin2.bias)))
    bn = torch.nn.BatchNorm2d(c).eval()
    with torch.no_grad():
        for t, lo, hi in ((bn.weight, 0.5, 1.5), (bn.bias, -0.5, 0.5), (bn.running_mean, -0.5, 0.5),
                          (bn.running_var, 0.5, 1.5)):
            t.uniform_(lo, hi, generator=gen)
    return rand(), rand(), bn.to(device, dtype)


def component_work(kind: str, shape: Shape, dtype: torch.dtype) -> tuple[int, int]:
    """(bytes, FLOPs): channel gate reads x and the weights, writes x1, 4*N*C*C/r FLOPs; final gate reads x1, y2
    and an fp32 scale and shift, writes out, about 5 FLOPs per element."""
    c, cr, e = shape.channels, shape.hidden, _elt(dtype)
    if kind == "channel_gate":
        return 2 * shape.numel * e + (2 * c * cr + c + cr) * e, 4 * shape.batch * shape.pixels * c * cr
    return 3 * shape.numel * e + 8 * c, 5 * shape.numel


def component_case(kind: str):
    def build(shape: Shape, dtype: torch.dtype, mode: str, provider: str, device: str) -> Case:
        from gam_triton.ops.channel_gate import channel_gate
        from gam_triton.ops.elementwise import final_gate
        from gam_triton.reference import bn_scale_shift

        args = component_args(kind, shape, dtype, device)
        eager = channel_gate_eager if kind == "channel_gate" else final_gate_eager
        if provider == "gam_triton" and kind == "channel_gate":
            fn = lambda *a: channel_gate(*a, False, out_channels_last=False)  # noqa: E731
        elif provider == "gam_triton":  # BN2 folded outside the timed call: the kernel alone against its roofline
            with torch.no_grad():
                args = (*args[:2], *bn_scale_shift(args[2], args[1]))
            fn = lambda x1, y2, s, t: final_gate(x1, y2, s, t, 4, out_channels_last=False)  # noqa: E731
        else:
            fn = BLOCK[provider](eager)
        return Case(lambda: fn(*args), *component_work(kind, shape, dtype))
    return build


def kernel_case(kind: str, shape: Shape, dtype: torch.dtype, mode: str, provider: str, device: str) -> Case:
    """One kernel of the block alone, as the block launches it (issue 22), from the ops' own functions and op
    objects; its bytes are counted at the launch seam by ``perf/traffic.py``, its floor is bytes / copy bandwidth
    (convolutions: FLOPs / the matmul rate where higher)."""
    import traffic
    from gam_triton.module import x1_channels_last
    from gam_triton.ops import _runtime, batchnorm, channel_gate, conv

    torch.manual_seed(0)
    b, c, cr, h, w, g = shape.batch, shape.channels, shape.hidden, shape.height, shape.width, shape.groups
    fmt = torch.channels_last if x1_channels_last(False, device != "cpu", dtype) else torch.contiguous_format
    t4 = lambda ch: torch.randn(b, ch, h, w, device=device, dtype=dtype).contiguous(memory_format=fmt)  # noqa: E731
    vec = lambda ch, lo=0.5: torch.rand(ch, device=device, dtype=torch.float32) + lo  # noqa: E731
    flops = 0
    if kind.startswith("bn"):
        ch = cr if kind.startswith("bn1") else c
        y, gy, x1 = t4(ch), t4(ch), t4(ch)
        counts = torch.zeros(batchnorm.counter_slots(ch), dtype=torch.int32, device=device)
        running = (vec(ch, 0.0).to(dtype), vec(ch).to(dtype), torch.zeros((), dtype=torch.long, device=device))
        weight, bias = vec(ch).to(dtype), vec(ch, -0.5).to(dtype)
        st = batchnorm.stats(y, weight, bias, running, 1e-3, 0.03, False, counts)
        mode_ = 0 if kind.startswith("bn1") else 1
        cfg = batchnorm.heuristic(ch, b * h * w, fmt == torch.channels_last, shuffled=mode_ == 1)
        coef, dwb = torch.empty(2, ch, device=device), (torch.empty_like(weight), torch.empty_like(bias))
        if kind.endswith("stats"):
            step = lambda: batchnorm.stats(y, weight, bias, running, 1e-3, 0.03, True, counts)  # noqa: E731
        else:
            args = batchnorm.reduce_launch_args(mode_, gy, None if mode_ == 0 else x1, y, st, coef, *dwb,
                                                4 if mode_ else 0, counts, cfg)
            step = lambda: _runtime.launch(*args)  # noqa: E731
    elif kind == "channel_gate_bwd":
        x, ga, gb = t4(c), t4(c), t4(c)
        w1, b1 = torch.randn(cr, c, device=device, dtype=dtype) / c**0.5, torch.randn(cr, device=device, dtype=dtype)
        w2, b2 = torch.randn(c, cr, device=device, dtype=dtype) / cr**0.5, torch.randn(c, device=device, dtype=dtype)
        n, prec = b * h * w, _runtime.dot_precision(dtype)
        out = (torch.empty_like(x), torch.empty(n, c + cr, dtype=dtype, device=device),
               torch.empty(n, cr, dtype=dtype, device=device), torch.zeros(1, dtype=torch.int32, device=device),
               torch.empty_like(b1), torch.empty_like(b2))
        cfg = channel_gate.bwd_heuristic(c, cr, h * w, dtype, x_dtype=dtype)
        args = channel_gate.bwd_launch_args(x, ga, gb, w1, b1, w2, b2, False, *out, cfg, prec)
        step = lambda: _runtime.launch(*args)  # noqa: E731
    else:  # conv1: relu(conv(x1) + b) as conv_bn_relu runs it; conv2: x1 * shuffle(sigmoid(BN2(conv(z1))))
        cin, cout = (c, cr) if kind == "conv1" else (cr, c)
        xin, x1 = t4(cin), t4(c)
        wp = conv.pack_weight(torch.randn(cout, cin // g, 7, 7, device=device, dtype=dtype) / (cin // g * 49)**0.5)
        bias = torch.randn(cout, device=device, dtype=dtype)
        flops = 2 * b * h * w * cout * (cin // g) * 49
        scale, shift = vec(c), vec(c, -0.5)
        if kind == "conv1":
            step = lambda: conv.run_conv1(xin, wp, bias)  # noqa: E731
        else:
            step = lambda: conv.run_conv2(xin, wp, bias, scale, shift, x1, 4, False)  # noqa: E731
    with torch.no_grad():
        step()  # the first call tunes where the op tunes; then the launch's bytes are counted at the seam
        nbytes = traffic.count(step).bytes
    return Case(step, nbytes, flops)


KERNELS = ("bn2_stats", "bn1_bwd_reduce", "bn2_bwd_reduce", "channel_gate_bwd", "conv1", "conv2")


Kind = NamedTuple("Kind", [("build", Callable), ("providers", tuple), ("modes", tuple)])
FWD = ("forward",)


KINDS = {"gam": Kind(gam_case, tuple(BLOCK), MODES),
         "channel_gate": Kind(component_case("channel_gate"), ("eager", "compile", "gam_triton"), FWD),
         "final_gate": Kind(component_case("final_gate"), ("eager", "compile", "gam_triton"), FWD),
         **{k: Kind(lambda *a, k=k: kernel_case(k, *a), ("gam_triton",), FWD) for k in KERNELS},
         "model": Kind(lambda *a: importlib.import_module("model").case(*a), ("eager", "gam_triton", "no_gam"), MODES)}
PROVIDERS = tuple(dict.fromkeys(p for k in KINDS.values() for p in k.providers))


# --- the plan ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Spec:
    kind: str
    shape: Shape
    dtype: str
    mode: str
    provider: str

    def fields(self, mach: Machine) -> dict:
        s = self.shape
        d = dict(device=mach.device, torch=mach.torch, triton=mach.triton, dtype=self.dtype, mode=self.mode,
                 kind=self.kind, batch=s.batch, channels=s.channels, height=s.height, width=s.width, rate=s.rate,
                 group=str(s.group) if self.kind in ("gam", *KERNELS) else "", provider=self.provider)
        return dict(d, channels=3, rate="") if self.kind == "model" else d

    def label(self) -> str:
        return f"{self.dtype} {self.mode:<7} {self.kind:<16} {self.shape.label():<20} {self.provider:<20}"


def plan(args, on_gpu: bool) -> list[Spec]:
    """Every row to measure, the providers of one shape together, the most valuable first. GPU: every YOLO shape at
    B1/16/32 (``--quick``: the kernels alone, then the headline shapes at B16, the components and the detector),
    bf16, fp16, fp32. CPU: the quick CPU sweep (fp32, two small shapes). ``--rehearse``: every kind, tiny."""
    quick = args.quick or args.rehearse or not on_gpu
    pairs, batches, kernel_pairs, model_at = (((16, 4),), (2,), ((16, 4),), (2, 32)) if args.rehearse else (
        (QUICK_CPU_PAIRS, (2,), (), None) if not on_gpu else (HEADLINE_PAIRS, (16,), KERNEL_SHAPES, (16, 640))
        if quick else (yolo_pairs(), FULL_BATCHES, (), None))
    if args.channels or args.sizes:
        if not (args.channels and args.sizes):
            raise SystemExit("perf/bench.py: error: --channels and --sizes go together")
        pairs = kernel_pairs = [(c, s) for s in args.sizes for c in args.channels]
    batches = args.batches or batches
    dtypes = args.dtypes or (["bf16", "fp16", "fp32"] if on_gpu else ["fp32"])
    # the rehearsal leaves out the convolutions alone (interpreted, seconds a call; tests/test_perf.py runs them)
    alone = [k for k in KERNELS if not (args.rehearse and k.startswith("conv"))] + ["model"]
    kinds = args.kinds or (["gam", *alone[-1:], "channel_gate", "final_gate", *alone[:-1]] if args.rehearse or (
        on_gpu and quick) else ["gam", "channel_gate", "final_gate"])  # the kernels alone go first all the same
    group = args.group or ("grouped" if on_gpu and quick and not args.rehearse else "both")  # a lease: the YOLO form
    groups = {"both": (True, False), "grouped": (True,), "plain": (False,)}[group]
    try:
        shapes = [Shape(b, c, s, s, 4, g) for c, s in pairs for b in batches for g in groups]
        kshapes = [Shape(batches[-1], c, s, s, 4, True) for c, s in kernel_pairs]
    except ValueError as e:
        raise SystemExit(f"perf/bench.py: error: {e}") from None

    def providers(kind: str, mode: str) -> list[str]:
        have = [p for p in KINDS[kind].providers if not (mode == "train" and p in EVAL_ONLY)]
        if args.providers:
            return [p for p in have if p in args.providers]
        if args.rehearse:  # Inductor and the interpreted convolutions would take the rehearsal's minute
            have = [p for p in have if not p.startswith("compile") and p not in EVAL_ONLY]
        elif not on_gpu:  # the interpreter's Triton convolutions mean nothing on a CPU
            have = [p for p in have if p not in EVAL_ONLY]
        full_eval = on_gpu and not quick and kind == "gam" and mode == "forward"
        return [p for p in have if p != "compile-max-autotune" or full_eval]

    specs = []
    for i, dtype in enumerate(dtypes):
        for kind in kinds:
            if kind in KERNELS and i == 0:
                specs += [Spec(kind, s, dtype, "forward", "gam_triton") for s in kshapes]
        for kind in kinds:
            for mode in [m for m in args.modes if m in KINDS[kind].modes]:
                if kind == "model" and model_at and i == 0:
                    shape = Shape(model_at[0], 16, model_at[1], model_at[1])
                    specs += [Spec(kind, shape, dtype, mode, p) for p in providers(kind, mode)]
                elif kind in ("gam", "channel_gate", "final_gate"):
                    kshapes_ = shapes if kind == "gam" else list(dict.fromkeys(
                        Shape(s.batch, s.channels, s.height, s.width, 4, False) for s in shapes))
                    specs += [Spec(kind, s, dtype, mode, p) for s in kshapes_ for p in providers(kind, mode)]
    return specs


# --- measuring the providers of one shape --------------------------------------------------------------------
def fill_row(row: dict, provider: str, case: Case, res: Interleaved, copy_gbps: float, mm_tflops: float) -> None:
    """A row's timing columns from one provider of an interleaved measurement."""
    t = res.timings[provider]
    sec = t.ms * 1e-3
    row.update(ms=t.ms, ms_p20=t.ms_p20, ms_p80=t.ms_p80, reps=t.reps, rounds=len(res.rounds[provider]))
    if case.bytes:
        row.update(gbps=case.bytes / sec / 1e9, tflops=case.flops / sec / 1e12)
        if row.get("kind") != "gam" and copy_gbps > 0:
            flop_floor = case.flops / (mm_tflops * 1e12) if row["kind"] in KERNELS and mm_tflops > 0 else 0
            floor = max(case.bytes / (copy_gbps * 1e9), flop_floor)
            row["roofline_frac"] = floor / sec
    mine, eager = res.rounds[provider], res.rounds.get("eager") if provider != "eager" else None
    if eager:
        row.update(zip(("vs_eager", "vs_eager_p20", "vs_eager_p80"), ratio_stats(eager, mine)))
    if "compile" in res.rounds and provider != "compile":
        row["vs_compile"] = ratio_stats(res.rounds["compile"], mine)[0]
    sp = row["spread"] = spread([e / m for e, m in zip(eager, mine) if m > 0] if eager else mine)
    row["noisy"] = "" if sp != sp else str(bool(sp > NOISY_SPREAD))


def measure_group(specs: Sequence[Spec], mach: Machine, ceils: tuple, budget_s: float,
                  rounds: int = ROUNDS) -> list[dict]:
    """Build every provider of one shape, run each once untimed (``compile_s``), time them in interleaved rounds,
    return their rows (``specs`` order); a provider that fails gets its ``error`` and the others go on."""
    import torch._dynamo

    device = "cuda" if mach.is_gpu else "cpu"
    rows = {s.provider: dict(s.fields(mach), note=mach.note, date=mach.date, copy_gbps=ceils[0]) for s in specs}
    cases: dict = {}
    torch._dynamo.reset()  # once per shape: each shape compiles afresh, its providers stay compiled while timed
    try:
        with torch.no_grad() if specs[0].mode == "forward" else contextlib.nullcontext():
            for s in specs:
                try:
                    case = KINDS[s.kind].build(s.shape, DTYPES[s.dtype], s.mode, s.provider, device)
                    t0 = time.perf_counter()
                    case.step()  # the first call (compilation, JIT, tuning), kept out of the timings
                    torch.cuda.synchronize() if mach.is_gpu else None
                    rows[s.provider]["compile_s"] = time.perf_counter() - t0
                    cases[s.provider] = case
                except Exception as e:  # one provider failing (compile error, OOM) must not stop the others
                    rows[s.provider]["error"] = " ".join(f"{type(e).__name__}: {e}".split())[:300]
            if cases:
                res = bench_interleaved({p: (c.step, c.grads) for p, c in cases.items()}, mach.is_gpu, budget_s,
                                        rounds=rounds)
                for p, case in cases.items():
                    fill_row(rows[p], p, case, res, *ceils)
                    if mach.is_gpu:
                        rows[p]["peak_mem_mb"] = peak_memory_mb(case.step, case.grads)
    except Exception as e:
        for p in cases:
            rows[p].setdefault("error", " ".join(f"{type(e).__name__}: {e}".split())[:300])
    finally:
        cases.clear()
        gc.collect()
        if mach.is_gpu:
            torch.cuda.empty_cache()
    return [rows[s.provider] for s in specs]


def row_key(row: dict) -> tuple:
    return tuple(str(row.get(c, "")) for c in KEY_COLUMNS)


def done_keys(path: str) -> set:
    """Keys of the rows already measured in ``path`` (failed rows are measured again)."""
    with open(path, newline="") if os.path.exists(path) else contextlib.nullcontext([]) as f:
        return {row_key(r) for r in (csv.DictReader(f) if f else []) if not r.get("error")}


def write_row(path: str, row: dict) -> None:
    """Append one row (the header first in a new file), flushed: an interrupted run keeps it."""
    fresh = not os.path.exists(path) or os.path.getsize(path) == 0
    fmt = lambda v: ("" if v != v else f"{v:.6g}") if isinstance(v, float) else "" if v is None else str(v)  # noqa
    with open(path, "a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS)
        w.writeheader() if fresh else None
        w.writerow({c: fmt(row.get(c)) for c in COLUMNS})


# --- the run -----------------------------------------------------------------------------------------------
def _arg(kind):
    """An argparse type: comma-separated ints >= 1 (``int``), seconds > 0 (``float``), or names from a list."""
    def parse(text: str):
        try:
            values = [kind(t) if kind in (int, float) else t for t in text.replace(" ", "").split(",") if t]
        except ValueError:
            values = []
        bad = [v for v in values if (v not in kind if isinstance(kind, (list, tuple)) else v <= 0)]
        if bad or not values or (kind is float and len(values) > 1):
            want = f"names from {', '.join(kind)}" if isinstance(kind, (list, tuple)) else f"{kind.__name__} > 0"
            raise argparse.ArgumentTypeError(f"expected {want}, got {text!r}")
        return values[0] if kind is float else list(dict.fromkeys(values))
    return parse


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="perf/bench.py", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="GPU: the headline shapes and the kernels alone")
    p.add_argument("--rehearse", action="store_true", help="every kind on tiny shapes on the CPU (not figures)")
    p.add_argument("--budget", type=_arg(float), help="start no new shape after this many seconds (skipped: listed)")
    p.add_argument("--out", help="output folder (default perf/results/<gpu name>/ or perf/results/cpu/)")
    p.add_argument("--dtypes", type=_arg(list(DTYPES)))
    p.add_argument("--modes", type=_arg(MODES), default=list(MODES))
    p.add_argument("--kinds", type=_arg(list(KINDS)))
    p.add_argument("--providers", type=_arg(PROVIDERS))
    p.add_argument("--batches", type=_arg(int))
    p.add_argument("--channels", type=_arg(int), help="channel widths (with --sizes)")
    p.add_argument("--sizes", type=_arg(int), help="square map sizes (with --channels)")
    p.add_argument("--group", choices=["both", "grouped", "plain"], help="default: grouped for --quick on a GPU")
    p.add_argument("--budget-s", type=_arg(float), default=0.5, help="CPU: seconds of calls per provider and shape")
    p.add_argument("--no-plot", action="store_true", help="the CSV only (no PNGs, no summary.md)")
    return p


def _line(row: dict) -> str:
    if row.get("error"):
        return f"FAILED  {row['error'][:120]}"
    vs = f"  x{row['vs_eager']:.2f} vs eager ({row['vs_eager_p20']:.2f}-{row['vs_eager_p80']:.2f})" \
        if row.get("vs_eager", math.nan) == row.get("vs_eager", math.nan) and "vs_eager" in row else ""
    floor = f"  {row['roofline_frac']:.0%} of its floor" if "roofline_frac" in row else ""
    return f"{row['ms']:9.3f} ms{vs}{floor}{'  NOISY' * (row.get('noisy') == 'True')}  (first {row['compile_s']:.1f} s)"


def run(argv: Optional[Sequence[str]] = None) -> str:
    """Measure what the arguments plan; return the path of results.csv."""
    args = parser().parse_args(argv)
    start = time.monotonic()
    mach = machine(args.rehearse)
    torch.backends.cudnn.benchmark = mach.is_gpu  # as the YOLO trainers run; the same for every provider
    if not mach.is_gpu:  # no background compile workers competing with the timed calls
        importlib.import_module("torch._inductor.config").compile_threads = 1
    out = args.out or mach.results_dir
    path = os.path.join(out, "results.csv")
    specs = plan(args, mach.is_gpu)
    done = done_keys(path)
    todo = {row_key(s.fields(mach)) for s in specs} - done
    print(f"perf/bench.py on {mach.device} | torch {mach.torch} | triton {mach.triton} | {mach.date}\nNOTE: "
          f"{mach.note or '-'}.\n{len(specs)} rows planned, {len(specs) - len(todo)} in {path}, {len(todo)} to measure")
    groups: dict = {}
    for s in specs:  # a shape with a row to measure is timed with all its providers (the ratios' references)
        groups.setdefault((s.kind, s.shape, s.dtype, s.mode), []).append(s)
    groups = {k: g for k, g in groups.items() if any(row_key(s.fields(mach)) in todo for s in g)}
    os.makedirs(out, exist_ok=True)
    ceils = ceilings(mach.is_gpu, DTYPES[specs[0].dtype]) if groups else (math.nan, math.nan)
    print(f"copy bandwidth {ceils[0]:.1f} GB/s, matmul {ceils[1]:.1f} TFLOP/s; providers of a shape are timed "
          f"in interleaved rounds, 'vs eager' is the median of the per-round ratios (p20-p80)")
    skipped, costs, n = [], {}, 0
    env = dict(mach.__dict__, argv=list(sys.argv[1:] if argv is None else argv), python=platform.python_version(),
               copy_gbps=ceils[0], matmul_tflops=ceils[1], skipped_for_budget=skipped, threads=torch.get_num_threads(),
               cudnn=torch.backends.cudnn.version() if mach.is_gpu else None)
    write_env = lambda: json.dump(env, open(os.path.join(out, "env.json"), "w"), indent=2)  # noqa: E731, SIM115
    write_env()  # now, and again at the end: a run stopped by a timeout keeps it
    for key, group in groups.items():
        if args.budget and time.monotonic() - start + costs.get(key[0], 0.0) > args.budget:  # the kind's worst so far
            skipped += [s.label().strip() for s in group]
            continue
        t0 = time.monotonic()
        for spec, row in zip(group, measure_group(group, mach, ceils, args.budget_s,
                                                  1 if args.rehearse else ROUNDS)):
            if row_key(row) in todo:
                write_row(path, row)
                n += 1
                print(f"[{n}/{len(todo)}] {spec.label()} {_line(row)}  [{time.monotonic() - start:.0f} s]", flush=True)
        costs[key[0]] = max(costs.get(key[0], 0.0), time.monotonic() - t0)
    write_env()
    if skipped:
        print(f"{len(skipped)} row(s) skipped: the --budget of {args.budget:.0f} s ran out (listed in env.json)")
    if not args.no_plot and os.path.exists(path):
        import report

        report.main([out])
    return path


if __name__ == "__main__":
    run()
