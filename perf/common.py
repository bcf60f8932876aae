"""Shared pieces of the perf scripts: the machine, the shapes, the timers and the bytes / FLOPs models.

* :func:`machine` - where the sweep runs (GPU name or "cpu"), the library versions, the date, and the
  default results folder (``perf/results/<gpu name>/``, ``perf/results/cpu/`` without a GPU).
* :class:`Shape` and the shape lists: the YOLO channel widths at the 80/40/20 maps of a 640 input
  (``shared/GAM_NOTES.md``), batch 1/16/32, rate 4, grouped and plain; a quick subset for GPUs and a
  few tiny shapes for CPUs.
* :func:`bench` - median, p20 and p80 of one call in ms: ``triton.testing.do_bench`` on a GPU,
  wall-clock ``time.perf_counter`` medians on the CPU.
* :func:`bench_interleaved` - the providers of one shape timed in rounds, each round taking every
  provider in turn (what the sweep uses): per-round ratios (:func:`ratio_stats`) cancel a busy
  neighbour that slows a whole round; :func:`spread` says how far the rounds disagree.
* :func:`copy_bandwidth_gbps` - a device-to-device (or RAM-to-RAM) copy, bytes read + written per
  second: the ceiling each component's ``roofline_frac`` is measured against.
* :func:`gam_flops`, :func:`gam_bytes` - FLOPs and compulsory bytes of one GAM block call.

Nothing here writes files.
"""
from __future__ import annotations

import datetime as _dt
import math
import os
import platform
import re
import subprocess
import time
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch

PERF_DIR = os.path.dirname(os.path.abspath(__file__))
REPO_DIR = os.path.dirname(PERF_DIR)

#: Dtype names accepted on the command line.
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
MODES = ("forward", "train")
KINDS = ("gam", "channel_gate", "final_gate")
PROVIDERS = ("eager", "compile", "compile-max-autotune", "gam_triton", "gam_triton-tconv")
#: Providers that exist for the whole block in eval (forward) mode only: ``gam_triton-tconv`` is gam_triton
#: with the spatial branch forced onto the Triton convolutions (GAM_TRITON_CONV=triton), an eval-only path.
#: Not in the CPU sweep's defaults (there it would run the interpreter, whose timings mean nothing).
EVAL_ONLY_PROVIDERS = ("gam_triton-tconv",)

CPU_NOTE = "CPU figures, not GPU performance"
INTERPRET_NOTE = "TRITON_INTERPRET=1: gam_triton ran in Triton's interpreter; not performance figures"

#: Bandwidth ceilings of the target GPUs (device-to-device copy, GAM_NOTES.md), in bytes per second.
GPU_BANDWIDTH = {"H100": 3.0e12, "H200": 4.3e12}


# --- the machine -----------------------------------------------------------------------------------------
def sanitize(name: str) -> str:
    """A folder-safe form of a device name: 'NVIDIA H100 80GB HBM3' -> 'NVIDIA-H100-80GB-HBM3'."""
    return re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-") or "unknown"


def interpreting() -> bool:
    """True when Triton's interpreter is on (gam_triton's kernels then run on the CPU, slowly)."""
    from gam_triton.ops._runtime import INTERPRET

    return INTERPRET


def _triton_version() -> str:
    try:
        import triton
    except ImportError:
        return "none"
    return triton.__version__


def _git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO_DIR, capture_output=True,
                             text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return ""
    return out.stdout.strip() if out.returncode == 0 else ""


