"""Compile check: every binary the GAM module launches, compiled ahead of time for sm_80/90/100, no GPU.

Capture. ``gam_triton.GAM`` runs over the space below on ``meta`` tensors, sent down its Triton path
(``_runtime.use_triton`` answers True; ``GAM._plan``, where a call is decided, sees a CUDA input), the tuner off
(``GAM_TRITON_AUTOTUNE=0``: heuristics); every launch is recorded, not run, at the one launch seam
``gam_triton.ops._runtime.launch(kernel, grid, args, kwargs)``. What CUDA does that meta does not, for the one op
the module runs outside its kernels (:func:`_cudnn_mode`): autocast casts a convolution's inputs to its dtype
(``_runtime.autocast_dtype`` answers it), and cuDNN makes its outputs and gradients channels_last when an input is.
No per-op code: whatever the ops launch, with whatever arguments, is compiled.

Space (:func:`space`): the sweep's YOLO shapes (C 64..1024 at 80/40/20) and odd maps (14x14, 7x7); batches 1, 16,
17 (sizes of 1 become constants; 16 is divisible by 16; 17 neither); fp32 (TF32 on and off through torch's flags),
fp16, bf16, autocast fp32->fp16/bf16; NCHW and channels_last; forms (:data:`FORMS`) and layer variants
(:data:`TWEAKS`); modes (:data:`MODES`): eval with the Triton convolutions (``GAM_TRITON_CONV=triton``), eval in
auto mode (cuDNN here: nothing can be timed), train steps (forward + backward), one BatchNorm frozen or none.

Binaries: launches deduplicated by what Triton's JIT specialises (:func:`specialise`: kernel, constexprs, options,
signature dtypes, ints equal to 1 as constants, ints and pointers divisible by 16, ``do_not_specialize`` honoured);
each distinct one compiled with ``triton.compile(ASTSource(...), target=GPUTarget("cuda", cc, 32))`` in workers. Per
binary and arch: registers and spill bytes (``ptxas -v``), shared memory (metadata), CTAs per SM (:class:`Arch`), the
tensor-core instruction in the PTX (mma.sync, wgmma, tcgen05), and issue 22's static figures:

* waves: per launch, CTAs / (132 SMs x CTAs per SM); per binary min..max over its launches.
* bytes in flight per SM, per launch: the CTAs an SM holds (the fewer of its resident CTAs and the grid's share
  of the busiest SM, ceil(CTAs / 132)) x bytes loaded per pipeline stage x stages. From the TTGIR: the global
  loads (``tt.load``, ``ttg.async_copy_global_to_local``) of the loop loading the most bytes per iteration (the
  whole kernel when no loop loads), times num_stages when that loop's loads are asynchronous (pipelined). Its
  target, per launch, is 20 KB, or all the launch reads per SM where that is less (``data_per_sm``: the distinct
  inputs ``traffic.KERNEL_IO`` names over 132 SMs): no more can be in flight. Per binary: its least, over launches.
* narrow loads in loops: PTX ``ld.global`` narrower than 4 bytes (vector width counted) between a label and a
  backward branch to it. Instructions per MMA: PTX instructions per tensor-core instruction in the loop with most.
* serial finalisation steps, busiest/median loads: measured. The launches of :data:`LOAD_CASES` (a headline shape)
  run in Triton's interpreter (a subprocess; the GPU heuristics' arguments, random data, zeroed integers) with its
  load patched to count, per program, the loads executed at each source line of the kernels. Busiest/median: the
  most loads a program executes over the median program's. Serial steps: max over load sites of (the most any
  program executes there - the median program's), i.e. the iterations of a tail only some programs run.

``--check`` exits 1 on a spill, a compile failure, shared memory over the arch's limit, a half-precision dot without
tensor-core instructions, and a miss of each :data:`TARGETS` entry named in ``--targets`` (memory-bound: all kernels
but ``conv_*``). Writes report.md, report.csv (per binary and arch) and launches.csv under ``--out`` (default
perf/compile/, not committed). Nothing is read from or kept in the repository: every run is cold. Compile facts and
static figures, not timings.

    python perf/compile_check.py [--subset full|sweep|ci] [--archs 80,90,100] [--check] [--targets waves,...]
                                 [--loads|--no-loads] [--jobs 2] [--out perf/compile] [--kernels NAME,...]
"""
from __future__ import annotations

import argparse
import collections
import contextlib
import csv
import io
import json
import math
import os
import pickle
import re
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass
from typing import Callable, Iterator, Optional
from unittest import mock

import torch

PERF_DIR = os.path.dirname(os.path.abspath(__file__))
REPO_DIR = os.path.dirname(PERF_DIR)
DEFAULT_OUT = os.path.join(PERF_DIR, "compile")

# --- the space, as data --------------------------------------------------------------------------------------
#: (channels, map) of the YOLO models at a 640 input (the sweep's shapes), and odd maps (224-input classifiers).
SWEEP = [(c, 80) for c in (64, 128, 192, 256, 320)] + [(c, 40) for c in (128, 256, 384, 512, 640)] + \
        [(c, 20) for c in (256, 512, 576, 640, 1024)]
