"""Compile report: every Triton kernel compiled ahead of time for sm_80, sm_90 and sm_100, without a GPU.

For each kernel of the registry (:data:`KERNELS`, one entry per kernel), at the sweep's shapes, dtypes and
layouts (plus odd NCHW maps, 7x7 and 14x14), the heuristic config and every autotuner candidate are
compiled with ``triton.compile(ASTSource(...), target=GPUTarget("cuda", cc, 32))`` under the exact argument
specialisation the launch produces: the arguments come from the op's own ``_launch_args`` called on meta
tensors, and are specialised as Triton's JIT does (int args equal to 1 become constexprs, ints divisible by
16 and 16-byte aligned pointers get the divisibility hint). ``ptxas -v`` (the one inside the triton wheel,
run by Triton's own compile step with Triton's flags; its log is captured) gives registers and spill bytes;
Triton's metadata gives the shared memory the launch requests. Resident warps per SM follow from registers,
shared memory and warps against each architecture's limits (:data:`ARCHS`).

Writes ``perf/compile/report.csv`` (one row per case x config x arch) and ``perf/compile/report.md``;
``--write-limits`` also writes the compiled-facts table ``gam_triton/compiled_limits.json`` that prunes the
autotuner's candidates (``gam_triton.configs``). Compile facts, not timings: nothing here runs a kernel.

Cost control: identical specialisations compile once; candidates whose compile differs only by the channel
loop's trip count share one compile (``equiv`` in the registry: the CI test checks a sample against exact
compiles); results are cached per specialisation in ``perf/compile/cache.json`` (keyed by the kernel's
source hash and the Triton version); a process pool of ``--jobs`` workers (default 2) compiles.

Usage: ``python perf/compile_report.py [--quick] [--write-limits] [--jobs 2] [--out perf/compile]``.
``--quick``: heuristics only. ``--subset ci``: the few shapes the CI test compiles.
"""
from __future__ import annotations

import argparse
import csv
import hashlib
import json
import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass, replace
from typing import Callable, Optional

PERF_DIR = os.path.dirname(os.path.abspath(__file__))
REPO_DIR = os.path.dirname(PERF_DIR)
for _p in (REPO_DIR, PERF_DIR):
    if _p not in sys.path:
        sys.path.insert(0, _p)

DEFAULT_OUT = os.path.join(PERF_DIR, "compile")
LIMITS_PATH = os.path.join(REPO_DIR, "gam_triton", "compiled_limits.json")


def _reexec_without_interpreter() -> None:
    """Compiling for a GPU target needs real @triton.jit functions: TRITON_INTERPRET=1 replaces them with
    interpreted ones (and switches gam_triton's heuristics to interpreter tiles), so rerun without it."""
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        env = dict(os.environ)
        env.pop("TRITON_INTERPRET")
        os.execve(sys.executable, [sys.executable, *sys.argv], env)