@dataclass(frozen=True)
class Machine:
    """Where a sweep runs: ``device`` is the GPU's name or "cpu"."""

    device: str
    is_gpu: bool
    torch: str
    triton: str
    python: str
    date: str
    commit: str
    note: str

    @property
    def results_dir(self) -> str:
        return os.path.join(PERF_DIR, "results", sanitize(self.device) if self.is_gpu else "cpu")

    def as_dict(self) -> dict:
        d = dict(self.__dict__)
        if self.is_gpu:
            d["cuda"] = torch.version.cuda
            d["cudnn"] = torch.backends.cudnn.version()
            d["cudnn_benchmark"] = torch.backends.cudnn.benchmark
            try:  # raises once the new fp32_precision API has been used (torch >= 2.9)
                d["cudnn_allow_tf32"] = torch.backends.cudnn.allow_tf32
            except RuntimeError:
                d["cudnn_allow_tf32"] = getattr(torch.backends.cudnn, "fp32_precision", None)
            from gam_triton.ops._runtime import fp32_matmul_allows_tf32

            d["matmul_allow_tf32"] = fp32_matmul_allows_tf32()
        else:
            d["cpu"] = platform.processor() or platform.machine()
            d["threads"] = torch.get_num_threads()
        return d


def machine() -> Machine:
    """Describe this machine: the first CUDA GPU if there is one, else the CPU."""
    is_gpu = torch.cuda.is_available()
    notes = []
    if not is_gpu:
        notes.append(CPU_NOTE)
    if interpreting():
        notes.append(INTERPRET_NOTE)
    return Machine(
        device=torch.cuda.get_device_name(0) if is_gpu else "cpu",
        is_gpu=is_gpu,
        torch=torch.__version__,
        triton=_triton_version(),
        python=platform.python_version(),
        date=_dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        commit=_git_commit(),
        note="; ".join(notes),
    )


# --- shapes ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Shape:
    """One GAM input: batch x channels x height x width, reduction rate, grouped convolutions or not."""

    batch: int
    channels: int
    height: int
    width: int
    rate: int = 4
    group: bool = True

    def __post_init__(self) -> None:
        for name in ("batch", "channels", "height", "width", "rate"):
            if getattr(self, name) < 1:
                raise ValueError(f"Shape: {name} must be >= 1, got {getattr(self, name)}")
        if self.channels // self.rate < 1:
            raise ValueError(f"Shape: channels // rate is 0 (channels={self.channels}, rate={self.rate})")
        if self.channels % 4:
            raise ValueError(f"Shape: the YOLO form shuffles in 4 groups: channels ({self.channels}) must "
                             "be divisible by 4")
        if self.group and (self.channels % self.rate or self.hidden % self.rate):
            raise ValueError(f"Shape: grouped convolutions need channels ({self.channels}) and channels // "
                             f"rate ({self.hidden}) divisible by rate ({self.rate})")

    @property
    def hidden(self) -> int:
        return self.channels // self.rate

    @property
    def groups(self) -> int:
        return self.rate if self.group else 1

    @property
    def pixels(self) -> int:
        return self.height * self.width

    @property
    def numel(self) -> int:
        return self.batch * self.channels * self.pixels

    def label(self) -> str:
        g = " g" if self.group else " p"
        return f"B{self.batch} C{self.channels} {self.height}x{self.width}{g}"


#: (channels, map size) of the YOLO models at a 640 input: P3 80x80, P4 40x40, P5 20x20 (GAM_NOTES.md:
#: YOLOv5 s/l, YOLOv8 n/s/m/l/x).
YOLO_CHANNELS_AT = {
    80: (64, 128, 192, 256, 320),
    40: (128, 256, 384, 512, 640),
    20: (256, 512, 576, 640, 1024),
}
FULL_BATCHES = (1, 16, 32)
QUICK_GPU_PAIRS = ((128, 80), (256, 40), (512, 20))
QUICK_GPU_BATCHES = (1, 16)
QUICK_CPU_PAIRS = ((64, 40), (128, 20))
QUICK_CPU_BATCHES = (2,)


def shapes_from(pairs: Sequence[tuple[int, int]], batches: Sequence[int], rate: int = 4,
                groups: Sequence[bool] = (True, False)) -> list[Shape]:
    """Every (channels, size) pair at every batch, grouped and plain (square maps)."""
    return [Shape(b, c, s, s, rate, g) for c, s in pairs for b in batches for g in groups]


def yolo_pairs() -> list[tuple[int, int]]:
    return [(c, s) for s, cs in YOLO_CHANNELS_AT.items() for c in cs]