ODD_MAPS = [(256, 14), (512, 14), (512, 7), (1024, 7)]
BATCHES = (1, 16, 17)
SWEEP_BATCH = 16                   # the batch the waves target is judged at
#: GAM constructor forms: the paper's, the YOLO form (groups = rate, shuffle), their crossings (grouping and shuffle
#: are independent constructor arguments), a fork with groups != rate.
FORMS = {"paper": dict(), "yolo": dict(group=True, channel_sigmoid=False, shuffle_groups=4),
         "plain_shuffle": dict(channel_sigmoid=False, shuffle_groups=4), "grouped_sigmoid": dict(group=True),
         "fork": dict(rate=8, groups=4, channel_sigmoid=False, shuffle_groups=4)}
#: Layer variants a converted block may carry, and the modes they matter in.
TWEAKS = {"": ("eval", "auto", "train", "bn1_frozen", "bn2_frozen"), "nobias": ("eval",),
          "noaffine": ("train",), "cumulative": ("train",), "noupdate": ("train",)}
MODES = ("eval", "auto", "train", "bn1_frozen", "bn2_frozen")
#: (input dtype, autocast dtype or None, fp32 TF32 allowed)
DTYPES = [("fp32", None, True), ("fp32", None, False), ("fp16", None, True), ("bf16", None, True),
          ("fp32", "fp16", True), ("fp32", "bf16", True)]
SUBSETS = {  # name: (shapes, batches, forms, tweaks)
    "full": (SWEEP + ODD_MAPS, BATCHES, tuple(FORMS), tuple(TWEAKS)),
    "sweep": (SWEEP, (SWEEP_BATCH,), ("paper", "yolo"), ("",)),   # the sweep's shapes as the GPU check runs them
    "ci": ([(256, 40)], (16,), ("yolo",), ("",)),         # every dtype, layout and mode at one sweep shape
}
#: The interpreter runs these (batch, C, map, form, dtype, layout, mode) to count loads per program.
LOAD_CASES = [(16, 64, 80, "yolo", "bf16", "cl", "train")]
SMS = 132                          # H100 / H200
MIB = "conv_"                      # kernels named conv_* are compute-bound: the issue-22 targets skip them


@dataclass(frozen=True)
class Case:
    """One call of the module: the input, the module, the mode (amp: autocast's dtype; tf32: torch's fp32 flags)."""
    batch: int; channels: int; size: int; form: str; tweak: str  # noqa: E702
    dtype: str; amp: Optional[str]; tf32: bool; layout: str; mode: str  # noqa: E702

    def label(self) -> str:
        d = f"{self.dtype}>{self.amp}" if self.amp else self.dtype + ("/ieee" if not self.tf32 else "")
        return f"B{self.batch} C{self.channels} {self.size}x{self.size} {self.form}{'+' * bool(self.tweak)}" \
               f"{self.tweak} {d} {self.layout} {self.mode}"


def space(subset: str = "full") -> Iterator[Case]:
    """The cases of a subset (layer variants on every form but the fork)."""
    shapes, batches, forms, tweaks = SUBSETS[subset]
    for c, s in shapes:
        for form in forms:
            for tweak in tweaks if form != "fork" else ("",):
                for mode in TWEAKS[tweak]:
                    for dt, amp, tf32 in DTYPES:
                        if amp and mode == "auto":   # under autocast eval is one path (no Triton convolutions)
                            continue
                        for layout in ("nchw", "cl"):
                            for b in batches:
                                yield Case(b, c, s, form, tweak, dt, amp, tf32, layout, mode)


# --- capture at the launch seam ------------------------------------------------------------------------------
Launch = collections.namedtuple("Launch", "kernel grid args kwargs case")


DT = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


_MODULES: dict = {}


def _build(case: Case):
    """A GAM of the case's form, tweak and dtype on meta (no memory; kept for the next case), in the case's mode."""
    from gam_triton import GAM

    key = (case.channels, case.form, case.tweak, case.dtype)
    if key in _MODULES:
        m = _MODULES[key]
    else:
        with torch.device("meta"):
            m = _MODULES[key] = GAM(case.channels, **FORMS[case.form]).to(DT[case.dtype])
    conv1, bn1, conv2, bn2 = (m.spatial_attention[i] for i in (0, 1, 3, 4))
    for bn in (bn1, bn2):
        if case.tweak == "noaffine":
            bn.weight, bn.bias, bn.affine = None, None, False
        if case.tweak == "cumulative":
            bn.momentum = None
        if case.tweak == "noupdate":
            bn.track_running_stats = False
    if case.tweak == "nobias":
        conv1.bias = conv2.bias = None
    m.train(case.mode not in ("eval", "auto"))
    if case.mode == "bn1_frozen":
        bn1.eval()
    if case.mode == "bn2_frozen":
        bn2.eval()
    return m


class OnCuda(torch.Tensor):
    """A meta tensor that says it is on CUDA (the module's plan reads ``x.is_cuda``); ops see a plain one."""
    __torch_function__ = torch._C._disabled_torch_function_impl
    is_cuda = property(lambda self: True)