# --- the architectures ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Arch:
    """Per-SM limits of one compute capability (CUDA programming guide, compute capabilities table)."""

    cc: int
    regs_per_sm: int = 65536
    max_warps: int = 64
    max_blocks: int = 32
    smem_per_sm: int = 233472        # bytes
    smem_per_block: int = 232448     # the most one block may ask for (opt-in)
    smem_reserved: int = 1024        # reserved by the system per resident block

    @property
    def name(self) -> str:
        return f"sm_{self.cc}"

    def warps_per_sm(self, regs: int, smem: int, num_warps: int) -> int:
        """Resident warps per SM: blocks limited by warps, blocks, registers (256 per warp granule) and smem."""
        regs_per_warp = -(-max(regs, 1) * 32 // 256) * 256
        blocks = min(self.max_blocks, self.max_warps // num_warps,
                     self.regs_per_sm // (regs_per_warp * num_warps))
        if smem:
            blocks = min(blocks, self.smem_per_sm // (smem + self.smem_reserved))
        return max(0, blocks) * num_warps


ARCHS = {
    80: Arch(80, smem_per_sm=167936, smem_per_block=166912),   # A100: 164 KB per SM, 163 KB per block
    90: Arch(90),                                                # H100/H200: 228 KB per SM, 227 KB per block
    100: Arch(100),                                              # B200: 228 KB per SM, 227 KB per block
}

#: Tensor-core instructions in the PTX: Ampere mma.sync, Hopper wgmma, Blackwell tcgen05.
TC_PATTERNS = (("tcgen05", "tcgen05.mma"), ("wgmma", "wgmma.mma_async"), ("mma", "mma.sync"))


# --- the cases --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Case:
    """One call of a kernel: shape, dtype, layout name (the registry entry knows what it means), variant."""

    kernel: str
    channels: int
    height: int
    width: int
    dtype: str
    layout: str
    precision: str = ""       # channel gate fp32: dot_precision's answer ("ieee" or "tf32")
    variant: str = ""
    rate: int = 4
    origin: str = "sweep"     # "sweep" or "odd-map"

    @property
    def hw(self) -> int:
        return self.height * self.width

    def label(self) -> str:
        p = f" {self.precision}" if self.precision else ""
        v = f" {self.variant}" if self.variant else ""
        return f"C{self.channels} {self.height}x{self.width} {self.dtype}{p} {self.layout}{v}"


def _torch_dtype(name: str):
    import torch

    return {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[name]


def _meta(shape, dtype: str, channels_last: bool = False):
    """A meta tensor (no memory) with the strides a real allocation in that layout would have."""
    import torch

    fmt = torch.channels_last if channels_last else torch.contiguous_format
    return torch.empty(shape, dtype=_torch_dtype(dtype), device="meta", memory_format=fmt)


@dataclass(frozen=True)
class KernelEntry:
    """How to compile one kernel: adding a kernel to the report is one of these.

    ``launch(case, config)`` returns the op's (kernel, grid, args, kwargs) for that case, built by the op's
    own ``_launch_args`` on meta tensors; ``heuristic(case)`` and ``candidates(case)`` are the op's
    configs; ``layouts(dtype)`` the layouts the sweep runs (compiled with candidates), ``extra_layouts``
    the other layouts users run (heuristic only); ``variants`` the constexpr variants (the first gets
    the candidates); ``table_class(case, config)`` groups the cases whose compile facts the autotuner's
    pruning table merges (``gam_triton.configs.compiled_key``); ``equiv(case, config)`` is a key under
    which compiles are shared across channel-loop trip counts (None: compile every specialisation);
    ``family`` names the table entries (kernels whose candidates come from one configs function share one)
    and ``dtype_in_key`` whether they are per dtype. A new kernel: its op exposes ``_launch_args`` like the
    others, its configs function prunes with ``configs.compiled_ok(compiled_key(family, ...))``, and one entry
    here.
    """

    name: str
    dtypes: tuple
    layouts: Callable[[str], tuple]
    extra_layouts: tuple
    variants: tuple
    launch: Callable
    heuristic: Callable
    candidates: Callable
    table_class: Callable
    equiv: Optional[Callable] = None
    family: str = ""              # table key family (default: the name); kernels sharing candidates share it
    dtype_in_key: bool = True     # False: one table entry per config for every dtype
    fp32_precisions: tuple = ("",)  # fp32 dot precisions compiled (Case.precision), "" = not a dot kernel
    odd_maps: bool = True         # also compiled at ODD_MAPS
    ci: tuple = ()                # --subset ci: only these Case.label()s (at CI_PAIRS); () = every case there

    def table_key(self, case: Case, cfg, constexprs: dict) -> str:
        """This case's entry in the compiled-facts table (``gam_triton.configs.compiled_key``)."""
        from gam_triton.configs import compiled_key

        return compiled_key(self.family or self.name, self.table_class(case, cfg),
                            case.dtype if self.dtype_in_key else "", constexprs.get("INPUT_PRECISION", "") or "",
                            cfg)


def _channel_gate_launch(case: Case, cfg):
    import torch

    from gam_triton import channel_gate as op

    b, c, cr = 16, case.channels, case.channels // case.rate
    x_cl = case.layout == "cl"
    out_cl = case.layout in ("cl", "nchw>cl")
    x = _meta((b, c, case.height, case.width), case.dtype, x_cl)
    out = _meta((b, c, case.height, case.width), case.dtype, out_cl)
    w1 = _meta((cr, c), case.dtype)
    w2 = _meta((c, cr), case.dtype)
    b1, b2 = _meta((cr,), case.dtype), _meta((c,), case.dtype)
    assert x.dtype != torch.float64
    return op._launch_args(x, w1, b1, w2, b2, case.variant == "sigmoid", out, cfg,
                           precision=case.precision or None)


def _channel_gate_precision(case: Case) -> Optional[str]:
    return case.precision or None


def _channel_gate_heuristic(case: Case):
    from gam_triton.configs import channel_gate_heuristic

    return channel_gate_heuristic(case.channels, case.channels // case.rate, case.hw, _torch_dtype(case.dtype),
                                  precision=_channel_gate_precision(case))


def _channel_gate_candidates(case: Case):
    from gam_triton.configs import channel_gate_candidates

    return channel_gate_candidates(case.channels, case.channels // case.rate, case.hw, _torch_dtype(case.dtype),
                                   precision=_channel_gate_precision(case))


def _channel_gate_class(case: Case, cfg) -> str:
    from gam_triton.configs import channel_gate_class

    return channel_gate_class(case.channels, cfg)


def _channel_gate_equiv(case: Case, cfg):
    """Compiles that differ only in the channel loop's trip count (N_CHUNKS >= 2) share one compile."""
    return (case.dtype, case.precision, case.layout, case.variant, cfg, _channel_gate_class(case, cfg),
            case.hw % 16 == 0, case.channels % 16 == 0, (case.channels // case.rate) % 16 == 0)


def _final_gate_launch(case: Case, cfg):
    from gam_triton import final_gate as op

    b, c = 16, case.channels
    x1_cl, y2_cl, out_cl = {"nchw": (False, False, False), "cl>nchw": (True, True, False),
                            "cl": (True, True, True)}[case.layout]
    shape = (b, c, case.height, case.width)
    x1, y2, out = _meta(shape, case.dtype, x1_cl), _meta(shape, case.dtype, y2_cl), _meta(shape, case.dtype, out_cl)
    scale, shift = _meta((c,), "fp32"), _meta((c,), "fp32")
    groups = 0 if case.variant == "noshuffle" else 4
    return op._launch_args(x1, y2, scale, shift, groups, out, cfg)


def _elementwise_cl(case: Case) -> bool:
    return case.layout.startswith("cl")


def _elementwise_heuristic(case: Case):
    from gam_triton.configs import elementwise_heuristic

    return elementwise_heuristic(case.channels, case.hw, _elementwise_cl(case))


def _elementwise_candidates(case: Case):
    from gam_triton.configs import elementwise_candidates

    return elementwise_candidates(case.channels, case.hw, _elementwise_cl(case))


def _elementwise_class(case: Case, cfg) -> str:
    from gam_triton.configs import elementwise_class

    return elementwise_class(case.channels, case.hw, _elementwise_cl(case))


def _bn_relu_launch(case: Case, cfg):
    from gam_triton import bn_relu as op

    b, c = 16, case.channels
    cl = case.layout == "cl"
    shape = (b, c, case.height, case.width)
    y, z = _meta(shape, case.dtype, cl), _meta(shape, case.dtype, cl)
    return op._launch_args(y, _meta((c,), "fp32"), _meta((c,), "fp32"), z, cfg)


# --- the training path's kernels (gam_triton/train_block.py) and the eval spatial path's (spatial.py) --------
# Their layouts name which BatchNorm / grouping the case is (the registry's layout is free text per entry):
# "bn1:..." is BN1 + ReLU over y1 (C/r channels), "bn2:..." BN2 + sigmoid + shuffle + final gate over y2 (C);
# "g4:..." the grouped 7x7 convolutions (groups = r = 4, shuffle 4), "g1:..." the plain ones. After the colon:
# "nchw" / "cl" every tensor in that layout; "cl>nchw" y, x1 channels_last, the block's gradient / output NCHW
# (what the sweep runs in fp16/bf16: x1 channels_last, block input and output NCHW).
def _split(layout: str) -> tuple[str, str]:
    head, _, tail = layout.partition(":")
    return head, tail


def _bn_case(case: Case):
    """(mode, channels, y, g, x1 or None) meta tensors of one BatchNorm of the training path."""
    which, lay = _split(case.layout)
    b, h, w = 16, case.height, case.width
    c = case.channels // case.rate if which == "bn1" else case.channels
    y_cl = lay in ("cl", "cl>nchw")
    y = _meta((b, c, h, w), case.dtype, y_cl)
    g = _meta((b, c, h, w), case.dtype, lay == "cl" or (lay == "cl>nchw" and which == "bn1"))
    x1 = None if which == "bn1" else _meta((b, c, h, w), case.dtype, y_cl)
    return (0 if which == "bn1" else 1), c, y, g, x1


def _bn_stats_launch(case: Case, cfg):
    from gam_triton import train_block as op

    import torch

    _mode, c, y, _g, _x1 = _bn_case(case)
    prm = _meta((c,), case.dtype)
    running = (_meta((c,), case.dtype), _meta((c,), case.dtype), torch.empty((), dtype=torch.int64, device="meta"))
    return op._bn_stats_launch_args(y, prm, prm, running, 1e-5, 0.1, True, _bn_counts(c), _meta((4, c), "fp32"),
                                    cfg)


def _bn_counts(c: int):
    import torch

    from gam_triton.train_block import counter_slots

    return torch.empty(counter_slots(c), dtype=torch.int32, device="meta")


def _bn_bwd_reduce_launch(case: Case, cfg):
    from gam_triton import train_block as op

    mode, c, y, g, x1 = _bn_case(case)
    prm = _meta((c,), case.dtype)
    return op._bn_bwd_reduce_launch_args(mode, g, x1, y, _meta((4, c), "fp32"), _meta((2, c), "fp32"), prm, prm,
                                         4 if mode else 0, _bn_counts(c), cfg)


def _bn_bwd_apply_launch(case: Case, cfg):
    from gam_triton import train_block as op

    mode, c, y, g, x1 = _bn_case(case)
    dx1 = None if x1 is None else _meta(tuple(x1.shape), case.dtype, x1.stride(1) == 1)
    dy = _meta(tuple(y.shape), case.dtype, y.stride(1) == 1)
    return op._bn_bwd_apply_launch_args(mode, g, x1, y, _meta((4, c), "fp32"), _meta((2, c), "fp32"), dy, dx1,
                                        4 if mode else 0, cfg)


def _bn_reduce_heuristic(case: Case):
    from gam_triton.configs import bn_reduce_heuristic

    _mode, c, y, _g, _x1 = _bn_case(case)
    return bn_reduce_heuristic(c, 16 * case.hw, y.stride(1) == 1)


def _bn_reduce_candidates(case: Case):
    from gam_triton.configs import bn_reduce_candidates

    _mode, c, y, _g, _x1 = _bn_case(case)
    return bn_reduce_candidates(c, 16 * case.hw, y.stride(1) == 1)


def _bn_class(case: Case, cfg) -> str:
    return _split(case.layout)[0]


def _channel_gate_bwd_launch(case: Case, cfg):
    import torch

    from gam_triton import train_block as op

    b, c, cr, h, w = 16, case.channels, case.channels // case.rate, case.height, case.width
    x_cl = case.layout == "cl"
    g_cl = case.layout in ("cl", "nchw>cl")
    x = _meta((b, c, h, w), case.dtype, x_cl)
    ga, gb = _meta((b, c, h, w), case.dtype, g_cl), _meta((b, c, h, w), case.dtype, g_cl)
    dx = _meta((b, c, h, w), case.dtype, x_cl)
    w1, w2 = _meta((cr, c), case.dtype), _meta((c, cr), case.dtype)
    b1, b2 = _meta((cr,), case.dtype), _meta((c,), case.dtype)
    n = b * h * w
    dah, hid = _meta((n, c + cr), case.dtype), _meta((n, cr), case.dtype)
    counts = torch.empty(1, dtype=torch.int32, device="meta")
    return op._channel_gate_bwd_launch_args(x, ga, gb, w1, b1, w2, b2, False, dx, dah, hid, counts,
                                            _meta((cr,), case.dtype), _meta((c,), case.dtype), cfg,
                                            precision=case.precision or None)


def _channel_gate_bwd_heuristic(case: Case):
    from gam_triton.configs import channel_gate_bwd_heuristic

    return channel_gate_bwd_heuristic(case.channels, case.channels // case.rate, case.hw, _torch_dtype(case.dtype))


def _channel_gate_bwd_candidates(case: Case):
    from gam_triton.configs import channel_gate_bwd_candidates

    return channel_gate_bwd_candidates(case.channels, case.channels // case.rate, case.hw, _torch_dtype(case.dtype))


def _conv_dims(case: Case) -> tuple[int, int, int]:
    """(groups, C, C/r) of the case: "g4" grouped (groups = r), "g1" plain."""
    groups = case.rate if _split(case.layout)[0] == "g4" else 1
    return groups, case.channels, case.channels // case.rate


def _conv_bn_relu_launch(case: Case, cfg):
    from gam_triton import spatial as op

    groups, c, cr = _conv_dims(case)
    lay = _split(case.layout)[1]
    x1 = _meta((16, c, case.height, case.width), case.dtype, lay != "nchw")
    wp = _meta((7, 7, c // groups, cr), case.dtype)
    z = _meta((16, cr, case.height, case.width), case.dtype, True)
    return op._conv1_launch_args(x1, wp, _meta((cr,), case.dtype), z, cfg, precision=case.precision or None)


def _conv_gate_launch(case: Case, cfg):
    from gam_triton import spatial as op

    groups, c, cr = _conv_dims(case)
    lay = _split(case.layout)[1]
    z1 = _meta((16, cr, case.height, case.width), case.dtype, True)
    wp = _meta((7, 7, cr // groups, c), case.dtype)
    x1 = _meta((16, c, case.height, case.width), case.dtype, lay != "nchw")
    out = _meta((16, c, case.height, case.width), case.dtype, lay == "cl")
    return op._conv2_launch_args(z1, wp, _meta((c,), case.dtype), _meta((c,), "fp32"), _meta((c,), "fp32"), x1, 4,
                                 out, cfg, precision=case.precision or None)


def _conv_gemm(case: Case) -> tuple[int, int]:
    groups, c, cr = _conv_dims(case)
    return (c // groups, cr // groups) if case.kernel == "conv_bn_relu" else (cr // groups, c // groups)


def _conv_heuristic(case: Case):
    from gam_triton.configs import conv_heuristic

    return conv_heuristic(*_conv_gemm(case), case.hw, _torch_dtype(case.dtype))


def _conv_candidates(case: Case):
    from gam_triton.configs import conv_candidates

    return conv_candidates(*_conv_gemm(case), case.hw, _torch_dtype(case.dtype))


def _conv_class(case: Case, cfg) -> str:
    return _split(case.layout)[0]


#: Constexprs that are only loop trip counts in the new kernels' sources (``range(...)``, not unrolled).
TRIP_COUNTS = ("N_CHUNKS", "K_BLOCKS", "N_Q_CHUNKS", "N_F_CHUNKS")


def _trip_equiv(launch: Callable) -> Callable:
    """An ``equiv`` for KernelEntry: the exact specialisation with every loop trip count >= 2 made equal
    (one compile stands for the same code at another trip count; ``compiled_as`` in the rows says which)."""
    def equiv(case: Case, cfg):
        kernel, _grid, args, kwargs = launch(case, cfg)
        spec = specialise(kernel, args, kwargs)
        spec["constexprs"] = {k: (min(v, 2) if k in TRIP_COUNTS else v) for k, v in spec["constexprs"].items()}
        return json.dumps([_kernel_ref(kernel), spec], sort_keys=True, default=str)
    return equiv


def _half_or(layouts_fp32: tuple, layouts_half: tuple):
    return lambda dtype: layouts_fp32 if dtype == "fp32" else layouts_half


#: The kernels. The sweep's layouts (perf/sweep.py, gam_triton/module.py): inputs NCHW; in fp16/bf16 the
#: block writes x1 channels_last (so conv outputs y1, y2 are channels_last too) and its output NCHW; the
#: component rows (channel_gate, final_gate alone) are NCHW throughout; fp32 is NCHW throughout.
KERNELS = {
    "channel_gate": KernelEntry(
        "channel_gate", ("fp32", "bf16", "fp16"), _half_or(("nchw",), ("nchw", "nchw>cl")), ("cl",),
        ("", "sigmoid"), _channel_gate_launch, _channel_gate_heuristic, _channel_gate_candidates,
        _channel_gate_class, _channel_gate_equiv, fp32_precisions=("ieee", "tf32")),
    "final_gate": KernelEntry(
        "final_gate", ("fp32", "bf16", "fp16"), _half_or(("nchw",), ("nchw", "cl>nchw")), ("cl",),
        ("", "noshuffle"), _final_gate_launch, _elementwise_heuristic, _elementwise_candidates,
        _elementwise_class, family="elementwise", dtype_in_key=False),
    "bn_relu": KernelEntry(
        "bn_relu", ("fp32", "bf16", "fp16"), _half_or(("nchw",), ("cl",)), ("nchw", "cl"),
        ("",), _bn_relu_launch, _elementwise_heuristic, _elementwise_candidates, _elementwise_class,
        family="elementwise", dtype_in_key=False),
    # the training path: sweep layouts as the train rows run them (fp16/bf16: x1, y1, y2 channels_last, the
    # block's input, output and their gradients NCHW); no odd maps (compile cost). Candidates are not in the
    # pruning table (the autotuner does not time the BatchNorm reductions; see perf/NOTES.md).
    "bn_stats": KernelEntry(
        "bn_stats", ("fp32", "bf16", "fp16"), _half_or(("bn1:nchw", "bn2:nchw"), ("bn1:cl", "bn2:cl")),
        ("bn1:cl", "bn2:cl", "bn1:nchw", "bn2:nchw"), ("",), _bn_stats_launch, _bn_reduce_heuristic,
        _bn_reduce_candidates, _bn_class, odd_maps=False,
        equiv=_trip_equiv(_bn_stats_launch), ci=("C64 80x80 bf16 bn2:cl",)),
    "bn_bwd_reduce": KernelEntry(
        "bn_bwd_reduce", ("fp32", "bf16", "fp16"), _half_or(("bn1:nchw", "bn2:nchw"), ("bn1:cl", "bn2:cl>nchw")),
        ("bn1:cl", "bn2:cl", "bn1:nchw", "bn2:nchw"), ("",), _bn_bwd_reduce_launch, _bn_reduce_heuristic,
        _bn_reduce_candidates, _bn_class, odd_maps=False,
        equiv=_trip_equiv(_bn_bwd_reduce_launch), ci=("C64 80x80 bf16 bn2:cl>nchw",)),
    "bn_bwd_apply": KernelEntry(
        "bn_bwd_apply", ("fp32", "bf16", "fp16"), _half_or(("bn1:nchw", "bn2:nchw"), ("bn1:cl", "bn2:cl>nchw")),
        ("bn1:cl", "bn2:cl", "bn1:nchw", "bn2:nchw"), ("",), _bn_bwd_apply_launch, _bn_reduce_heuristic,
        _bn_reduce_candidates, _bn_class, odd_maps=False, ci=("C64 80x80 bf16 bn2:cl>nchw",)),
    "channel_gate_bwd": KernelEntry(
        "channel_gate_bwd", ("fp32", "bf16", "fp16"), _half_or(("nchw",), ("nchw>cl",)), ("cl",), ("",),
        _channel_gate_bwd_launch, _channel_gate_bwd_heuristic, _channel_gate_bwd_candidates, _channel_gate_class,
        fp32_precisions=("ieee", "tf32"), odd_maps=False,
        equiv=_trip_equiv(_channel_gate_bwd_launch),
        ci=("C1024 20x20 bf16 nchw>cl", "C64 80x80 fp32 ieee nchw")),
    # the eval spatial path (GAM_TRITON_CONV=triton or auto's choice): z1 always channels_last, the sweep's
    # x1 channels_last in fp16/bf16 and NCHW in fp32, the block output NCHW; fp32 dots at TF32 (cuDNN's
    # default, torch.backends.cudnn.allow_tf32) and tf32x3 (allow_tf32 off).
    "conv_bn_relu": KernelEntry(
        "conv_bn_relu", ("fp32", "bf16", "fp16"), _half_or(("g4:nchw", "g1:nchw"), ("g4:cl", "g1:cl")),
        ("g4:cl", "g1:cl"), ("",), _conv_bn_relu_launch, _conv_heuristic, _conv_candidates, _conv_class,
        fp32_precisions=("tf32", "tf32x3"), odd_maps=False,
        equiv=_trip_equiv(_conv_bn_relu_launch), ci=("C1024 20x20 bf16 g1:cl",)),
    "conv_gate": KernelEntry(
        "conv_gate", ("fp32", "bf16", "fp16"), _half_or(("g4:nchw", "g1:nchw"), ("g4:cl>nchw", "g1:cl>nchw")),
        ("g4:cl", "g1:cl"), ("",), _conv_gate_launch, _conv_heuristic, _conv_candidates, _conv_class,
        fp32_precisions=("tf32", "tf32x3"), odd_maps=False,
        equiv=_trip_equiv(_conv_gate_launch), ci=("C64 80x80 fp32 tf32x3 g4:nchw",)),
}

#: Odd NCHW maps (classifier-style 224 inputs: 14x14, 7x7) where H*W is not a multiple of 16 and the
#: pixel strides lose their divisibility hint; compiled for the elementwise kernels and the channel gate.
ODD_MAPS = ((256, 14), (512, 14), (512, 7), (1024, 7))
#: The CI subset: one-tile and looped channel gates (BLOCK_R 16, 64, 256), even and odd maps; the kernels
#: with a ``ci`` list compile only those cases (the widest tiles, fp32 dots, the most registers).
CI_PAIRS = ((64, 80), (1024, 20))
CI_ODD = ((256, 14),)


def sweep_pairs() -> list[tuple[int, int]]:
    from common import yolo_pairs

    return yolo_pairs()


def make_cases(entry: KernelEntry, pairs, odd_maps, everything: bool = False,
               dtypes: Optional[tuple] = None) -> list[tuple[Case, bool]]:
    """(case, gets_candidates) for every shape, dtype, precision and sweep layout of the entry; with
    ``everything`` also the extra layouts and the other variants (heuristic only)."""
    out = []
    for origin, prs in (("sweep", pairs), ("odd-map", odd_maps if entry.odd_maps else ())):
        for c, s in prs:
            for dtype in dtypes or entry.dtypes:
                precs = entry.fp32_precisions if dtype == "fp32" else ("",)
                sweep_layouts = entry.layouts(dtype)
                layouts = list(sweep_layouts) + ([lay for lay in entry.extra_layouts if lay not in sweep_layouts]
                                                 if everything else [])
                for prec in precs:
                    for lay in layouts:
                        for i, var in enumerate(entry.variants if everything else entry.variants[:1]):
                            case = Case(entry.name, c, s, s, dtype, lay, prec, var, origin=origin)
                            cands = origin == "sweep" and lay in sweep_layouts and i == 0
                            if var and lay not in sweep_layouts:
                                continue
                            out.append((case, cands))
    return out


# --- specialisation ---------------------------------------------------------------------------------------
_DTYPE_NAMES = {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16", "float64": "fp64", "int32": "i32",
                "int64": "i64", "int8": "i8", "uint8": "u8", "bool": "i1"}


def specialise(kernel, args: tuple, kwargs: dict) -> dict:
    """The compile job Triton's JIT would make of ``kernel[grid](*args, **kwargs)``: signature, constexprs,
    divisibility attributes and options (num_warps, num_stages), as plain data."""
    names = list(kernel.arg_names)
    values = dict(zip(names, args))
    options = {}
    for k, v in kwargs.items():
        if k in names:
            values[k] = v
        else:
            options[k] = v
    constexpr_params = {p.name for p in kernel.params if p.is_constexpr}
    signature, constexprs, divisible = {}, {}, []
    for name in names:
        v = values[name]
        if name in constexpr_params or v is None:
            signature[name] = "constexpr"
            constexprs[name] = v
        elif isinstance(v, bool):
            signature[name] = "i1"
        elif isinstance(v, int):
            if v == 1:  # Triton specialises 1 into a constant
                signature[name] = "constexpr"
                constexprs[name] = 1
                continue
            signature[name] = "i32" if -(2**31) <= v < 2**31 else "i64"
            if v % 16 == 0:
                divisible.append(name)
        elif isinstance(v, float):
            signature[name] = "fp32"
        elif hasattr(v, "data_ptr"):
            signature[name] = "*" + _DTYPE_NAMES[str(v.dtype).replace("torch.", "")]
            if (v.storage_offset() * v.element_size()) % 16 == 0:  # allocations are 16-byte aligned
                divisible.append(name)
        else:
            raise TypeError(f"{kernel.__name__}: cannot specialise argument {name}={v!r}")
    return {"signature": signature, "constexprs": constexprs, "divisible": divisible, "options": options}


def _kernel_ref(kernel) -> str:
    return f"{kernel.fn.__module__}:{kernel.fn.__name__}" if hasattr(kernel, "fn") else \
        f"{kernel.__module__}:{kernel.__name__}"


def job_key(kernel, spec: dict, cc: int) -> str:
    """Cache key of one compile: kernel source (Triton's cache_key covers it and its callees), Triton
    version, the specialisation and the target."""
    import triton

    payload = json.dumps([kernel.cache_key, triton.__version__, spec, cc], sort_keys=True, default=str)
    return hashlib.sha256(payload.encode()).hexdigest()[:32]


# --- compiling (in the worker processes) -----------------------------------------------------------------
_PTXAS_RE = {
    "regs": re.compile(r"Used (\d+) registers"),
    "spill_stores": re.compile(r"(\d+) bytes spill stores"),
    "spill_loads": re.compile(r"(\d+) bytes spill loads"),
    "stack": re.compile(r"(\d+) bytes stack frame"),
}


def parse_ptxas(log: str) -> dict:
    out = {}
    for k, rx in _PTXAS_RE.items():
        vals = [int(v) for v in rx.findall(log)]
        out[k] = max(vals) if vals else None
    return out


def _load_kernel(ref: str):
    import importlib

    mod, name = ref.split(":")
    return getattr(importlib.import_module(mod), name)


def _sm_arch(cc: int) -> str:
    return f"sm_{cc}a" if cc >= 90 else f"sm_{cc}"


def compile_job(ref: str, spec: dict, cc: int) -> dict:
    """Compile one specialisation for ``cc`` and return its compile facts (run in a worker)."""
    import triton
    import triton.backends.nvidia.compiler as nv
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    kernel = _load_kernel(ref)
    names = list(kernel.arg_names)
    constexprs = {(names.index(k),): v for k, v in spec["constexprs"].items()}
    attrs = {(names.index(k),): [["tt.divisibility", 16]] for k in spec["divisible"]}
    src = ASTSource(fn=kernel, signature=dict(spec["signature"]), constexprs=constexprs, attrs=attrs)
    logs = []
    real = nv.subprocess

    class _CaptureLog:  # Triton runs ptxas -v with its own flags and discards the log: keep a copy
        def __getattr__(self, name):
            return getattr(real, name)

        def run(self, cmd, *a, **kw):
            res = real.run(cmd, *a, **kw)
            f = kw.get("stderr")
            if cmd and "ptxas" in os.path.basename(str(cmd[0])) and hasattr(f, "name"):
                with open(f.name) as fh:
                    logs.append(fh.read())
            return res

    t0 = time.perf_counter()
    nv.subprocess = _CaptureLog()
    try:
        k = triton.compile(src, target=GPUTarget("cuda", cc, 32), options=dict(spec["options"]))
    except Exception as e:  # a config that does not compile is a fact to report, not a crash
        return {"ok": False, "error": f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}",
                "seconds": time.perf_counter() - t0}
    finally:
        nv.subprocess = real
    ptx = k.asm["ptx"]
    log = logs[-1] if logs else _run_ptxas(ptx, cc)
    facts = parse_ptxas(log)
    tc = next((name for name, pat in TC_PATTERNS if pat in ptx), "none")
    return {"ok": True, "error": "", "regs": facts["regs"], "spill_stores": facts["spill_stores"] or 0,
            "spill_loads": facts["spill_loads"] or 0, "stack": facts["stack"] or 0,
            "smem": int(k.metadata.shared), "tc": tc, "seconds": round(time.perf_counter() - t0, 2)}


def ptxas_path(cc: int) -> str:
    """The triton wheel's ptxas for ``cc`` (``get_ptxas(arch)`` since Triton 3.5, ``get_ptxas()`` before)."""
    import inspect

    from triton.backends.nvidia.compiler import get_ptxas

    return (get_ptxas(cc) if inspect.signature(get_ptxas).parameters else get_ptxas()).path


def _run_ptxas(ptx: str, cc: int) -> str:
    """Fallback when Triton's own ptxas log was not seen (a cached compile): ptxas -v on the PTX."""
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "k.ptx")
        with open(path, "w") as f:
            f.write(ptx)
        r = subprocess.run([ptxas_path(cc), "-lineinfo", "-v", *_triton_extra_ptxas_flags(),
                            f"--gpu-name={_sm_arch(cc)}", path, "-o", path + ".o"], capture_output=True, text=True)
    return r.stderr


def _triton_extra_ptxas_flags() -> list:
    """Flags this Triton's make_cubin adds (3.9: --regAllocOptLevel=2, which changes register allocation)."""
    import inspect

    import triton.backends.nvidia.compiler as nv

    src = inspect.getsource(nv.CUDABackend.make_cubin)
    return ["--regAllocOptLevel=2"] if "--regAllocOptLevel=2" in src else []


def _worker_init() -> None:
    os.environ.pop("TRITON_INTERPRET", None)
    os.environ["TRITON_ALWAYS_COMPILE"] = "1"   # a Triton cache hit skips ptxas and its log (see _run_ptxas)
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")   # Triton 3.9 warns when unset; 1 = its default
    import warnings

    warnings.filterwarnings("ignore")


def _worker(job):
    ref, spec, cc = job
    return compile_job(ref, spec, cc)


# --- the cache --------------------------------------------------------------------------------------------
def load_cache(path: str) -> dict:
    try:
        with open(path) as f:
            data = json.load(f)
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def save_cache(path: str, cache: dict) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(cache, f, sort_keys=True)
    os.replace(tmp, path)


class Compiler:
    """Compiles jobs once each (cache, dedupe), in a pool of ``jobs`` processes."""

    def __init__(self, cache_path: Optional[str], jobs: int, log=print, cached_only: bool = False):
        self.cached_only = cached_only
        self.cache_path = cache_path
        self.cache = load_cache(cache_path) if cache_path else {}
        self.jobs = max(1, jobs)
        self.log = log
        self.compiled = 0

    def run(self, jobs: dict) -> dict:
        """``jobs``: key -> (ref, spec, cc). Returns key -> facts (from the cache or compiled now)."""
        todo = {k: j for k, j in jobs.items() if k not in self.cache}
        if todo and self.cached_only:
            self.log(f"--cached-only: {len(todo)} specialisations not compiled")
            return {k: self.cache[k] for k in jobs if k in self.cache}
        if todo:
            self.log(f"compiling {len(todo)} specialisations ({len(jobs) - len(todo)} cached) "
                     f"on {self.jobs} process(es)...")
            t0 = time.perf_counter()
            items = list(todo.items())
            if self.jobs == 1:
                _worker_init()
                results = map(_worker, [j for _, j in items])
            else:
                import multiprocessing as mp
                from concurrent.futures import ProcessPoolExecutor

                pool = ProcessPoolExecutor(self.jobs, mp_context=mp.get_context("spawn"), initializer=_worker_init)
                results = pool.map(_worker, [j for _, j in items], chunksize=1)
            try:
                for n, ((k, _), res) in enumerate(zip(items, results), 1):
                    self.cache[k] = res
                    self.compiled += 1
                    if n % 10 == 0:
                        self.log(f"  {n}/{len(items)} ({time.perf_counter() - t0:.0f} s)")
                        self._save()
            finally:
                if self.jobs > 1:
                    pool.shutdown()
                self._save()
            self.log(f"  done in {time.perf_counter() - t0:.0f} s")
        return {k: self.cache[k] for k in jobs}

    def _save(self) -> None:
        if self.cache_path:
            save_cache(self.cache_path, self.cache)


# --- the report -------------------------------------------------------------------------------------------
CSV_FIELDS = ("kernel", "arch", "source", "channels", "height", "width", "dtype", "precision", "input_precision",
              "layout", "variant", "origin", "BLOCK_P", "BLOCK_C", "BLOCK_R", "num_warps", "num_stages",
              "n_chunks", "table_class", "ok", "regs", "spill_stores", "spill_loads", "smem", "smem_limit",
              "smem_ok", "warps_per_sm", "tc", "compiled_as", "error")


@dataclass
class Planned:
    case: Case
    config: object
    source: str              # "heuristic" or "candidate"
    spec: dict
    ref: str
    kernel: object
    equiv_key: object = None


def plan_case(entry: KernelEntry, case: Case, cfg, source: str) -> Planned:
    kernel, _grid, args, kwargs = entry.launch(case, cfg)
    spec = specialise(kernel, args, kwargs)
    eq = entry.equiv(case, cfg) if entry.equiv else None
    return Planned(case, cfg, source, spec, _kernel_ref(kernel), kernel, eq)


def _rows_for(p: Planned, facts_by_cc: dict, compiled_as: str, entry: KernelEntry) -> list[dict]:
    rows = []
    for cc, facts in facts_by_cc.items():
        arch = ARCHS[cc]
        cfg = p.config
        smem = facts.get("smem", 0) if facts.get("ok") else 0
        rows.append({
            "kernel": p.case.kernel, "arch": arch.name, "source": p.source, "channels": p.case.channels,
            "height": p.case.height, "width": p.case.width, "dtype": p.case.dtype, "precision": p.case.precision,
            "input_precision": p.spec["constexprs"].get("INPUT_PRECISION", "") or "",
            "layout": p.case.layout, "variant": p.case.variant, "origin": p.case.origin,
            "BLOCK_P": cfg.BLOCK_P, "BLOCK_C": cfg.BLOCK_C, "BLOCK_R": cfg.BLOCK_R, "num_warps": cfg.num_warps,
            "num_stages": cfg.num_stages, "n_chunks": p.spec["constexprs"].get("N_CHUNKS", ""),
            "table_class": entry.table_class(p.case, cfg), "ok": int(bool(facts.get("ok"))),
            "regs": facts.get("regs", ""), "spill_stores": facts.get("spill_stores", ""),
            "spill_loads": facts.get("spill_loads", ""), "smem": smem, "smem_limit": arch.smem_per_block,
            "smem_ok": int(smem <= arch.smem_per_block),
            "warps_per_sm": arch.warps_per_sm(facts["regs"], smem, cfg.num_warps) if facts.get("ok") else 0,
            "tc": facts.get("tc", ""), "compiled_as": compiled_as, "error": facts.get("error", ""),
        })
    return rows


def build_report(kernels: list[str], pairs, odd_maps, archs, compiler: Compiler, with_candidates: bool,
                 everything: bool = False, dtypes: Optional[tuple] = None, log=print,
                 ci: bool = False) -> tuple[list[dict], dict]:
    """Compile everything asked and return (rows, compiled-limits table).

    First every heuristic, then the candidates group by group (kernel x dtype x precision, on the first
    sweep layout of the dtype), each pruned by the table being built: compile the list, record what spills,
    recompute the list, until no new config enters. A group whose candidates all compiled is ``covered``.
    """
    from gam_triton import configs

    table = {"entries": {}, "covered": []}
    configs.use_compiled_limits(table)
    rows: list[dict] = []
    plans = [(KERNELS[n], make_cases(KERNELS[n], pairs, odd_maps, everything, dtypes)) for n in kernels]
    if ci:  # the CI subset: entries that name their CI cases keep only those
        plans = [(e, [(c, cand) for c, cand in cases if not e.ci or c.label() in e.ci]) for e, cases in plans]
    heuristics = [(entry, [plan_case(entry, c, entry.heuristic(c), "heuristic") for c, _ in cases])
                  for entry, cases in plans]
    jobs: dict = {}
    for _entry, planned in heuristics:  # one process pool for every kernel's heuristics (startup ~10 s each)
        jobs.update(_jobs_for(planned, archs)[0])
    compiler.run(jobs)
    for entry, planned in heuristics:
        _compile_and_record(entry, planned, archs, compiler, rows, table)
    groups: dict = {}
    for entry, cases in plans if with_candidates else ():
        for c, cands in cases:
            if cands and c.layout == entry.layouts(c.dtype)[0]:
                groups.setdefault((entry.name, c.dtype, c.precision), []).append(c)
    # the full-precision fp32 channel gate first (where spills were found), then the cheap elementwise kernels
    order = sorted(groups, key=lambda g: (0 if g[2] == "ieee" else 1 if g[0] != "channel_gate" else 2))
    final = set()
    for name, dt, prec in order:
        entry, gcases = KERNELS[name], groups[(name, dt, prec)]
        done: dict = {}
        complete = True
        for _round in range(10):
            new = []
            for c in gcases:
                for cfg in entry.candidates(c):
                    if (c, cfg) not in done:
                        done[(c, cfg)] = plan_case(entry, c, cfg, "candidate")
                        new.append(done[(c, cfg)])
            if not new:
                break
            complete &= _compile_and_record(entry, new, archs, compiler, rows, table)
            log(f"{name} {dt} {prec}: round {_round + 1}: {len(new)} candidate configs; table has "
                f"{len(table['entries'])} entries")
        if complete:
            table["covered"].append(f"{name}|{dt}|{prec}")
    for name, dt, prec in order:  # the configs the autotuner times after pruning, with the final table
        final |= {(c, cfg) for c in groups[(name, dt, prec)] for cfg in KERNELS[name].candidates(c)}
    for r in rows:
        if r["source"] == "candidate":
            r["source"] = "candidate" if (r["_case"], r["_cfg"]) in final else "pruned"
    configs.use_compiled_limits(None)
    for r in rows:
        r.pop("_case", None)
        r.pop("_cfg", None)
    return rows, table


def _jobs_for(planned: list[Planned], archs) -> tuple[dict, dict]:
    """(compile jobs, equiv key -> representative plan) of planned cases: one job per representative x arch."""
    jobs, reps = {}, {}
    for p in planned:
        rep = reps.setdefault(p.equiv_key, p) if p.equiv_key is not None else p
        for cc in archs:
            jobs[job_key(rep.kernel, rep.spec, cc)] = (rep.ref, rep.spec, cc)
    return jobs, reps


def _compile_and_record(entry, planned: list[Planned], archs, compiler: Compiler, rows: list, table: dict) -> bool:
    """Compile (or take from the cache) and record rows and table facts; False when some job was skipped
    (``--cached-only``)."""

    jobs, reps = _jobs_for(planned, archs)
    facts = compiler.run(jobs)
    complete = True
    for p in planned:
        rep = reps[p.equiv_key] if p.equiv_key is not None else p
        keys = [job_key(rep.kernel, rep.spec, cc) for cc in archs]
        if any(k not in facts for k in keys):
            complete = False
            continue
        by_cc = {cc: facts[k] for cc, k in zip(archs, keys)}
        compiled_as = "" if rep is p else f"C{rep.case.channels} {rep.case.height}x{rep.case.width}"
        new_rows = _rows_for(p, by_cc, compiled_as, entry)
        for r in new_rows:
            r["_case"], r["_cfg"] = p.case, p.config
        rows.extend(new_rows)
        merge_fact(table, entry.table_key(p.case, p.config, p.spec["constexprs"]), new_rows, p, exact=rep is p)
    return complete


def merge_fact(table: dict, key: str, rows: list[dict], p: Optional[Planned] = None, exact: bool = True) -> None:
    """Fold rows (one per arch) into the table entry ``key``: worst case over archs, layouts and shapes.
    A new entry also keeps the case it was first compiled at and that case's facts per arch (``sample``),
    which ``--verify-table`` compiles again."""
    e = table["entries"].get(key)
    if e is None:
        e = table["entries"][key] = {"regs": 0, "spill": 0, "smem": 0, "smem_ok": True, "ok": True}
        if p is not None:
            e["case"] = {k: getattr(p.case, k) for k in ("kernel", "channels", "height", "width", "dtype",
                                                         "layout", "precision", "variant")}
            e["config"] = p.config.as_dict()
            e["sample"] = {r["arch"]: [int(r["regs"] or 0), int(r["spill_stores"] or 0)] if r["ok"] else None
                           for r in rows}
            e["sample_exact"] = exact  # False: facts of the same config at another channel-loop trip count
    for r in rows:
        if not r["ok"]:
            e["ok"] = False
            continue
        e["regs"] = max(e["regs"], int(r["regs"] or 0))
        e["spill"] = max(e["spill"], int(r["spill_stores"] or 0) + int(r["spill_loads"] or 0))
        e["smem"] = max(e["smem"], int(r["smem"]))
        e["smem_ok"] = e["smem_ok"] and bool(r["smem_ok"])


def write_csv(path: str, rows: list[dict]) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=CSV_FIELDS)
        w.writeheader()
        for r in rows:
            w.writerow({k: r.get(k, "") for k in CSV_FIELDS})


def heuristic_table(rows: list[dict]) -> list[str]:
    """Markdown: per kernel, dtype (precision), arch: the heuristic's worst registers, spills, smem, and
    warps per SM range over the cases, the number of cases, and whether tensor-core instructions appear."""
    groups: dict = {}
    for r in rows:
        if r["source"] != "heuristic":
            continue
        k = (r["kernel"], r["dtype"] + (f" {r['precision']}" if r["precision"] else ""), r["origin"], r["arch"])
        groups.setdefault(k, []).append(r)
    out = ["| kernel | dtype | maps | arch | cases | max regs | spill bytes (max) | max smem B | warps/SM (min-max) "
           "| tensor cores | failed |",
           "|---|---|---|---|---|---|---|---|---|---|---|"]
    for (kern, dt, origin, arch), rs in sorted(groups.items()):
        ok = [r for r in rs if r["ok"]]
        tcs = sorted({r["tc"] for r in ok})
        if ok:
            regs = max(int(r["regs"]) for r in ok)
            spill = max(int(r["spill_stores"]) + int(r["spill_loads"]) for r in ok)
            smem = max(int(r["smem"]) for r in ok)
            w = [int(r["warps_per_sm"]) for r in ok]
            wr = f"{min(w)}-{max(w)}" if min(w) != max(w) else str(w[0])
        else:
            regs = spill = smem = "-"
            wr = "-"
        out.append(f"| {kern} | {dt} | {origin} | {arch} | {len(rs)} | {regs} | {spill} | {smem} | {wr} | "
                   f"{'/'.join(tcs)} | {len(rs) - len(ok)} |")
    return out


def candidate_table(rows: list[dict]) -> list[str]:
    groups: dict = {}
    for r in rows:
        if r["source"] not in ("candidate", "pruned"):
            continue
        k = (r["kernel"], r["dtype"] + (f" {r['precision']}" if r["precision"] else ""), r["arch"])
        g = groups.setdefault(k, {"candidate": set(), "pruned": set(), "spill_kept": 0})
        cfg = (r["channels"], r["height"], r["layout"], r["BLOCK_P"], r["BLOCK_C"], r["BLOCK_R"], r["num_warps"],
               r["num_stages"])
        g[r["source"]].add(cfg)
        if r["source"] == "candidate" and r["ok"] and (int(r["spill_stores"]) or not int(r["smem_ok"])):
            g["spill_kept"] += 1
    out = ["| kernel | dtype | arch | (case, config) pairs timed | pruned (spill / smem / no compile) "
           "| kept that spill |", "|---|---|---|---|---|---|"]
    for (kern, dt, arch), g in sorted(groups.items()):
        out.append(f"| {kern} | {dt} | {arch} | {len(g['candidate'])} | {len(g['pruned'])} | {g['spill_kept']} |")
    return out


def _heuristic_summary(rows: list[dict]) -> dict:
    """(kernel, dtype [precision], maps, arch) -> (max regs, max spill bytes, max smem, min warps/SM, cases)."""
    groups: dict = {}
    for r in rows:
        if r["source"] != "heuristic" or str(r["ok"]) != "1":
            continue
        k = (r["kernel"], r["dtype"] + (f" {r['precision']}" if r["precision"] else ""), r["origin"], r["arch"])
        groups.setdefault(k, []).append(r)
    return {k: (max(int(r["regs"]) for r in rs), max(int(r["spill_stores"]) + int(r["spill_loads"]) for r in rs),
                max(int(r["smem"]) for r in rs), min(int(r["warps_per_sm"]) for r in rs), len(rs))
            for k, rs in groups.items()}


def compare_table(before: list[dict], after: list[dict]) -> list[str]:
    """Markdown: the heuristic's worst registers, spills, smem and fewest warps per SM, before -> after."""
    b, a = _heuristic_summary(before), _heuristic_summary(after)
    out = ["| kernel | dtype | maps | arch | max regs | spill bytes (max) | max smem B | warps/SM (min) |",
           "|---|---|---|---|---|---|---|---|"]
    for k in sorted(set(b) | set(a)):
        def cell(i, k=k):
            x = b[k][i] if k in b else "-"
            y = a[k][i] if k in a else "-"
            return f"{x}" if x == y else f"{x} -> {y}"
        out.append(f"| {' | '.join(k)} | {cell(0)} | {cell(1)} | {cell(2)} | {cell(3)} |")
    return out


def write_markdown(path: str, rows: list[dict], meta: dict) -> None:
    lines = ["# Compile report", "",
             f"Generated by `perf/compile_report.py` (Triton {meta['triton']}, torch {meta['torch']}, "
             f"ptxas from the triton wheel), {meta['date']}. **Compile facts, not timings**: registers, spill "
             "bytes (stores + loads) and shared memory per kernel compile, resident warps per SM computed "
             "from them against each architecture's limits. Heuristic rows: every case (shape x dtype x "
             "layout x variant) at the sweep's shapes and odd NCHW maps.", "", "## Heuristic configs", ""]
    lines += heuristic_table(rows)
    lines += ["", "## Autotuner candidates (after pruning by the compiled-facts table)", ""]
    lines += candidate_table(rows)
    lines += [""]
    with open(path, "w") as f:
        f.write("\n".join(lines))


def write_limits(path: str, table: dict, archs) -> None:
    import triton

    out = {"generated_by": "perf/compile_report.py --write-limits",
           "triton": triton.__version__, "archs": [ARCHS[cc].name for cc in archs],
           "meaning": "worst case over archs, layouts and shapes compiled: regs, spill bytes (stores + loads), "
                      "smem bytes, smem_ok (within every arch's per-block limit), ok (compiled everywhere)",
           "covered": table.get("covered", []),
           "entries": dict(sorted(table["entries"].items()))}
    with open(path, "w") as f:
        json.dump(out, f, indent=0, sort_keys=False)
        f.write("\n")


def verify_table(path: str, n: int, archs, compiler: Compiler) -> list[dict]:
    """Compile ``n`` entries of the table again at the case each recorded (exact specialisation, no sharing)
    and compare registers and spill bytes per arch with the recorded sample. Entries that spill first."""
    from gam_triton.configs import Config

    try:
        with open(path) as f:
            entries = json.load(f)["entries"]
    except (OSError, ValueError, KeyError) as e:
        raise SystemExit(f"compile_report: cannot read the table {path}: {e}") from None
    keys = sorted(k for k, e in entries.items() if "case" in e)
    spilling = [k for k in keys if entries[k]["spill"]]
    clean = [k for k in keys if not entries[k]["spill"]]
    n_spill = min(len(spilling), n // 2)
    picks = spilling[:: max(1, len(spilling) // max(1, n_spill))][:n_spill]
    rest = n - len(picks)
    picks += clean[:: max(1, len(clean) // max(1, rest))][:rest]
    jobs, planned = {}, []
    for k in picks:
        e = entries[k]
        case = Case(**e["case"])
        p = plan_case(replace(KERNELS[case.kernel], equiv=None), case, Config(**e["config"]), "verify")
        planned.append((k, p))
        for cc in archs:
            jobs[job_key(p.kernel, p.spec, cc)] = (p.ref, p.spec, cc)
    facts = compiler.run(jobs)
    out = []
    for k, p in planned:
        got = {}
        for cc in archs:
            f = facts[job_key(p.kernel, p.spec, cc)]
            got[ARCHS[cc].name] = [f["regs"], f["spill_stores"]] if f.get("ok") else None
        expected = {a: entries[k]["sample"].get(a) for a in got}
        if entries[k].get("sample_exact", True):  # compiled at exactly this case: the same facts
            match = expected == got
        else:  # facts shared across trip counts: the pruning decision must hold at this case
            spills = any(g is None or g[1] for g in got.values())
            match = spills == bool(entries[k]["spill"] or not entries[k]["ok"])
        out.append({"key": k, "expected": expected, "got": got, "exact": entries[k].get("sample_exact", True),
                    "match": match})
    return out


def check_candidates(kernels: list[str], pairs) -> dict:
    """Every autotuner candidate at the sweep's shapes, dtypes and layouts against the shipped table:
    ``missing`` (never compiled ahead of time) and ``flagged`` (the table says it spills / overflows)."""
    from gam_triton import configs

    configs.use_compiled_limits(None)
    entries = configs.compiled_limits()["entries"]
    covered = set(configs.compiled_limits().get("covered", []))
    missing, flagged, uncovered, total = [], [], 0, 0
    for name in kernels:
        entry = KERNELS[name]
        for case, cands in make_cases(entry, pairs, ()):
            if not cands:
                continue
            for cfg in entry.candidates(case):
                _kernel, _g, _args, kwargs = entry.launch(case, cfg)
                key = entry.table_key(case, cfg, kwargs)
                total += 1
                if f"{name}|{case.dtype}|{case.precision}" not in covered:
                    uncovered += 1
                elif key not in entries:
                    missing.append(f"{case.label()}: {key}")
                elif not configs.compiled_ok(key):
                    flagged.append(f"{case.label()}: {key}")
    return {"total": total, "missing": missing, "flagged": flagged, "uncovered": uncovered,
            "covered": sorted(covered)}


def main(argv=None) -> int:
    _reexec_without_interpreter()
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=DEFAULT_OUT, help="folder for report.csv / report.md / cache.json")
    ap.add_argument("--kernels", default=",".join(KERNELS), help="comma-separated subset of " + ",".join(KERNELS))
    ap.add_argument("--archs", default="80,90,100")
    ap.add_argument("--quick", action="store_true", help="heuristic configs only")
    ap.add_argument("--everything", action="store_true",
                    help="also the layouts the sweep does not run (channels_last inputs) and the other variants "
                         "(sigmoid channel gate, unshuffled final gate), heuristic configs")
    ap.add_argument("--dtypes", help="comma-separated subset of fp32,fp16,bf16")
    ap.add_argument("--subset", choices=("sweep", "ci"), default="sweep")
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--no-cache", action="store_true")
    ap.add_argument("--compare", metavar="CSV", help="a report.csv from before a change: write compare.md "
                    "(heuristic facts before -> after)")
    ap.add_argument("--cached-only", action="store_true",
                    help="compile nothing new: report what the cache holds (groups left incomplete are not covered)")
    ap.add_argument("--write-limits", action="store_true", help=f"write {os.path.relpath(LIMITS_PATH, REPO_DIR)}")
    ap.add_argument("--verify-table", type=int, default=0, metavar="N",
                    help="compile N entries of the shipped table again and compare (writes verify.json)")
    ap.add_argument("--check-candidates", action="store_true",
                    help="check every candidate at the sweep's shapes against the shipped table (candidates.json)")
    args = ap.parse_args(argv)
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    import datetime

    import torch
    import triton

    archs = [int(a) for a in args.archs.split(",")]
    kernels = [k for k in args.kernels.split(",") if k]
    for k in kernels:
        if k not in KERNELS:
            raise SystemExit(f"compile_report: unknown kernel {k!r} (known: {', '.join(KERNELS)})")
    pairs, odd = (CI_PAIRS, CI_ODD) if args.subset == "ci" else (sweep_pairs(), ODD_MAPS)
    compiler = Compiler(None if args.no_cache else os.path.join(args.out, "cache.json"), args.jobs,
                        cached_only=args.cached_only)
    t0 = time.perf_counter()
    dtypes = tuple(args.dtypes.split(",")) if args.dtypes else None
    rows, table = build_report(kernels, pairs, odd, archs, compiler, with_candidates=not args.quick,
                               everything=args.everything, dtypes=dtypes, ci=args.subset == "ci")
    write_csv(os.path.join(args.out, "report.csv"), rows)
    meta = {"triton": triton.__version__, "torch": torch.__version__,
            "date": datetime.date.today().isoformat()}
    write_markdown(os.path.join(args.out, "report.md"), rows, meta)
    if args.write_limits:
        write_limits(LIMITS_PATH, table, archs)
    if args.compare:
        with open(args.compare) as f:
            before = list(csv.DictReader(f))
        after = [{k: str(v) for k, v in r.items()} for r in rows]
        with open(os.path.join(args.out, "compare.md"), "w") as f:
            f.write("\n".join(compare_table(before, after)) + "\n")
    if args.verify_table:
        res = verify_table(LIMITS_PATH, args.verify_table, archs, compiler)
        with open(os.path.join(args.out, "verify.json"), "w") as f:
            json.dump(res, f, indent=1)
        print(f"table verified: {sum(r['match'] for r in res)}/{len(res)} entries match")
    if args.check_candidates:
        res = check_candidates(kernels, sweep_pairs())
        with open(os.path.join(args.out, "candidates.json"), "w") as f:
            json.dump(res, f, indent=1)
        print(f"candidates: {res['total']} checked, {len(res['missing'])} not in the table, "
              f"{len(res['flagged'])} flagged, {res['uncovered']} in groups the table does not cover")
    bad = [r for r in rows if r["source"] == "heuristic" and (not r["ok"] or int(r["spill_stores"] or 0)
                                                                or not r["smem_ok"])]
    print(f"{len(rows)} rows, {compiler.compiled} compiled now, {time.perf_counter() - t0:.0f} s; heuristic rows "
          f"that spill, overflow shared memory or fail: {len(bad)}; wrote {args.out}/report.csv, report.md")
    for r in bad[:20]:
        print("  ", {k: r[k] for k in ("kernel", "arch", "channels", "height", "dtype", "precision", "layout",
                                       "BLOCK_P", "BLOCK_C", "BLOCK_R", "num_warps", "regs", "spill_stores",
                                       "smem", "error")})
    return 0


if __name__ == "__main__":
    sys.exit(main())