# --- timing ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Timing:
    ms: float
    ms_p20: float
    ms_p80: float
    reps: int


def _quantile(sorted_values: Sequence[float], q: float) -> float:
    """Linear-interpolated quantile of sorted values (numpy's default)."""
    pos = (len(sorted_values) - 1) * q
    lo, hi = math.floor(pos), math.ceil(pos)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo)


def _clear_grads(tensors: Sequence[torch.Tensor]) -> None:
    for t in tensors:
        t.grad = None


def bench(fn: Callable[[], object], on_gpu: bool, grads_to_none: Sequence[torch.Tensor] = (),
          budget_s: float = 0.5, min_reps: int = 3, max_reps: int = 200) -> Timing:
    """Median, p20, p80 (ms) of ``fn()`` after warm-up; the caller has already run it once (compiled).

    GPU: ``triton.testing.do_bench`` (25 ms warm-up, 100 ms of repetitions, L2 flushed between calls).
    CPU: wall-clock per call, 2 warm-up calls, then calls until ``budget_s`` is spent (at least
    ``min_reps``, at most ``max_reps``). ``grads_to_none`` get ``.grad = None`` before every call.
    """
    if on_gpu:
        from triton.testing import do_bench

        med, p20, p80 = do_bench(fn, warmup=25, rep=100, grad_to_none=list(grads_to_none) or None,
                                 quantiles=[0.5, 0.2, 0.8])
        return Timing(med, p20, p80, max(1, int(100 / max(med, 1e-6))))
    for _ in range(2):
        _clear_grads(grads_to_none)
        fn()
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < max_reps and (len(times) < min_reps or time.perf_counter() - start < budget_s):
        _clear_grads(grads_to_none)
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    times.sort()
    return Timing(_quantile(times, 0.5), _quantile(times, 0.2), _quantile(times, 0.8), len(times))


#: Rounds of an interleaved measurement (CPU: fewer when the calls are slow, never under MIN_ROUNDS).
ROUNDS = 5
MIN_ROUNDS = 3
GPU_ROUNDS = 3
#: A row whose p80 / p20 across rounds (of its ratio to eager; of its time for eager) exceeds this is
#: flagged ``noisy``: its figure is not known to better than about +-20 %.
NOISY_SPREAD = 1.5


@dataclass(frozen=True)
class Interleaved:
    """What :func:`bench_interleaved` measured: per provider its :class:`Timing` over every call and the
    median time of each round (``rounds[name][r]``, ms), round r of every provider taken back to back."""

    timings: dict
    rounds: dict