def _cudnn_mode(amp):
    """What CUDA does to a convolution that meta does not: autocast's cast of its floating inputs to ``amp``, and
    cuDNN's layout rule (outputs channels_last when an input is; meta's CPU rule may differ)."""
    from torch.overrides import TorchFunctionMode
    from torch.utils._pytree import tree_map

    def cl(t) -> bool:
        return isinstance(t, torch.Tensor) and t.dim() == 4 and t.shape[1] > 1 and t.stride(1) == 1

    class CuDNN(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            name = getattr(func, "__name__", "")
            if name not in ("conv2d", "convolution", "convolution_backward"):
                return func(*args, **(kwargs or {}))
            if amp is not None and name != "convolution_backward":
                args = tuple(a.to(amp) if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in args)
            out = func(*args, **(kwargs or {}))
            if any(cl(a) for a in args):
                out = tree_map(lambda t: t.contiguous(memory_format=torch.channels_last)
                               if isinstance(t, torch.Tensor) and t.dim() == 4 else t, out)
            return out

    return CuDNN()


def capture(case: Case) -> list[Launch]:
    """The launches the module makes for one case (one eval call, or one train step), none executed."""
    from gam_triton import GAM
    from gam_triton.ops import _autotune, _runtime

    out: list[Launch] = []
    amp = DT[case.amp] if case.amp else None
    m = _build(case)
    fmt = torch.channels_last if case.layout == "cl" else torch.contiguous_format
    x = torch.empty((case.batch, case.channels, case.size, case.size), dtype=DT[case.dtype],
                    device="meta", memory_format=fmt)
    plan = GAM._plan
    train = case.mode not in ("eval", "auto")
    tf32 = "tf32" if case.tf32 else "ieee"
    with contextlib.ExitStack() as st:
        def patch(obj, name, value):
            st.enter_context(mock.patch.object(obj, name, value))
        st.enter_context(mock.patch.dict(os.environ, GAM_TRITON_AUTOTUNE="0",
                                         GAM_TRITON_CONV="triton" if case.mode == "eval" else "auto"))
        patch(_runtime, "use_triton", lambda t: True)
        patch(_runtime, "launch", lambda k, g, a, kw: out.append(Launch(k, g, a, kw, case)))
        patch(_runtime, "autocast_dtype", lambda device_type: amp)
        patch(GAM, "_plan", lambda self, t: plan(self, t.as_subclass(OnCuda)))  # CUDA's plan
        for backend in (torch.backends.cuda.matmul, torch.backends.cudnn.conv):  # TF32 as torch's flags say
            st.callback(setattr, backend, "fp32_precision", backend.fp32_precision)
            backend.fp32_precision = tf32
        _autotune.reset()
        st.enter_context(_cudnn_mode(amp))
        with torch.set_grad_enabled(train):
            y = m(x.requires_grad_(train))
            if train:
                y.backward(torch.empty_like(y))
    return out


# --- what Triton specialises ---------------------------------------------------------------------------------
_DT = {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16", "int32": "i32", "int64": "i64", "int8": "i8",
       "uint8": "u8", "bool": "i1", "float64": "fp64"}


def specialise(kernel, args: tuple, kwargs: dict) -> dict:
    """The compile job Triton's JIT makes of ``kernel[grid](*args, **kwargs)``: signature, constexprs,
    divisibility attributes and options, as plain data (rules checked against Triton's own by the tests)."""
    names = list(kernel.arg_names)
    values = dict(zip(names, args))
    values.update({k: v for k, v in kwargs.items() if k in names})
    options = {k: v for k, v in kwargs.items() if k not in names and v is not None}
    consts = {p.name for p in kernel.params if p.is_constexpr}
    plain = {p.name for p in kernel.params if getattr(p, "do_not_specialize", False)}  # @jit(do_not_specialize=)
    signature, constexprs, divisible = {}, {}, []
    for name in names:
        v = values[name]
        if name in consts or v is None:
            signature[name], constexprs[name] = "constexpr", v
        elif isinstance(v, bool):
            signature[name] = "i1"
        elif isinstance(v, int):
            if v == 1 and name not in plain:  # Triton specialises 1 into a constant
                signature[name], constexprs[name] = "constexpr", 1
                continue
            signature[name] = "i32" if -(2**31) <= v < 2**31 else "i64"
            if v % 16 == 0 and name not in plain:
                divisible.append(name)
        elif isinstance(v, float):
            signature[name] = "fp32"
        else:  # a tensor: allocations are 16-byte aligned
            signature[name] = "*" + _DT[str(v.dtype).replace("torch.", "")]
            if (v.storage_offset() * v.element_size()) % 16 == 0:
                divisible.append(name)
    return {"signature": signature, "constexprs": constexprs, "divisible": divisible, "options": options}


def kernel_ref(kernel) -> str:
    return f"{kernel.fn.__module__}:{kernel.fn.__name__}"


def compile_key(kernel, spec: dict) -> str:
    """The identity of a compiled binary: the kernel and its specialisation (Triton's JIT key, as data)."""
    return json.dumps([kernel_ref(kernel), spec], sort_keys=True, default=str)


def n_ctas(grid) -> int:
    return math.prod(int(g) for g in grid)


def data_per_sm(launch: Launch) -> int:
    """Bytes the launch reads (its distinct input tensors, ``traffic.KERNEL_IO``: an absent input is passed as
    another, e.g. g for x1 in BN1's backward), spread over :data:`SMS` SMs."""
    from traffic import KERNEL_IO, _tensors, tensor_bytes

    names = list(launch.kernel.arg_names)
    inputs = KERNEL_IO[launch.kernel.fn.__name__][1]
    return sum(tensor_bytes(t) for t in _tensors([launch.args[names.index(n)] for n in inputs])) // SMS


# --- compiling and reading the binary (worker processes) -----------------------------------------------------
@dataclass(frozen=True)
class Arch:
    """Per-SM limits of one compute capability (CUDA programming guide, compute capabilities table)."""
    cc: int
    smem_per_sm: int = 233472
    smem_per_block: int = 232448

    def ctas_per_sm(self, regs: int, smem: int, num_warps: int) -> int:
        """Resident CTAs: limited by warps (64), CTAs (32), registers (65536, 256 per warp granule) and shared
        memory (+1 KB reserved per CTA)."""
        regs_per_warp = -(-max(regs, 1) * 32 // 256) * 256
        ctas = min(32, 64 // num_warps, 65536 // (regs_per_warp * num_warps))
        if smem:
            ctas = min(ctas, self.smem_per_sm // (smem + 1024))
        return max(0, ctas)


ARCHS = {80: Arch(80, 167936, 166912), 90: Arch(90), 100: Arch(100)}   # A100; H100/H200; B200
TC_PATTERNS = (("tcgen05", "tcgen05.mma"), ("wgmma", "wgmma.mma_async"), ("mma.sync", "mma.sync"))
_PTXAS = {k: re.compile(p) for k, p in (("regs", r"Used (\d+) registers"), ("stores", r"(\d+) bytes spill stores"),
                                        ("loads", r"(\d+) bytes spill loads"))}
_BYTES = {"f32": 4, "i32": 4, "f16": 2, "bf16": 2, "i16": 2, "i8": 1, "i1": 1, "f64": 8, "i64": 8}


def _sm(cc: int) -> str:
    return f"sm_{cc}a" if cc >= 90 else f"sm_{cc}"


def _ptxas_log(ptx: str, cc: int) -> str:
    """ptxas -v on the PTX (Triton 3.4 has no TRITON_DUMP_PTXAS_LOG)."""
    import inspect

    from triton.backends.nvidia.compiler import get_ptxas

    ptxas = (get_ptxas(cc) if inspect.signature(get_ptxas).parameters else get_ptxas()).path
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "k.ptx")
        with open(path, "w") as f:
            f.write(ptx)
        return subprocess.run([ptxas, "-lineinfo", "-v", f"--gpu-name={_sm(cc)}", path, "-o", path + ".o"],
                              capture_output=True, text=True).stderr


def ttgir_loads(ttgir: str, num_stages: int) -> tuple[int, int]:
    """(bytes loaded per pipeline stage, stages) from the TTGIR: the loop loading the most bytes per iteration
    (the kernel's top level when no loop loads), times num_stages when its loads are asynchronous copies."""
    stack, per_region, asyncs = [], collections.Counter(), set()
    for n, line in enumerate(ttgir.splitlines()):
        s = line.strip()
        if s.startswith("}"):
            stack.pop()
        m = re.search(r"\b(tt\.load|ttg\.async_copy_global_to_local|tt\.descriptor_load)\b.*? : "
                      r"(?:tensor<([\dx]+)x!tt\.ptr<(\w+)>|!tt\.ptr<(\w+)>)", s)
        if m:
            loop = next((r for r, is_loop in reversed(stack) if is_loop), None)
            count = math.prod(int(v) for v in m.group(2).split("x")) if m.group(2) else 1
            per_region[loop] += count * _BYTES.get(m.group(3) or m.group(4), 4)
            if m.group(1) == "ttg.async_copy_global_to_local":
                asyncs.add(loop)
        if s.endswith("{"):
            stack.append((n, "scf.for" in s or "scf.while" in s))
    loops = {r: b for r, b in per_region.items() if r is not None}
    if not loops:
        return per_region.get(None, 0), 1
    region = max(loops, key=loops.get)
    return loops[region], num_stages if region in asyncs else 1


def ptx_figures(ptx: str) -> tuple[int, Optional[float]]:
    """(ld.global narrower than 4 bytes inside a loop, instructions per tensor-core instruction in the loop
    holding the most of them) from the PTX: a loop runs from a label to a backward branch to it."""
    lines = ptx.splitlines()
    labels = {m.group(1): i for i, ln in enumerate(lines) if (m := re.match(r"\s*(\$\w+):", ln))}
    loops = [(labels[m.group(1)], i) for i, ln in enumerate(lines)
             if (m := re.search(r"\bbra(?:\.uni)?\s+(\$\w+);", ln)) and labels.get(m.group(1), i + 1) < i]
    inside = [False] * len(lines)
    for a, b in loops:
        for i in range(a, b + 1):
            inside[i] = True
    narrow = 0
    for i, ln in enumerate(lines):
        m = re.search(r"\bld\.global((?:\.[\w:]+)+)", ln)
        if m and inside[i]:
            parts = m.group(1).split(".")
            vec = next((int(p[1:]) for p in parts if re.fullmatch(r"v\d+", p)), 1)
            bits = next((int(t.group(1)) for p in reversed(parts) if (t := re.fullmatch(r"[bsuf](\d+)", p))), 32)
            narrow += vec * bits < 32
    best = None
    for a, b in loops:
        body = [ln.strip() for ln in lines[a + 1:b + 1]]
        ins = [ln for ln in body if ln.endswith(";") and not ln.startswith(("//", "."))]
        mmas = sum(1 for ln in ins if any(p in ln for _, p in TC_PATTERNS))
        if mmas and (best is None or (mmas, -len(ins)) > (best[0], -best[1])):
            best = (mmas, len(ins))
    return narrow, (round(best[1] / best[0], 1) if best else None)


def compile_job(ref: str, spec: dict, cc: int) -> dict:
    """Compile one specialisation for ``cc``: its facts (a config that does not compile is a fact too)."""
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
        with contextlib.redirect_stdout(out):  # TRITON_DUMP_PTXAS_LOG=1 (Triton >= 3.6) prints ptxas's log
            k = triton.compile(src, target=GPUTarget("cuda", cc, 32), options=dict(spec["options"]))
    except Exception as e:  # noqa: BLE001
        return {"ok": False, "error": f"{type(e).__name__}: {(str(e).splitlines() or [''])[0][:200]}"}
    log = out.getvalue() if "registers" in out.getvalue() else _ptxas_log(k.asm["ptx"], cc)
    f = {k_: max((int(v) for v in rx.findall(log)), default=0) for k_, rx in _PTXAS.items()}
    per_stage, stages = ttgir_loads(k.asm.get("ttgir", ""), spec["options"].get("num_stages", 3))
    narrow, per_mma = ptx_figures(k.asm["ptx"])
    half_dot = bool(re.search(r"\b(tt\.dot|ttng\.\w*(dot|mma)\w*)\b[^\n]*x(bf16|f16)\b", k.asm.get("ttgir", "")))
    return {"ok": True, "error": "", "regs": f["regs"], "spill": f["stores"] + f["loads"],
            "smem": int(k.metadata.shared), "tc": next((n for n, p in TC_PATTERNS if p in k.asm["ptx"]), "none"),
            "stage_bytes": per_stage, "stages": stages, "narrow_loads": narrow, "instr_per_mma": per_mma,
            "half_dot": half_dot, "seconds": round(time.perf_counter() - t0, 2)}


def _worker_init() -> None:
    os.environ.pop("TRITON_INTERPRET", None)
    os.environ["TRITON_ALWAYS_COMPILE"] = "1"    # a Triton cache hit would skip ptxas, and its log
    os.environ["TRITON_DUMP_PTXAS_LOG"] = "1"
    warnings.filterwarnings("ignore")


def _worker(job):
    return compile_job(*job)


def compile_all(jobs: list, n_jobs: int, log=print) -> list[dict]:
    """``jobs``: [(ref, spec, cc)] compiled in ``n_jobs`` spawned processes; their facts in order."""
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor

    out, t0 = [], time.perf_counter()
    with ProcessPoolExecutor(max(1, n_jobs), mp_context=mp.get_context("spawn"), initializer=_worker_init) as pool:
        for n, res in enumerate(pool.map(_worker, jobs, chunksize=1), 1):
            out.append(res)
            if n % 100 == 0:
                log(f"  {n}/{len(jobs)} compiled ({time.perf_counter() - t0:.0f} s)")
    return out


# --- loads per program, in the interpreter -------------------------------------------------------------------
def _describe(a):
    if isinstance(a, torch.Tensor):
        span = sum((n - 1) * abs(s) for n, s in zip(a.shape, a.stride())) + 1 if a.numel() else 0
        return ("tensor", str(a.dtype).replace("torch.", ""), a.storage_offset() + span, a.storage_offset(),
                tuple(a.shape), tuple(a.stride()))
    return ("value", a)


def _materialise(d):
    if d[0] != "tensor":
        return d[1]
    dtype = getattr(torch, d[1])
    base = torch.randn(d[2], dtype=dtype) if dtype.is_floating_point else torch.zeros(d[2], dtype=dtype)
    return base.as_strided(d[4], d[5], d[3])


def count_loads_here(jobs: list) -> list[dict]:
    """(Run under TRITON_INTERPRET=1.) For each (ref, grid, arg descriptions, kwargs): per program, the loads
    executed at each source line of the kernels; returned as {"busiest", "median", "serial"}."""
    import importlib

    from triton.runtime import interpreter

    builder, kernels_dir = interpreter.interpreter_builder, os.path.dirname(importlib.import_module(
        "gam_triton.kernels").__file__)
    counts: dict = collections.defaultdict(collections.Counter)

    def counting(real):
        def load(*a, **kw):
            f = sys._getframe(1)
            while f is not None and not f.f_code.co_filename.startswith(kernels_dir):
                f = f.f_back
            counts[builder.grid_idx][f.f_lineno if f is not None else 0] += 1
            return real(*a, **kw)
        return load

    for name in ("create_load", "create_masked_load"):
        setattr(builder, name, counting(getattr(builder, name)))
    out = []
    for ref, grid, descs, kwargs in jobs:
        mod, name = ref.split(":")
        counts.clear()
        getattr(importlib.import_module(mod), name)[grid](*[_materialise(d) for d in descs], **kwargs)
        progs = list(counts.values()) + [collections.Counter()] * (n_ctas(grid) - len(counts))
        totals = [sum(c.values()) for c in progs]
        sites = set().union(*progs)
        serial = max((max(c[s] for c in progs) - statistics.median(c[s] for c in progs) for s in sites), default=0)
        out.append({"busiest": max(totals), "median": statistics.median(totals), "serial": serial})
    return out


def count_loads(launches: list[Launch], n_jobs: int = 2) -> list[dict]:
    """:func:`count_loads_here` in ``n_jobs`` subprocesses with the interpreter on (the launches' own arguments)."""
    jobs = [(kernel_ref(la.kernel), tuple(la.grid), [_describe(a) for a in la.args], la.kwargs) for la in launches]
    code = ("import pickle, sys; sys.path.insert(0, sys.argv[1]); import compile_check as c; "
            "sys.stdout.buffer.write(pickle.dumps(c.count_loads_here(pickle.load(open(sys.argv[2], 'rb')))))")
    with tempfile.TemporaryDirectory() as d:
        procs = []
        for i in range(max(1, n_jobs)):
            with open(os.path.join(d, str(i)), "wb") as f:
                pickle.dump(jobs[i::max(1, n_jobs)], f)
            procs.append(subprocess.Popen([sys.executable, "-c", code, PERF_DIR, f.name], stdout=subprocess.PIPE,
                                          stderr=subprocess.PIPE, env=dict(os.environ, TRITON_INTERPRET="1"),
                                          cwd=REPO_DIR))
        results = [p.communicate() for p in procs]
    for p, (_out, err) in zip(procs, results):
        if p.returncode:
            raise RuntimeError("interpreter load count failed: " + err.decode()[-2000:])
    parts = [pickle.loads(out) for out, _err in results]
    return [parts[i % len(parts)][i // len(parts)] for i in range(len(jobs))]


# --- the issue-22 targets, as data ---------------------------------------------------------------------------
def _mem(r: dict) -> bool:
    return not r["kernel"].startswith(MIB)


#: name: (what it asks, the rows it applies to, the test a row must pass); rows are report.csv rows at sm_90.
TARGETS: dict[str, tuple[str, Callable, Callable]] = {
    "waves": ("memory-bound launches at the sweep shapes (B16): waves at 132 SMs not in (1.0, 1.15], >= 0.6",
              _mem, lambda r: r["bad_wave_launches"] == 0),
    "serial": ("serial finalisation steps <= 16 (interpreter, LOAD_CASES)", lambda r: r["serial_steps"] != "",
               lambda r: r["serial_steps"] <= 16),
    "balance": ("loads of the busiest program <= 4x the median program's (interpreter, LOAD_CASES)",
                lambda r: r["busiest_over_median"] != "", lambda r: r["busiest_over_median"] <= 4),
    "inflight": ("memory-bound launches: >= 20 KB in flight per SM (or all the launch reads per SM)", _mem,
                 lambda r: r["bad_inflight_launches"] == 0),
    "narrow": ("no global load narrower than 4 bytes inside a loop", lambda r: True, lambda r: r["narrow_loads"] == 0),
}
def bad_waves(launches: list, ctas: int) -> list[tuple[str, float]]:
    """(case, waves) of the launches at the sweep's shapes and batch whose waves at 132 SMs are in (1.0, 1.15] or
    below 0.6."""
    out = []
    for la in launches:
        w = n_ctas(la.grid) / (SMS * ctas) if ctas else 0.0
        if la.case.batch == SWEEP_BATCH and (la.case.channels, la.case.size) in SWEEP and (1.0 < w <= 1.15 or w < 0.6):
            out.append((la.case.label(), round(w, 2)))
    return out


def inflight(launch: Launch, ctas: int, stage_bytes: int, stages: int) -> int:
    """Bytes in flight per SM during ``launch``: the CTAs an SM holds (resident ones, or the grid's share of the
    busiest SM where the grid is smaller) x bytes per stage x stages."""
    return min(ctas, -(-n_ctas(launch.grid) // SMS)) * stage_bytes * stages


def rows_for(binaries: list, facts: dict, archs: list, loads: dict) -> list[dict]:
    """One row per binary and arch."""
    rows = []
    for i, (key, (kernel, spec, launches)) in enumerate(binaries):
        for cc in archs:
            f, arch, opts = facts[(key, cc)], ARCHS[cc], spec["options"]
            ctas = arch.ctas_per_sm(f.get("regs", 0), f.get("smem", 0), opts.get("num_warps", 4)) if f["ok"] else 0
            waves = [n_ctas(la.grid) / (SMS * ctas) for la in launches if ctas]
            reads = [data_per_sm(la) for la in launches]
            held = [inflight(la, ctas, f.get("stage_bytes", 0), f.get("stages", 1)) for la in launches]
            ld = loads.get(key)
            rows.append(dict(
                binary=i, kernel=kernel.fn.__name__.removesuffix("_kernel"), arch=_sm(cc), launches=len(launches),
                example=launches[0].case.label(),
                constexprs=" ".join(f"{k}={v}" for k, v in spec["constexprs"].items() if k.isupper()),
                num_warps=opts.get("num_warps", 4), num_stages=opts.get("num_stages", 3),
                maxnreg=opts.get("maxnreg", ""), ok=f["ok"], regs=f.get("regs", ""),
                spill_bytes=f.get("spill", ""), shared_bytes=f.get("smem", 0),
                smem_ok=f.get("smem", 0) <= arch.smem_per_block, ctas_per_sm=ctas, tc=f.get("tc", ""),
                warps_per_sm=ctas * opts.get("num_warps", 4), half_dot=f.get("half_dot", False),
                waves_min=round(min(waves, default=0), 2), waves_max=round(max(waves, default=0), 2),
                bad_wave_launches=len(bad_waves(launches, ctas)),
                stage_bytes=f.get("stage_bytes", 0), stages=f.get("stages", 1),
                inflight_per_sm=min(held), data_per_sm=max(reads),
                bad_inflight_launches=sum(h < min(20480, d) for h, d in zip(held, reads)),
                narrow_loads=f.get("narrow_loads", 0), instr_per_mma=f.get("instr_per_mma") or "",
                serial_steps=ld["serial"] if ld else "",
                busiest_over_median=round(ld["busiest"] / max(ld["median"], 1), 1) if ld else "",
                error=f.get("error", "")))
    return rows


def problems(rows: list[dict]) -> list[str]:
    """Always checked: a failed compile, a spill, shared memory over the limit, no CTA resident per SM, a
    half-precision dot (in the TTGIR) without tensor-core instructions."""
    whys = [(r, "does not compile: " + r["error"] if not r["ok"] else f"spills {r['spill_bytes']} B" if r["spill_bytes"]
             else "needs more shared memory than the arch has" if not r["smem_ok"] else
             "cannot be resident (0 CTAs per SM: registers x threads over the register file)" if not r["ctas_per_sm"]
             else
             "a half-precision dot without tensor-core instructions" if r["half_dot"] and r["tc"] == "none" else "")
            for r in rows]
    return [f"binary {r['binary']} {r['kernel']} {r['arch']} ({r['example']}; {r['constexprs']} w{r['num_warps']} "
            f"s{r['num_stages']}; regs {r['regs']}): {why}" for r, why in whys if why]


def target_failures(rows: list[dict], binaries: list) -> dict[str, list[str]]:
    """Per target, the sm_90 rows that miss it (with the launches that miss the waves target)."""
    out = {}
    for name, (_what, applies, ok) in TARGETS.items():
        bad = []
        for r in rows:
            if r["arch"] != "sm_90a" or not r["ok"] or not applies(r) or ok(r):
                continue
            ws = sorted(set(bad_waves(binaries[r["binary"]][1][2], r["ctas_per_sm"]))) if name == "waves" else []
            extra = f"; {len(ws)} launches, e.g. " + ", ".join(f"{c} {w}" for c, w in ws[:2]) if ws else ""
            figure = {"waves": "", "serial": f"{r['serial_steps']} steps", "balance": f"{r['busiest_over_median']}x",
                      "inflight": f"{r['inflight_per_sm']} B/SM", "narrow": f"{r['narrow_loads']} loads"}[name]
            bad.append(f"binary {r['binary']} {r['kernel']} ({r['example']}; {r['constexprs']}): {figure}{extra}")
        out[name] = bad
    return out


def summary(rows: list[dict], binaries: list, n_launches: int, seconds: float, args, bad: list,
            fails: dict) -> str:
    import triton

    lines = [f"# Compile check\n\n`perf/compile_check.py --subset {args.subset}`, Triton {triton.__version__}, torch "
             f"{torch.__version__}, {time.strftime('%Y-%m-%d')}: {n_launches} launches captured, {len(binaries)} "
             f"distinct binaries x {len(args.archs)} archs, {seconds:.0f} s. **Compile facts and static figures, "
             "not timings** (waves at 132 SMs; in flight = CTAs an SM holds x bytes per stage x stages, the least "
             "over a binary's launches).\n",
             "| kernel | arch | binaries | launches | regs | spill B | smem B | CTAs/SM | tensor cores | waves | in "
             "flight B/SM | narrow loads in loops | instr/MMA | serial steps | busiest/median |", "|" + "---|" * 15]
    groups: dict = collections.defaultdict(list)
    for r in rows:
        groups[(r["kernel"], r["arch"])].append(r)

    def span(rs, col):
        vals = [r[col] for r in rs if r[col] != ""]
        return f"{min(vals)}-{max(vals)}" if vals else ""

    for (k, arch), rs in sorted(groups.items()):
        ok = [r for r in rs if r["ok"]]
        cells = [k, arch, len(rs), sum(r["launches"] for r in rs), span(ok, "regs"), span(ok, "spill_bytes"),
                 span(ok, "shared_bytes"), span(ok, "ctas_per_sm"), ", ".join(sorted({r["tc"] for r in ok})),
                 f"{min((r['waves_min'] for r in ok), default='')}..{max((r['waves_max'] for r in ok), default='')}",
                 span(ok, "inflight_per_sm"), sum(r["narrow_loads"] for r in ok), span(ok, "instr_per_mma"),
                 span(ok, "serial_steps"), span(ok, "busiest_over_median")]
        lines.append("| " + " | ".join(map(str, cells)) + " |")
    lines += ["", f"**Always checked (spill, compile, shared memory, tensor cores): {len(bad)} problem(s)**"] + [
        f"- {b}" for b in bad[:50]]
    lines += ["", "**Issue-22 targets (sm_90)**", "", "| target | what | binaries missing it |", "|---|---|---|"]
    lines += [f"| {n} | {TARGETS[n][0]} | {len(v)} |" for n, v in fails.items()]
    for n, v in fails.items():
        lines += [f"\n{n}:"] + [f"- {b}" for b in v[:20]] + ([f"- ... {len(v) - 20} more"] if len(v) > 20 else [])
    return "\n".join(lines) + "\n"


def main(argv: Optional[list] = None) -> int:
    ap = argparse.ArgumentParser(prog="perf/compile_check.py", description=__doc__.split("\n\n")[0])
    ap.add_argument("--subset", choices=list(SUBSETS), default="full")
    ap.add_argument("--archs", default="80,90,100")
    ap.add_argument("--check", action="store_true", help="exit 1 on a problem or a missed target of --targets")
    ap.add_argument("--targets", default="", help="issue-22 targets --check enforces: " + ",".join(TARGETS))
    ap.add_argument("--loads", action=argparse.BooleanOptionalAction, default=None,
                    help="count loads per program in the interpreter (default: with --subset full)")
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--out", default=DEFAULT_OUT)
    ap.add_argument("--kernels", default="", help="keep only binaries of these kernels (comma-separated names as in "
                    "report.csv, e.g. channel_gate_fwd,conv_split; a _kernel suffix is dropped); default: all")
    args = ap.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):  # GPU targets need real @triton.jit functions
        os.execve(sys.executable, [sys.executable, os.path.abspath(__file__), *(argv or sys.argv[1:])],
                  {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"})
    sys.path.insert(0, REPO_DIR)
    warnings.filterwarnings("ignore")
    args.archs = [int(a) for a in args.archs.split(",")]
    targets = [t for t in args.targets.split(",") if t]
    if set(targets) - set(TARGETS):
        ap.error(f"unknown targets: {set(targets) - set(TARGETS)}")
    t0 = time.perf_counter()
    binaries: dict = {}
    n_launches = 0
    only = {k.removesuffix("_kernel") for k in args.kernels.split(",") if k}
    for case in space(args.subset):
        for launch in capture(case):
            if only and launch.kernel.fn.__name__.removesuffix("_kernel") not in only:
                continue
            n_launches += 1
            spec = specialise(launch.kernel, launch.args, launch.kwargs)
            binaries.setdefault(compile_key(launch.kernel, spec), (launch.kernel, spec, []))[2].append(launch)
    binaries = list(binaries.items())
    print(f"compile_check: {n_launches} launches, {len(binaries)} distinct binaries, captured in "
          f"{time.perf_counter() - t0:.0f} s; compiling {len(binaries) * len(args.archs)} on {args.jobs} process(es)")
    jobs = [(kernel_ref(k), spec, cc) for _key, (k, spec, _l) in binaries for cc in args.archs]
    facts = dict(zip([(key, cc) for key, _ in binaries for cc in args.archs], compile_all(jobs, args.jobs)))
    loads: dict = {}
    if args.loads or (args.loads is None and (args.subset == "full" or {"serial", "balance"} & set(targets))):
        t1 = time.perf_counter()
        keys = {key for key, _ in binaries}
        cases = [Case(b, c, s, form, "", dt, None, True, lay, mode) for b, c, s, form, dt, lay, mode in LOAD_CASES]
        launches = [la for case in cases for la in capture(case) if not la.kernel.fn.__name__.startswith(MIB)]
        for la, res in zip(launches, count_loads(launches, args.jobs)):
            key = compile_key(la.kernel, specialise(la.kernel, la.args, la.kwargs))
            if key in keys and (key not in loads or res["serial"] > loads[key]["serial"]):
                loads[key] = res
        print(f"compile_check: loads of {len(launches)} launches counted in the interpreter "
              f"({time.perf_counter() - t1:.0f} s)")
    rows = rows_for(binaries, facts, args.archs, loads)
    bad, fails = problems(rows), target_failures(rows, binaries)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "report.csv"), "w", newline="") as f:
        w = csv.DictWriter(f, list(rows[0]) if rows else ["binary"])
        w.writeheader()
        w.writerows(rows)
    with open(os.path.join(args.out, "launches.csv"), "w", newline="") as f:
        csv.writer(f).writerows([("binary", "kernel", "case", "grid", "ctas")] + [
            (i, k.fn.__name__, la.case.label(), "x".join(map(str, la.grid)), n_ctas(la.grid))
            for i, (_key, (k, _s, launches)) in enumerate(binaries) for la in launches])
    with open(os.path.join(args.out, "report.md"), "w") as f:
        f.write(summary(rows, binaries, n_launches, time.perf_counter() - t0, args, bad, fails))
    missed = {t: fails[t] for t in targets if fails[t]}
    print(f"compile_check: {len(bad)} problem(s); targets missed: "
          + (", ".join(f"{t} {len(v)}" for t, v in fails.items() if v) or "none")
          + f" ({time.perf_counter() - t0:.0f} s); {os.path.join(args.out, 'report.md')}")
    for b in bad[:40]:
        print("  " + b)
    for t, v in missed.items():
        for b in v[:10]:
            print(f"  target {t}: {b}")
    return 1 if args.check and (bad or missed) else 0


if __name__ == "__main__":
    sys.exit(main())
