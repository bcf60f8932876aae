"""Compile check: every kernel's heuristic launch choices compiled ahead of time for sm_80, sm_90 and sm_100, no GPU.

For each kernel (:data:`KERNELS`, one entry each), over the space of launches the module makes (:func:`space`:
the sweep's YOLO shapes and odd maps, fp32 / fp16 / bf16 and autocast's mixed dtypes, every layout the module
produces per dtype, every constexpr variant the GAM constructor allows, both fp32 dot precisions, batches 1 to
32), the op's own heuristic is asked for its tile and the op's own ``*launch_args`` are called on meta tensors.
The launch is specialised as Triton's JIT does (:func:`specialise`: an int equal to 1 becomes a constexpr, ints
divisible by 16 and aligned pointers get the divisibility hint) and compiled with
``triton.compile(ASTSource(...), target=GPUTarget("cuda", cc, 32))``; the ``ptxas -v`` log (the wheel's ptxas)
gives registers and spill bytes, Triton's metadata the shared memory; resident warps per SM follow from the
architecture's limits (:data:`ARCHS`). Compile facts, not timings: nothing here runs a kernel.

Coverage: launches whose compiled binary is the same (same kernel, constexprs, options, signature and
specialisation: :func:`compile_key`) are one compile, and every distinct binary of the space is compiled: a spill
anywhere in the space shows. No binary stands in for another: a constexpr loop bound of 4 can unroll into more
live registers than one of 8, so trip counts are not merged; the loops whose bounds vary with the batch (the
partial sums' finalisation) run to runtime bounds, so the batch mostly enters a binary through its
divisibility by 16.

Facts are kept per compile (key: the kernel's source, the Triton version, the specialisation, the target) in
``perf/compile/facts/triton-<version>.json``, committed: the CI test (``tests/test_compile_check.py``) looks the
whole space up there, compiles what is missing (up to ``--max-compiles``; a changed heuristic or kernel makes
new keys) and recompiles ``--verify`` entries it found to check that they are what a compile gives; a run
(``make compile-check``) rewrites the file with the entries of the current space only.

Writes ``perf/compile/report.csv`` (a row per compile x arch) and ``report.md`` (outputs, not committed);
``--check`` exits 1 when a heuristic choice spills, fails to compile or asks for more shared memory than an
architecture has, or a dot in fp16/bf16 has no tensor-core instruction. ``--candidates`` compiles the tuner's
candidates too (at the sweep's shapes, batch 16; for the notes: the tuner itself drops what spills on the
user's GPU).

    python perf/compile_check.py [--kernels channel_gate,...] [--archs 80,90,100]
                                 [--batches 1,16] [--candidates] [--check] [--jobs 2] [--out perf/compile]
"""
from __future__ import annotations

import argparse
import contextlib
import csv
import hashlib
import io
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, replace
from typing import Callable, Iterable, Optional

PERF_DIR = os.path.dirname(os.path.abspath(__file__))
REPO_DIR = os.path.dirname(PERF_DIR)
for _p in (REPO_DIR, PERF_DIR):
    if _p not in sys.path:
        sys.path.insert(0, _p)
DEFAULT_OUT = os.path.join(PERF_DIR, "compile")


def _reexec_without_interpreter() -> None:
    """Compiling for a GPU target needs real @triton.jit functions (TRITON_INTERPRET=1 replaces them)."""
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        env = dict(os.environ)
        env.pop("TRITON_INTERPRET")
        os.execve(sys.executable, [sys.executable, *sys.argv], env)