def bench_interleaved(fns: dict, on_gpu: bool, budget_s: float = 0.5, max_reps: int = 200) -> Interleaved:
    """Time several callables of one shape in rounds: every round times each of them in turn (the order
    rotates from round to round), so a busy neighbour that slows one round slows every provider in it and
    per-round ratios stay readable.

    ``fns`` maps a name to ``(fn, grads_to_none)``; each ``fn`` has already run once (compiled).
    CPU: one warm-up call each (its time is the first estimate), then ``ROUNDS`` rounds (fewer, down to
    ``MIN_ROUNDS``, when the calls are too slow for ``budget_s`` seconds per callable); in each round every
    callable runs for the same wall-clock slot of ``budget_s / rounds`` seconds (at least one call), timed
    call by call with ``time.perf_counter``: a slowed provider makes fewer calls, not a longer slot, so a
    busy stretch longer than a round falls on every provider alike. Timing: median / p20 / p80 over all its
    calls.
    GPU: ``GPU_ROUNDS`` rounds of ``triton.testing.do_bench`` (25 ms warm-up in the first round, 5 ms later,
    100 / rounds ms of repetitions, L2 flushed between calls); Timing: the medians over rounds of the
    rounds' median, p20 and p80.
    """
    names = list(fns)
    per_round: dict = {n: [] for n in names}
    if on_gpu:
        from triton.testing import do_bench

        q20: dict = {n: [] for n in names}
        q80: dict = {n: [] for n in names}
        reps = {n: 0 for n in names}
        rep_ms = max(10, 100 // GPU_ROUNDS)
        for r in range(GPU_ROUNDS):
            for n in names[r % len(names):] + names[:r % len(names)]:
                fn, grads = fns[n]
                med, p20, p80 = do_bench(fn, warmup=25 if r == 0 else 5, rep=rep_ms,
                                         grad_to_none=list(grads) or None, quantiles=[0.5, 0.2, 0.8])
                per_round[n].append(med)
                q20[n].append(p20)
                q80[n].append(p80)
                reps[n] += max(1, int(rep_ms / max(med, 1e-6)))
        timings = {n: Timing(_median(per_round[n]), _median(q20[n]), _median(q80[n]), reps[n]) for n in names}
        return Interleaved(timings, per_round)

    est = {}
    for n in names:
        fn, grads = fns[n]
        _clear_grads(grads)
        t0 = time.perf_counter()
        fn()
        est[n] = time.perf_counter() - t0
    rounds = ROUNDS
    one_round = sum(est.values())
    if one_round * rounds > budget_s * len(names):
        rounds = max(MIN_ROUNDS, int(budget_s * len(names) / max(one_round, 1e-9)))
    slot = budget_s / rounds
    cap = max(1, max_reps // rounds)
    times: dict = {n: [] for n in names}
    for r in range(rounds):
        for n in names[r % len(names):] + names[:r % len(names)]:
            fn, grads = fns[n]
            ts = []
            slot_start = time.perf_counter()
            while not ts or (len(ts) < cap and time.perf_counter() - slot_start < slot):
                _clear_grads(grads)
                t0 = time.perf_counter()
                fn()
                ts.append((time.perf_counter() - t0) * 1e3)
            times[n] += ts
            per_round[n].append(_median(ts))
    timings = {}
    for n in names:
        t = sorted(times[n])
        timings[n] = Timing(_quantile(t, 0.5), _quantile(t, 0.2), _quantile(t, 0.8), len(t))
    return Interleaved(timings, per_round)


def _median(values: Sequence[float]) -> float:
    return _quantile(sorted(values), 0.5)


def ratio_stats(base_rounds: Sequence[float], rounds: Sequence[float]) -> tuple[float, float, float]:
    """Median, p20 and p80 of the per-round ratios ``base / provider`` (speedup over ``base``)."""
    ratios = sorted(b / p for b, p in zip(base_rounds, rounds) if p > 0)
    if not ratios:
        nan = float("nan")
        return nan, nan, nan
    return _quantile(ratios, 0.5), _quantile(ratios, 0.2), _quantile(ratios, 0.8)


def spread(values: Sequence[float]) -> float:
    """p80 / p20 of per-round values (ratios or times): 1.0 when every round agrees."""
    v = sorted(x for x in values if x == x and x > 0)
    if len(v) < 2:
        return float("nan")
    return _quantile(v, 0.8) / _quantile(v, 0.2)


def timed_first_call(fn: Callable[[], object], on_gpu: bool) -> float:
    """Seconds of the first call (compilation, JIT, autotuning, caches): kept out of the timings."""
    if on_gpu:
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    if on_gpu:
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def peak_memory_mb(fn: Callable[[], object], grads_to_none: Sequence[torch.Tensor] = ()) -> float:
    """GPU memory one call allocates beyond what was allocated before it (activations, workspaces)."""
    _clear_grads(grads_to_none)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def rotation_count(working_set_bytes: int, on_gpu: bool, cap: int = 16) -> int:
    """How many input sets to cycle through so that consecutive calls do not find their inputs in L2.

    GPU: enough sets to cover twice the L2 cache when one set is smaller than that (at most ``cap``);
    ``do_bench`` also flushes L2 between calls, so this is a second guard. CPU: 1.
    """
    if not on_gpu or working_set_bytes <= 0:
        return 1
    l2 = getattr(torch.cuda.get_device_properties(0), "L2_cache_size", 50 * 2**20) or 50 * 2**20
    if working_set_bytes >= 2 * l2:
        return 1
    return max(1, min(cap, math.ceil(2 * l2 / working_set_bytes)))


def copy_bandwidth_gbps(on_gpu: bool, nbytes: Optional[int] = None) -> float:
    """GB/s (1e9 bytes, read + written) of copying a large buffer on this device: the roofline."""
    nbytes = nbytes or (512 * 2**20 if on_gpu else 64 * 2**20)
    device = "cuda" if on_gpu else "cpu"
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    fn = lambda: dst.copy_(src)  # noqa: E731
    timed_first_call(fn, on_gpu)
    t = bench(fn, on_gpu, budget_s=0.3, min_reps=5)
    return 2 * nbytes / (t.ms * 1e-3) / 1e9


# --- FLOPs and bytes of the whole block --------------------------------------------------------------------
def gam_flops(shape: Shape, mode: str, kernel_size: int = 7) -> int:
    """FLOPs of one GAM call: channel MLP + the two 7x7 convolutions (elementwise ops left out).

    Forward = 4*N*C*C/r + 2 * 2*N*(C/r)*(C/g)*k*k with N = B*H*W; train counts 3x forward (forward,
    gradient of the inputs, gradient of the weights), the usual convention.
    """
    n, c, cr, g, kk = shape.batch * shape.pixels, shape.channels, shape.hidden, shape.groups, kernel_size**2
    fwd = 4 * n * c * cr + 2 * (2 * n * cr * (c // g) * kk)
    return fwd * (3 if mode == "train" else 1)


def gam_param_count(shape: Shape, kernel_size: int = 7) -> int:
    c, cr, g, kk = shape.channels, shape.hidden, shape.groups, kernel_size**2
    linear = 2 * c * cr + c + cr
    convs = cr * (c // g) * kk + cr + c * (cr // g) * kk + c
    bns = 4 * cr + 4 * c
    return linear + convs + bns


def gam_bytes(shape: Shape, dtype: torch.dtype, mode: str) -> int:
    """Compulsory bytes of one GAM call: what a single perfect kernel would still move.

    Forward: read x and the parameters, write out. Train: also read the output's gradient, write the
    input's gradient and the parameters' gradients. The same for every provider, so GB/s computed from
    it compares providers; the traffic each one really causes is what ``perf/traffic.py`` counts.
    """
    elt = torch.empty((), dtype=dtype).element_size()
    act = shape.numel * elt
    params = gam_param_count(shape) * elt
    if mode == "train":
        return 4 * act + 2 * params
    return 2 * act + params


def fill_row(row: dict, provider: str, case, res: "Interleaved", copy_gbps: float) -> None:
    """A results row's timing columns from one provider of an interleaved measurement: ms quantiles, GB/s and
    TFLOP/s over the case's bytes and FLOPs, the fraction of the copy bandwidth (components), ratios to eager and
    torch.compile per round, the rounds' spread and the noisy flag."""
    t = res.timings[provider]
    sec = t.ms * 1e-3
    row.update(ms=t.ms, ms_p20=t.ms_p20, ms_p80=t.ms_p80, reps=t.reps, gbps=case.bytes / sec / 1e9,
               tflops=case.flops / sec / 1e12, rounds=len(res.rounds[provider]))
    if row.get("kind") not in ("gam", None) and copy_gbps == copy_gbps and copy_gbps > 0:
        row["roofline_frac"] = row["gbps"] / copy_gbps
    mine = res.rounds[provider]
    if "eager" in res.rounds and provider != "eager":
        med, p20, p80 = ratio_stats(res.rounds["eager"], mine)
        row.update(vs_eager=med, vs_eager_p20=p20, vs_eager_p80=p80)
        row["spread"] = spread([e / m for e, m in zip(res.rounds["eager"], mine) if m > 0])
    else:
        row["spread"] = spread(mine)
    if "compile" in res.rounds and provider != "compile":
        row["vs_compile"] = ratio_stats(res.rounds["compile"], mine)[0]
    sp = row["spread"]
    row["noisy"] = "" if sp != sp else str(bool(sp > NOISY_SPREAD))