# --- the architectures ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Arch:
    """Per-SM limits of one compute capability (CUDA programming guide, compute capabilities table)."""

    cc: int
    smem_per_sm: int = 233472        # bytes
    smem_per_block: int = 232448     # the most one block may ask for (opt-in)

    def warps_per_sm(self, regs: int, smem: int, num_warps: int) -> int:
        """Resident warps: blocks limited by warps (64), blocks (32), registers (65536, 256 per warp granule)
        and shared memory (+1 KB reserved per block)."""
        regs_per_warp = -(-max(regs, 1) * 32 // 256) * 256
        blocks = min(32, 64 // num_warps, 65536 // (regs_per_warp * num_warps))
        if smem:
            blocks = min(blocks, self.smem_per_sm // (smem + 1024))
        return max(0, blocks) * num_warps


ARCHS = {80: Arch(80, 167936, 166912), 90: Arch(90), 100: Arch(100)}   # A100; H100/H200; B200
#: Tensor-core instructions in the PTX: Ampere mma.sync, Hopper wgmma, Blackwell tcgen05.
TC_PATTERNS = (("tcgen05", "tcgen05.mma"), ("wgmma", "wgmma.mma_async"), ("mma", "mma.sync"))
#: Kernels whose dots run in the weights' dtype: fp16/bf16 there must use tensor cores.
DOT_KERNELS = ("channel_gate", "channel_gate_bwd", "conv_bn_relu", "conv_gate")


# --- the cases --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Case:
    """One launch of a kernel: shape, batch, x's dtype and the weights' (autocast's when it differs), a layout
    name (the kernel's entry says what it means), the fp32 dot precision, a variant (comma-separated flags)."""

    kernel: str
    channels: int
    height: int
    width: int
    dtype: str
    layout: str
    precision: str = ""
    variant: str = ""
    batch: int = 16
    wdtype: str = ""
    origin: str = "sweep"
    rate: int = 4

    @property
    def wdt(self) -> str:
        return self.wdtype or self.dtype

    @property
    def hw(self) -> int:
        return self.height * self.width

    def flag(self, name: str) -> bool:
        return name in self.variant.split(",")

    def label(self) -> str:
        a, p = f"/{self.wdtype}" if self.wdtype else "", f" {self.precision}" if self.precision else ""
        v = f" {self.variant}" if self.variant else ""
        return f"C{self.channels} {self.height}x{self.width} B{self.batch} {self.dtype}{a}{p} {self.layout}{v}"


def _dt(name: str):
    import torch

    return {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[name]


def _meta(shape, dtype: str, channels_last: bool = False):
    """A meta tensor (no memory) with the strides a real allocation in that layout would have."""
    import torch

    return torch.empty(shape, dtype=_dt(dtype), device="meta",
                       memory_format=torch.channels_last if channels_last else torch.contiguous_format)


def _int_meta(n: int):
    import torch

    return torch.empty(n, dtype=torch.int32, device="meta")


# --- one entry per kernel: the launch, its heuristic and candidates, the layouts and variants it runs at ------
def _cg(case: Case, cfg, prec: str):
    from gam_triton.ops import channel_gate as op

    b, c, cr, h, w = case.batch, case.channels, case.channels // case.rate, case.height, case.width
    x = _meta((b, c, h, w), case.dtype, case.layout == "cl")
    out = _meta((b, c, h, w), case.dtype, case.layout != "nchw")          # x1 keeps x's dtype (autocast too)
    w1, w2, b1, b2 = (_meta(s, case.wdt) for s in ((cr, c), (c, cr), (cr,), (c,)))
    return op.launch_args(x, w1, b1, w2, b2, case.flag("sigmoid"), out, cfg, prec)


def _cg_bwd(case: Case, cfg, prec: str):
    from gam_triton.ops import channel_gate as op

    b, c, cr, h, w = case.batch, case.channels, case.channels // case.rate, case.height, case.width
    x = _meta((b, c, h, w), case.dtype, case.layout == "cl")
    g_cl = case.layout != "nchw"              # x1's gradients take x1's layout
    ga, gb = _meta((b, c, h, w), case.dtype, g_cl), _meta((b, c, h, w), case.wdt, g_cl)
    w1, w2, b1, b2 = (_meta(s, case.wdt) for s in ((cr, c), (c, cr), (cr,), (c,)))
    n = b * h * w
    return op.bwd_launch_args(x, ga, gb, w1, b1, w2, b2, case.flag("sigmoid"), _meta((b, c, h, w), case.dtype,
                              case.layout == "cl"), _meta((n, c + cr), case.wdt), _meta((n, cr), case.wdt),
                              _int_meta(1), _meta((cr,), case.wdt), _meta((c,), case.wdt), cfg, prec)


def _fg(case: Case, cfg, prec: str):
    from gam_triton.ops import elementwise as op

    shape = (case.batch, case.channels, case.height, case.width)
    x1_cl, out_cl = case.layout != "nchw", case.layout == "cl"
    x1, y2, out = _meta(shape, case.dtype, x1_cl), _meta(shape, case.wdt, x1_cl), _meta(shape, case.dtype, out_cl)
    return op.final_gate_launch_args(x1, y2, _meta((case.channels,), "fp32"), _meta((case.channels,), "fp32"),
                                     0 if case.flag("noshuffle") else 4, out, cfg)


def _br(case: Case, cfg, prec: str):
    from gam_triton.ops import elementwise as op

    c, cl = case.channels // case.rate, case.layout == "cl"
    shape = (case.batch, c, case.height, case.width)
    return op.bn_relu_launch_args(_meta(shape, case.wdt, cl), _meta((c,), "fp32"), _meta((c,), "fp32"),
                                  _meta(shape, case.wdt, cl), cfg)


def _bn(case: Case):
    """(mode, channels, y, g, x1 or None) of one BatchNorm of the training path: "bn1:..." BN1 + ReLU over y1
    (C/r channels), "bn2:..." BN2 + sigmoid + shuffle + final gate over y2 (C); after the colon y's layout, and
    ">nchw" when the block's output (and its gradient) is NCHW."""
    which, lay = case.layout.split(":")
    b, h, w = case.batch, case.height, case.width
    c = case.channels // case.rate if which == "bn1" else case.channels
    y_cl = lay.startswith("cl")
    y = _meta((b, c, h, w), case.wdt, y_cl)             # y1, y2: convolution outputs (the autocast dtype)
    g = _meta((b, c, h, w), case.wdt if which == "bn1" else case.dtype, y_cl if which == "bn1" else lay == "cl")
    x1 = None if which == "bn1" else _meta((b, c, h, w), case.dtype, y_cl)
    return (0 if which == "bn1" else 1), c, y, g, x1


def _bn_stats(case: Case, cfg, prec: str):
    import torch

    from gam_triton.ops import batchnorm as op

    _mode, c, y, _g, _x1 = _bn(case)
    prm = None if case.flag("noaffine") else _meta((c,), case.dtype)
    running = (_meta((c,), case.dtype), _meta((c,), case.dtype), torch.empty((), dtype=torch.int64, device="meta"))
    return op.stats_launch_args(y, prm, prm, running, 1e-5, -1.0 if case.flag("cumulative") else 0.1,
                                not case.flag("noupdate"), _int_meta(op.counter_slots(c)), _meta((4, c), "fp32"), cfg)


def _bn_reduce(case: Case, cfg, prec: str):
    from gam_triton.ops import batchnorm as op

    mode, c, y, g, x1 = _bn(case)
    prm = None if case.flag("noaffine") else _meta((c,), case.dtype)
    return op.reduce_launch_args(mode, g, x1, y, _meta((4, c), "fp32"), _meta((2, c), "fp32"), prm, prm,
                                 4 if mode and not case.flag("noshuffle") else 0, _int_meta(op.counter_slots(c)), cfg)


def _bn_apply(case: Case, cfg, prec: str):
    from gam_triton.ops import batchnorm as op

    mode, c, y, g, x1 = _bn(case)
    dx1 = None if x1 is None else _meta(tuple(x1.shape), case.dtype, x1.stride(1) == 1)
    return op.apply_launch_args(mode, g, x1, y, _meta((4, c), "fp32"), _meta((2, c), "fp32"),
                                _meta(tuple(y.shape), case.wdt, y.stride(1) == 1), dx1,
                                4 if mode and not case.flag("noshuffle") else 0, cfg)


def _conv_dims(case: Case) -> tuple[int, int, int, str]:
    """(groups, cin_g, cout_g, x1's layout) of a convolution case: "g4:..." grouped (groups = r), "g1:..." plain;
    as the module packs them (``conv.pack_spatial``: merged groups, z1's channels per group padded to 16)."""
    from gam_triton.ops import conv as op

    head, lay = case.layout.split(":")
    g, c, cr = (case.rate if head == "g4" else 1), case.channels, case.channels // case.rate
    pk = op.pack_spatial(_meta((cr, c // g, 1, 1), case.dtype), _meta((cr,), case.dtype),
                         _meta((c, cr // g, 1, 1), case.dtype), g)
    wp, cin = (pk[0], c) if case.kernel == "conv_bn_relu" else (pk[2], pk[0].shape[3])
    groups = cin // wp.shape[2]
    return groups, wp.shape[2], wp.shape[3] // groups, lay


def _conv1(case: Case, cfg, prec: str):
    from gam_triton.ops import conv as op

    g, cin_g, cout_g, lay = _conv_dims(case)
    b, h, w = case.batch, case.height, case.width
    return op.conv1_launch_args(_meta((b, cin_g * g, h, w), case.dtype, lay != "nchw"),
                                _meta((7, 7, cin_g, cout_g * g), case.dtype), _meta((cout_g * g,), case.dtype),
                                _meta((b, cout_g * g, h, w), case.dtype, True), cfg, prec)


def _conv2(case: Case, cfg, prec: str):
    from gam_triton.ops import conv as op

    g, cin_g, cout_g, lay = _conv_dims(case)
    b, c, h, w = case.batch, cout_g * g, case.height, case.width
    return op.conv2_launch_args(_meta((b, cin_g * g, h, w), case.dtype, True), _meta((7, 7, cin_g, c), case.dtype),
                                None if case.flag("nobias") else _meta((c,), case.dtype), _meta((c,), "fp32"),
                                _meta((c,), "fp32"), _meta((b, c, h, w), case.dtype, lay != "nchw"),
                                0 if case.flag("noshuffle") else 4, _meta((b, c, h, w), case.dtype, lay == "cl"),
                                cfg, prec)


def _heur_cg(case: Case, candidates: bool = False):
    from gam_triton.ops import channel_gate as op

    f = (op.candidates if candidates else op.heuristic) if case.kernel == "channel_gate" else \
        (op.bwd_candidates if candidates else op.bwd_heuristic)
    args = (case.channels, case.channels // case.rate, case.hw, _dt(case.wdt))  # the dots' dtype: the weights'
    if candidates:
        return f(*args, x_dtype=_dt(case.dtype)) if case.kernel == "channel_gate_bwd" else f(*args)
    from gam_triton.ops import _autotune

    return f(*args, target="gpu", x_dtype=_dt(case.dtype), batch=_autotune.pixels(case.batch, case.hw)[1])


def _heur_ew(case: Case, candidates: bool = False):
    from gam_triton.ops import elementwise as op

    c = case.channels if case.kernel == "final_gate" else case.channels // case.rate
    cl = case.layout != "nchw"
    return op.candidates(c, case.hw, cl) if candidates else op.heuristic(c, case.hw, cl, target="gpu")


def _heur_bn(case: Case, candidates: bool = False):
    from gam_triton.ops import batchnorm as op

    mode, c, y, _g, _x1 = _bn(case)
    cfg = op.heuristic(c, case.batch * case.hw, y.stride(1) == 1, target="gpu",
                       gather=mode == 1 and case.kernel != "bn_stats")
    return [cfg] if candidates else cfg


def _heur_conv(case: Case, candidates: bool = False):
    from gam_triton.ops import conv as op

    _g, cin_g, cout_g, _lay = _conv_dims(case)
    f = op.candidates if candidates else op.heuristic
    return f(cin_g, cout_g, case.hw, _dt(case.dtype)) if candidates else f(cin_g, cout_g, case.hw, _dt(case.dtype),
                                                                             target="gpu")


def _cg_prec(case: Case) -> str:
    """The INPUT_PRECISION the channel gate's launch is given: ``dot_precision``'s answer for fp32 dots."""
    return case.precision or "tf32"


def _conv_prec(case: Case) -> str:
    return case.precision or "tf32"


@dataclass(frozen=True)
class Entry:
    """How one kernel is launched, tiled and run by the module. ``layouts``: (fp32 runs, fp16/bf16 and autocast
    runs), as the module produces them on CUDA (x1 channels_last when x is, and always in half precision or under
    autocast; the block's output in x's layout). ``variants``: the constexpr flags it can take. ``autocast``:
    whether it sees autocast's mixed dtypes. ``precisions``: the fp32 dot precisions it is launched with."""

    launch: Callable
    heuristic: Callable
    layouts: tuple
    variants: tuple = ("",)
    autocast: bool = True
    precisions: tuple = ("",)
    prec: Callable = _cg_prec


_X = (("nchw", "cl"), ("nchw>cl", "cl"))       # x NCHW / channels_last; x1 as the module writes it
_BN = (("bn1:nchw", "bn1:cl", "bn2:nchw", "bn2:cl"), ("bn1:cl", "bn2:cl", "bn2:cl>nchw"))
KERNELS = {
    "channel_gate": Entry(_cg, _heur_cg, _X, ("", "sigmoid"), precisions=("ieee", "tf32")),
    "channel_gate_bwd": Entry(_cg_bwd, _heur_cg, _X, ("", "sigmoid"), precisions=("ieee", "tf32")),
    "final_gate": Entry(_fg, _heur_ew, (("nchw", "cl"), ("cl>nchw", "cl")), ("", "noshuffle")),
    "bn_relu": Entry(_br, _heur_ew, (("nchw", "cl"), ("cl",))),
    "bn_stats": Entry(_bn_stats, _heur_bn, _BN, ("", "noaffine", "cumulative", "noupdate")),
    "bn_bwd_reduce": Entry(_bn_reduce, _heur_bn, _BN, ("", "noaffine", "noshuffle")),
    "bn_bwd_apply": Entry(_bn_apply, _heur_bn, _BN, ("", "noshuffle")),
    "conv_bn_relu": Entry(_conv1, _heur_conv, (("g4:nchw", "g4:cl", "g1:nchw", "g1:cl"), ("g4:cl", "g1:cl")),
                          autocast=False, precisions=("tf32", "tf32x3"), prec=_conv_prec),
    "conv_gate": Entry(_conv2, _heur_conv, (("g4:nchw", "g4:cl", "g1:nchw", "g1:cl"),
                                            ("g4:cl>nchw", "g4:cl", "g1:cl>nchw", "g1:cl")),
                       ("", "noshuffle", "nobias", "noshuffle,nobias"), autocast=False, precisions=("tf32", "tf32x3"),
                       prec=_conv_prec),
}
#: Odd maps (classifier-style 224 inputs): H*W not a multiple of 16, so the pixel strides lose the divisibility hint.
ODD_MAPS = ((256, 14), (512, 14), (512, 7), (1024, 7))


def sweep_pairs() -> list[tuple[int, int]]:
    from bench import yolo_pairs

    return yolo_pairs()


def _fused(case: Case) -> bool:
    """The module launches the channel gate's kernels for this case (fp32 over 128 hidden channels may run as
    PyTorch GEMMs instead: ``channel_gate.fused``)."""
    if not case.kernel.startswith("channel_gate"):
        return True
    from gam_triton.ops import channel_gate as op

    return op.fused(_dt(case.wdt), case.channels // case.rate, case.kernel == "channel_gate_bwd", target="gpu")


def space(kernel: str, batches: Iterable[int] = range(1, 33), pairs: Optional[list] = None) -> Iterable[Case]:
    """Every launch of ``kernel`` the module makes on CUDA over the sweep's shapes and the odd maps."""
    e = KERNELS[kernel]
    pairs = [(c, s, "sweep") for c, s in (pairs or sweep_pairs())] + [(c, s, "odd-map") for c, s in ODD_MAPS]
    dtypes = [("fp32", ""), ("fp16", ""), ("bf16", "")] + ([("fp32", "bf16"), ("fp32", "fp16")] if e.autocast else [])
    for c, s, origin in pairs:
        for xdt, adt in dtypes:
            half = xdt != "fp32" or bool(adt)
            for prec in (e.precisions if (adt or xdt) == "fp32" else ("",)):
                for var in e.variants:
                    for lay in e.layouts[half]:
                        for b in batches:
                            case = Case(kernel, c, s, s, xdt, lay, prec, var, b, adt, origin)
                            if _fused(case):
                                yield case


# --- specialisation and the compile key ----------------------------------------------------------------------
_DT = {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16", "int32": "i32", "int64": "i64"}


def specialise(kernel, args: tuple, kwargs: dict) -> dict:
    """The compile job Triton's JIT makes of ``kernel[grid](*args, **kwargs)``: signature, constexprs,
    divisibility attributes and options (num_warps, num_stages), as plain data."""
    names = list(kernel.arg_names)
    values = dict(zip(names, args))
    values.update({k: v for k, v in kwargs.items() if k in names})
    options = {k: v for k, v in kwargs.items() if k not in names}
    consts = {p.name for p in kernel.params if p.is_constexpr}
    plain = {p.name for p in kernel.params if getattr(p, "do_not_specialize", False)}  # @jit(do_not_specialize)
    signature, constexprs, divisible = {}, {}, []
    for name in names:
        v = values[name]
        if name in consts or v is None:
            signature[name], constexprs[name] = "constexpr", v
        elif isinstance(v, bool):
            signature[name] = "i1"
        elif isinstance(v, int) and name in plain:
            signature[name] = "i32" if -(2**31) <= v < 2**31 else "i64"
        elif isinstance(v, int):
            if v == 1:  # Triton specialises 1 into a constant
                signature[name], constexprs[name] = "constexpr", 1
                continue
            signature[name] = "i32" if -(2**31) <= v < 2**31 else "i64"
            if v % 16 == 0:
                divisible.append(name)
        elif isinstance(v, float):
            signature[name] = "fp32"
        else:  # a tensor: allocations are 16-byte aligned
            signature[name] = "*" + _DT[str(v.dtype).replace("torch.", "")]
            if (v.storage_offset() * v.element_size()) % 16 == 0:
                divisible.append(name)
    return {"signature": signature, "constexprs": constexprs, "divisible": divisible, "options": options}


def _ref(kernel) -> str:
    return f"{kernel.fn.__module__}:{kernel.fn.__name__}"


def compile_key(kernel, spec: dict) -> str:
    """The identity of a compiled binary: the kernel and its specialisation (Triton's JIT key, as data)."""
    return json.dumps([_ref(kernel), spec], sort_keys=True, default=str)


def job_key(kernel, spec: dict, cc: int) -> str:
    """Cache key of one compile: the kernel's source (Triton's cache_key covers its callees), the Triton version,
    the specialisation, the target."""
    import triton

    payload = json.dumps([kernel.cache_key, triton.__version__, spec, cc], sort_keys=True, default=str)
    return hashlib.sha256(payload.encode()).hexdigest()[:32]


# --- compiling (in worker processes) -------------------------------------------------------------------------
_PTXAS = {k: re.compile(p) for k, p in (("regs", r"Used (\d+) registers"), ("stores", r"(\d+) bytes spill stores"),
                                        ("loads", r"(\d+) bytes spill loads"))}


def _sm(cc: int) -> str:
    return f"sm_{cc}a" if cc >= 90 else f"sm_{cc}"


def _ptxas_log(ptx: str, cc: int) -> str:
    """ptxas -v run here on the PTX (Triton 3.4, which has no TRITON_DUMP_PTXAS_LOG: its ptxas runs with
    no extra register-allocation flag)."""
    import inspect

    from triton.backends.nvidia.compiler import get_ptxas

    ptxas = (get_ptxas(cc) if inspect.signature(get_ptxas).parameters else get_ptxas()).path
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "k.ptx")
        with open(path, "w") as f:
            f.write(ptx)
        return subprocess.run([ptxas, "-lineinfo", "-v", f"--gpu-name={_sm(cc)}", path, "-o", path + ".o"],
                              capture_output=True, text=True).stderr


def compile_job(ref: str, spec: dict, cc: int) -> dict:
    """Compile one specialisation for ``cc``; its compile facts (a config that does not compile is a fact)."""
    import importlib

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    mod, name = ref.split(":")
    kernel = getattr(importlib.import_module(mod), name)
    names = list(kernel.arg_names)
    src = ASTSource(fn=kernel, signature=dict(spec["signature"]),
                    constexprs={(names.index(k),): v for k, v in spec["constexprs"].items()},
                    attrs={(names.index(k),): [["tt.divisibility", 16]] for k in spec["divisible"]})
    t0, out = time.perf_counter(), io.StringIO()
    try:
        with contextlib.redirect_stdout(out):  # TRITON_DUMP_PTXAS_LOG=1 (Triton >= 3.6) prints Triton's own log
            k = triton.compile(src, target=GPUTarget("cuda", cc, 32), options=dict(spec["options"]))
    except Exception as e:  # noqa: BLE001
        return {"ok": False, "error": f"{type(e).__name__}: {(str(e).splitlines() or [''])[0][:200]}"}
    log = out.getvalue() if "registers" in out.getvalue() else _ptxas_log(k.asm["ptx"], cc)
    facts = {k_: max((int(v) for v in rx.findall(log)), default=0) for k_, rx in _PTXAS.items()}
    return {"ok": True, "error": "", "regs": facts["regs"], "spill": facts["stores"] + facts["loads"],
            "smem": int(k.metadata.shared), "tc": next((n for n, p in TC_PATTERNS if p in k.asm["ptx"]), "none"),
            "seconds": round(time.perf_counter() - t0, 2)}


def _worker_init() -> None:
    os.environ.pop("TRITON_INTERPRET", None)
    os.environ["TRITON_ALWAYS_COMPILE"] = "1"    # a Triton cache hit would skip ptxas, and its log
    os.environ["TRITON_DUMP_PTXAS_LOG"] = "1"
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    import warnings

    warnings.filterwarnings("ignore")


def _worker(job):
    return compile_job(*job)


def facts_path(version: Optional[str] = None) -> str:
    import triton

    return os.path.join(DEFAULT_OUT, "facts", f"triton-{version or triton.__version__}.json")


class TooManyCompiles(RuntimeError):
    """More of the space is missing from the committed facts than ``--max-compiles`` allows."""


class Compiler:
    """Compiles jobs once each (the facts file across runs), in a pool of ``jobs`` processes."""

    def __init__(self, cache_path: Optional[str], jobs: int, log=print, max_compiles: Optional[int] = None) -> None:
        self.cache_path, self.jobs, self.log, self.compiled = cache_path, max(1, jobs), log, 0
        self.max_compiles, self.compiled_now = max_compiles, {}
        try:
            with open(cache_path) as f:
                self.cache = json.load(f)
        except (TypeError, OSError, ValueError):
            self.cache = {}

    def run(self, jobs: dict) -> dict:
        """``jobs``: key -> (ref, spec, cc). Returns key -> facts (from the file or compiled now)."""
        todo = [(k, j) for k, j in jobs.items() if k not in self.cache]
        if self.max_compiles is not None and len(todo) > self.max_compiles:
            raise TooManyCompiles(f"{len(todo)} of {len(jobs)} compiles are not in {self.cache_path} (more than "
                                  f"{self.max_compiles}): a kernel or heuristic changed; run `make compile-check`")
        if todo:
            self.log(f"compiling {len(todo)} ({len(jobs) - len(todo)} cached) on {self.jobs} process(es)...")
            t0 = time.perf_counter()
            if self.jobs == 1:
                _worker_init()
                results = map(_worker, [j for _, j in todo])
                pool = None
            else:
                import multiprocessing as mp
                from concurrent.futures import ProcessPoolExecutor

                pool = ProcessPoolExecutor(self.jobs, mp_context=mp.get_context("spawn"), initializer=_worker_init)
                results = pool.map(_worker, [j for _, j in todo], chunksize=1)
            try:
                for n, ((k, _), res) in enumerate(zip(todo, results), 1):
                    self.cache[k], self.compiled = res, self.compiled + 1
                    self.compiled_now[k] = res
                    if n % 25 == 0:
                        self.log(f"  {n}/{len(todo)} ({time.perf_counter() - t0:.0f} s)")
                        self._save()
            finally:
                if pool is not None:
                    pool.shutdown()
                self._save()
            self.log(f"  done in {time.perf_counter() - t0:.0f} s")
        return {k: self.cache[k] for k in jobs}

    def _save(self, keep: Optional[set] = None) -> None:
        """Write the facts (``keep``: only these keys: the current space's)."""
        if self.cache_path:
            data = {k: v for k, v in self.cache.items() if keep is None or k in keep}
            os.makedirs(os.path.dirname(self.cache_path), exist_ok=True)
            with open(self.cache_path + ".tmp", "w") as f:
                json.dump(data, f, sort_keys=True, indent=0)
            os.replace(self.cache_path + ".tmp", self.cache_path)

    def verify(self, jobs: dict, n: int, seed: int = 0) -> list[str]:
        """Compile ``n`` of ``jobs`` found in the file again: the differences (registers, spills, success)."""
        import random

        found = sorted(k for k in jobs if k in self.cache and self.compiled_now.get(k) is None)
        out = []
        _worker_init()
        for k in random.Random(seed).sample(found, min(n, len(found))):
            got, want = compile_job(*jobs[k]), self.cache[k]
            if [got.get(f) for f in ("ok", "regs", "spill")] != [want.get(f) for f in ("ok", "regs", "spill")]:
                out.append(f"{jobs[k][0]} sm_{jobs[k][2]}: the file says {want.get('regs')} registers / "
                           f"{want.get('spill')} B, a compile gives {got.get('regs')} / {got.get('spill')}")
        return out


# --- the check -----------------------------------------------------------------------------------------------
FIELDS = ("kernel", "arch", "source", "case", "members", "dtype", "wdtype", "precision", "layout", "variant",
          "BLOCK_P", "BLOCK_C", "BLOCK_R", "BLOCK_N", "BLOCK_K", "num_warps", "num_stages", "maxnreg", "ok", "regs",
          "spill_bytes", "shared_bytes", "smem_ok", "warps_per_sm", "tc", "error")


def plan(kernels: Iterable[str], batches, candidates: bool) -> list:
    """[(kernel, case, config, source, members, kernel fn, spec)]: one per distinct compile of the space."""
    out, seen = [], {}
    for name in kernels:
        e = KERNELS[name]
        for case in space(name, batches):
            cfgs = [("heuristic", e.heuristic(case))]
            if candidates and case.batch == 16 and case.origin == "sweep":
                cfgs += [("candidate", c) for c in e.heuristic(case, candidates=True)]
            for source, cfg in cfgs:
                kernel, _grid, args, kwargs = e.launch(case, cfg, e.prec(case))
                spec = specialise(kernel, args, kwargs)
                key = (compile_key(kernel, spec), source)
                item = seen.get(key)
                if item is None:
                    seen[key] = item = [name, case, cfg, source, 0, kernel, spec]
                    out.append(item)
                item[4] += 1
    return out


def check(items: list, archs, compiler: Compiler) -> list[dict]:
    """Compile every planned item for every arch; one row each."""
    jobs = {job_key(it[5], it[6], cc): (_ref(it[5]), it[6], cc) for it in items for cc in archs}
    facts = compiler.run(jobs)
    compiler.jobs_checked = jobs
    rows = []
    for name, case, cfg, source, members, kernel, spec in items:
        for cc in archs:
            f, arch = facts[job_key(kernel, spec, cc)], ARCHS[cc]
            smem = f.get("smem", 0)
            rows.append(dict(
                kernel=name, arch=_sm(cc), source=source, case=case.label(), members=members, dtype=case.dtype,
                wdtype=case.wdtype, precision=case.precision, layout=case.layout, variant=case.variant,
                **{k: cfg.kwargs.get(k, "") for k in ("BLOCK_P", "BLOCK_C", "BLOCK_R", "BLOCK_N", "BLOCK_K")},
                num_warps=cfg.num_warps, num_stages=cfg.num_stages, maxnreg=cfg.maxnreg or "", ok=f["ok"],
                regs=f.get("regs", ""),
                spill_bytes=f.get("spill", ""), shared_bytes=smem, smem_ok=smem <= arch.smem_per_block,
                warps_per_sm=arch.warps_per_sm(f["regs"], smem, cfg.num_warps) if f["ok"] else 0,
                tc=f.get("tc", ""), error=f.get("error", "")))
    return rows


def problems(rows: list[dict]) -> list[str]:
    """Heuristic rows that spill, fail, overflow shared memory, or run a half-precision dot off the tensor cores."""
    out = []
    for r in rows:
        if r["source"] != "heuristic":
            continue
        half_dot = r["kernel"] in DOT_KERNELS and (r["wdtype"] or r["dtype"]) != "fp32"
        why = ("does not compile: " + r["error"]) if not r["ok"] else f"spills {r['spill_bytes']} B" \
            if r["spill_bytes"] else "needs more shared memory than the arch has" if not r["smem_ok"] else \
            "no tensor-core instruction" if half_dot and r["tc"] == "none" else ""
        if why:
            out.append(f"{r['kernel']} {r['case']} {r['arch']} (regs {r['regs']}): {why}")
    return out


def summary(rows: list[dict], items: list, seconds: float, args) -> str:
    """report.md: per kernel and arch, the compiles, the cases they stand for, the worst facts."""
    import torch
    import triton

    lines = [f"# Compile check\n\nGenerated by `perf/compile_check.py` (Triton "
             f"{triton.__version__}, torch {torch.__version__}, ptxas from the triton wheel), "
             f"{time.strftime('%Y-%m-%d')}. **Compile facts, not timings**: registers, spill bytes (stores + loads) "
             "and shared memory per compile, resident warps per SM from them. Every distinct compile of the space "
             f"(launches the module makes, batches {args.batches}); {len(items)} compiles per arch, "
             f"{sum(it[4] for it in items)} launches of the space, {seconds:.0f} s.\n",
             "| kernel | source | arch | compiles | launches covered | max regs | max spill B | max smem B | "
             "warps/SM (min) | tensor cores | failed |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    groups: dict = {}
    for r in rows:
        groups.setdefault((r["kernel"], r["source"], r["arch"]), []).append(r)
    for (k, src, arch), rs in sorted(groups.items()):
        ok = [r for r in rs if r["ok"]]
        tcs = sorted({r["tc"] for r in ok})
        lines.append(f"| {k} | {src} | {arch} | {len(rs)} | {sum(r['members'] for r in rs)} | "
                     f"{max((r['regs'] for r in ok), default=0)} | {max((r['spill_bytes'] for r in ok), default=0)} | "
                     f"{max((r['shared_bytes'] for r in ok), default=0)} | "
                     f"{min((r['warps_per_sm'] for r in ok), default=0)} | {', '.join(tcs)} | {len(rs) - len(ok)} |")
    bad = problems(rows)
    lines += ["", f"**Heuristic problems: {len(bad)}**" + ("" if bad else " (none)")] + [f"- {b}" for b in bad[:50]]
    return "\n".join(lines) + "\n"


# --- self-test ------------------------------------------------------------------------------------------------
def check_specialisation() -> list[str]:
    """:func:`specialise`'s rules against this Triton's own ``specialize_impl`` on real CPU values (ints 1, 16, 48,
    49, 2**31; tensors at element offsets 0 and 1): the mismatches."""
    import torch
    import triton
    from triton.backends.compiler import BaseBackend

    try:
        from triton._C.libtriton import native_specialize_impl

        def spec(v):
            return native_specialize_impl(BaseBackend, v, False, True, True)
    except ImportError:  # Triton 3.4: the Python specialize_impl
        from triton.runtime.jit import create_specialize_impl

        impl = create_specialize_impl(BaseBackend.get_arg_specialization)

        def spec(v):
            return impl(v, False, True, True)
    bad, base = [], torch.zeros(64, dtype=torch.float16)
    values = [("int", 1), ("int", 16), ("int", 48), ("int", 49), ("int", 2**31), ("ptr", base), ("ptr", base[1:])]
    for kind, v in values:
        ty, key = spec(v)[:2]
        divisible = bool(key) and "D" in str(key)
        if kind == "int":
            mine_ty = "constexpr" if v == 1 else ("i32" if -(2**31) <= v < 2**31 else "i64")
            mine_d = v != 1 and v % 16 == 0
        else:
            mine_ty, mine_d = "*fp16", (v.storage_offset() * v.element_size()) % 16 == 0
        if str(ty) != mine_ty or divisible != mine_d:
            bad.append(f"Triton {triton.__version__}: {kind} {v if kind == 'int' else v.storage_offset()}: "
                       f"triton ({ty}, {key}) against specialise ({mine_ty}, {'D' if mine_d else ''})")
    return bad


def self_test() -> None:
    """Keys split what compiles differently and merge what does not; the space holds every dimension's values;
    the specialisation rules are Triton's; one real compile gives registers and tensor-core instructions."""
    e = KERNELS["final_gate"]

    def key(case):
        kernel, _g, a, kw = e.launch(case, e.heuristic(case), "")
        return compile_key(kernel, specialise(kernel, a, kw))

    a = Case("final_gate", 64, 7, 7, "fp16", "nchw")
    assert key(a) == key(replace(a, batch=3)), "the batch does not enter the final gate's binary"
    assert key(a) == key(replace(a, height=14, width=14)), "H*W 49 and 196: neither divisible by 16"
    assert key(a) != key(replace(a, height=8, width=8)), "H*W = 64 is divisible by 16"
    assert key(a) != key(replace(a, dtype="fp32", wdtype="bf16")), "autocast's y2 dtype"
    assert key(a) != key(replace(a, variant="noshuffle"))
    g = KERNELS["channel_gate"]
    import triton

    def cg_key(case, cfg):
        kernel, _g, a_, kw = g.launch(case, cfg, "tf32")
        return compile_key(kernel, specialise(kernel, a_, kw))

    c64, c128 = Case("channel_gate", 64, 20, 20, "bf16", "nchw"), Case("channel_gate", 128, 20, 20, "bf16", "nchw")
    one, two = (triton.Config(dict(BLOCK_P=32, BLOCK_C=bc, BLOCK_R=32), num_warps=4, num_stages=2) for bc in (64, 32))
    assert cg_key(c64, two) != cg_key(c128, two) == cg_key(c128, two), "N_CHUNKS 2 and 4: maybe unrolled"
    assert cg_key(c64, one) != cg_key(c64, two), "the tile"
    bwd = KERNELS["channel_gate_bwd"]

    def bwd_key(case):
        kernel, _g, a_, kw = bwd.launch(case, bwd.heuristic(case), "tf32")
        return compile_key(kernel, specialise(kernel, a_, kw))

    b = Case("channel_gate_bwd", 64, 20, 20, "bf16", "nchw", batch=3)
    assert bwd_key(b) == bwd_key(replace(b, batch=5)), "the batch enters the backward only through its runtime sizes"
    cases = list(space("channel_gate", batches=(1,)))
    assert {(c.dtype, c.wdtype) for c in cases} == {("fp32", ""), ("fp16", ""), ("bf16", ""), ("fp32", "bf16"),
                                                    ("fp32", "fp16")}
    assert {c.precision for c in cases if c.wdt == "fp32"} == {"ieee", "tf32"}
    assert {c.layout for c in cases} == {"nchw", "nchw>cl", "cl"} and {c.variant for c in cases} == {"", "sigmoid"}
    assert {c.origin for c in cases} == {"sweep", "odd-map"}
    items = plan(["bn_stats"], (1, 16), False)
    assert sum(it[4] for it in items) == sum(1 for _ in space("bn_stats", (1, 16))), "every launch has one compile"
    bad = check_specialisation()
    assert not bad, bad
    _worker_init()
    kernel, _g, args_, kw = g.launch(Case("channel_gate", 64, 20, 20, "bf16", "nchw"), one, "tf32")
    f = compile_job(_ref(kernel), specialise(kernel, args_, kw), 90)
    assert f["ok"] and f["regs"] > 0 and f["tc"] in ("wgmma", "mma"), f
    print("compile_check self-test: ok")


def main(argv: Optional[list] = None) -> int:
    _reexec_without_interpreter()
    ap = argparse.ArgumentParser(prog="perf/compile_check.py", description=__doc__.split("\n\n")[0])
    ap.add_argument("--kernels", default=",".join(KERNELS), help="comma-separated subset of " + ",".join(KERNELS))
    ap.add_argument("--archs", default="80,90,100")
    ap.add_argument("--batches", default="1-32", help="batches of the space: 1-32 (default) or a list, 1,16")
    ap.add_argument("--candidates", action="store_true", help="the tuner's candidates too (sweep shapes, B16)")
    ap.add_argument("--check", action="store_true", help="exit 1 on a heuristic problem (spill, failure, ...)")
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--out", default=DEFAULT_OUT, help="where report.csv and report.md go")
    ap.add_argument("--facts", default=None, help="the facts file (default perf/compile/facts/triton-<version>.json)")
    ap.add_argument("--no-facts", action="store_true", help="compile everything, read and write no facts file")
    ap.add_argument("--max-compiles", type=int, default=None,
                    help="fail (exit 2) when more compiles than this are missing from the facts file")
    ap.add_argument("--verify", type=int, default=0, help="compile N entries found in the facts file again")
    ap.add_argument("--self-test", action="store_true", help="the keys, the space and Triton's specialisation rules")
    ap.add_argument("--keep-facts", action="store_true",
                    help="write back only what this run compiled, without pruning the entries of other spaces")
    args = ap.parse_args(argv)
    if args.self_test:
        self_test()
        return 0
    lo, _, hi = args.batches.partition("-")
    batches = range(int(lo), int(hi) + 1) if hi else [int(b) for b in args.batches.split(",")]
    kernels = [k for k in args.kernels.split(",") if k]
    unknown = set(kernels) - set(KERNELS)
    if unknown:
        ap.error(f"unknown kernels: {', '.join(sorted(unknown))}")
    archs = [int(a) for a in args.archs.split(",")]
    t0 = time.perf_counter()
    items = plan(kernels, batches, args.candidates)
    print(f"compile_check: {len(items)} distinct compiles per arch ({sum(it[4] for it in items)} launches), "
          f"planned in {time.perf_counter() - t0:.0f} s")
    compiler = Compiler(None if args.no_facts else (args.facts or facts_path()), args.jobs,
                        max_compiles=args.max_compiles)
    try:
        rows = check(items, archs, compiler)
    except TooManyCompiles as e:
        print(f"compile_check: {e}")
        return 2
    full = args.kernels == ",".join(KERNELS) and args.archs == "80,90,100" and not args.candidates
    if compiler.compiled and full and not args.keep_facts:
        compiler._save(keep=set(compiler.jobs_checked))  # the file holds exactly the current space
    mismatch = compiler.verify(compiler.jobs_checked, args.verify) if args.verify else []
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "report.csv"), "w", newline="") as f:
        w = csv.DictWriter(f, FIELDS)
        w.writeheader()
        w.writerows(rows)
    text = summary(rows, items, time.perf_counter() - t0, args)
    with open(os.path.join(args.out, "report.md"), "w") as f:
        f.write(text)
    bad = problems(rows)
    print(f"compile_check: {len(rows)} rows, {compiler.compiled} compiled now, {len(bad)} heuristic problem(s), "
          f"{len(mismatch)} of {args.verify} verified entries differ; {os.path.join(args.out, 'report.md')}")
    for b in (bad + mismatch)[:40]:
        print("  " + b)
    return 1 if args.check and (bad or mismatch) else 0


if __name__ == "__main__":
    sys.exit(main())
