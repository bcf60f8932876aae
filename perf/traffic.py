"""Bytes moved and kernel launches of one GAM call: eager (counted over its aten ops) vs gam_triton.

    python perf/traffic.py                      # markdown tables for the YOLO shapes, B=16, bf16
    python perf/traffic.py --batch 1 --dtype fp32 --out traffic.md
    python perf/traffic.py --device cuda --mode train   # on a GPU: gam_triton's kernels counted as they run

Counting (:class:`TrafficCounter`, a ``TorchDispatchMode``): each aten op a module dispatches counts the bytes of
its tensor inputs (read) and outputs (written), each tensor once and only the elements it spans (stride 0 counts
once); views and allocations are free, every other op is one launch: compulsory bytes per op.

* eager: the reference ``YoloGAM`` on ``meta`` tensors (shapes only: any size is instant).
* gam_triton: a ``gam_triton::*`` op counts what runs inside it: its body (:func:`op_bodies`, each op's
  ``run.impl``) runs under the counter, so its aten ops (cuDNN convolutions, GEMMs) count as dispatched, and each
  kernel launch is counted at the one launch seam, ``gam_triton.ops._runtime.launch``, reading and writing the
  arguments :data:`KERNEL_IO` names (its docstring's traffic). Where the kernels run (CUDA, or the CPU under
  ``TRITON_INTERPRET=1``) they run; on ``meta`` tensors the module takes its Triton path and the seam only counts
  (tests check both agree). A train step starts from gradients set to None, for both.

Floors are bytes / bandwidth (H100 ~3.0 TB/s, H200 ~4.3 TB/s, GAM_NOTES.md): computed bounds, never
measurements. Reads nothing, writes only ``--out``.
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import importlib
import inspect
import os
import pkgutil
import sys
from dataclasses import dataclass, field
from typing import Callable, Iterator, Optional, Sequence

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402
from torch.utils._pytree import tree_flatten  # noqa: E402

from bench import DTYPES, GPU_BANDWIDTH, Shape, conv_mode, gam_bytes, gam_flops, yolo_pairs  # noqa: E402

#: Ops that move no data and launch nothing (beyond those whose schema says they are views).
FREE_OPS = {
    "aten::_unsafe_view", "aten::detach", "aten::alias", "aten::lift_fresh", "aten::_reshape_alias",
    "aten::empty", "aten::empty_like", "aten::empty_strided", "aten::new_empty", "aten::new_empty_strided",
    "aten::resize_", "aten::set_", "aten::sym_size", "aten::sym_stride", "aten::sym_numel",
    "aten::sym_storage_offset", "aten::is_same_size", "aten::promote_types",
}


#: Each kernel's label in the tables and the arguments it reads and writes (its docstring's traffic).
KERNEL_IO = {
    "channel_gate_fwd_kernel": ("gam_triton::channel_gate", ("x_ptr", "w1_ptr", "b1_ptr", "w2_ptr", "b2_ptr"),
                                ("out_ptr",)),
    "channel_gate_bwd_kernel": ("gam_triton::channel_gate_bwd", ("x_ptr", "ga_ptr", "gb_ptr", "w1_ptr", "b1_ptr",
                                                                 "w2_ptr", "b2_ptr", "count_ptr"),
                                ("dx_ptr", "dah_ptr", "h_ptr", "bpart_ptr", "count_ptr", "db1_ptr", "db2_ptr")),
    "final_gate_kernel": ("gam_triton::final_gate", ("x1_ptr", "y2_ptr", "scale_ptr", "shift_ptr"), ("out_ptr",)),
    "bn_relu_kernel": ("gam_triton::bn_relu", ("y_ptr", "scale_ptr", "shift_ptr"), ("z_ptr",)),
    "bn_stats_kernel": ("gam_triton::bn_stats", ("y_ptr", "count_ptr", "weight_ptr", "bias_ptr", "rmean_ptr",
                                                 "rvar_ptr", "nbt_ptr"),
                        ("stats_ptr", "part_ptr", "count_ptr", "rmean_ptr", "rvar_ptr", "nbt_ptr")),
    "bn_bwd_reduce_kernel": ("gam_triton::bn_bwd_reduce", ("g_ptr", "x1_ptr", "y_ptr", "stats_ptr", "count_ptr"),
                             ("part_ptr", "count_ptr", "coef_ptr", "dweight_ptr", "dbias_ptr")),
    "bn_bwd_apply_kernel": ("gam_triton::bn_bwd_apply", ("g_ptr", "x1_ptr", "y_ptr", "stats_ptr", "coef_ptr"),
                            ("dy_ptr", "dx1_ptr")),
    "conv_bn_relu_kernel": ("gam_triton::conv_bn_relu", ("x_ptr", "w_ptr", "b_ptr"), ("z_ptr",)),
    "conv_split_kernel": ("gam_triton::conv_bn_relu", ("x_ptr", "w_ptr"), ("part_ptr",)),
    "split_sum_kernel": ("gam_triton::conv_bn_relu", ("part_ptr", "b_ptr"), ("z_ptr",)),
    "conv_gate_kernel": ("gam_triton::conv_gate", ("z_ptr", "w_ptr", "b_ptr", "scale_ptr", "shift_ptr", "x1_ptr"),
                         ("out_ptr",)),
}


def _is_poison(name: str, args) -> bool:
    """The tests' NaN poisoning of kernel outputs (GAM_TRITON_POISON=1) is no part of the work: free."""
    return name == "aten::fill_" and len(args) > 1 and isinstance(args[1], float) and args[1] != args[1]


def tensor_bytes(t: torch.Tensor) -> int:
    """Bytes of the memory a tensor spans: broadcast (stride 0) dimensions count once."""
    if t.numel() == 0:
        return 0
    n = 1
    for size, stride in zip(t.shape, t.stride()):
        if stride != 0:
            n *= size
    return n * t.element_size()


def _tensors(tree) -> list[torch.Tensor]:
    """The distinct tensors of a (nested) argument structure, in order."""
    seen, out = set(), []
    for leaf in tree_flatten(tree)[0]:
        if isinstance(leaf, torch.Tensor) and id(leaf) not in seen:
            seen.add(id(leaf))
            out.append(leaf)
    return out


@dataclass
class OpRecord:
    name: str
    launches: int
    bytes_read: int
    bytes_written: int


@dataclass
class Traffic:
    """What a call moved: per-op records and their totals."""

    ops: list[OpRecord] = field(default_factory=list)
    launches = property(lambda self: sum(o.launches for o in self.ops))
    bytes_read = property(lambda self: sum(o.bytes_read for o in self.ops))
    bytes_written = property(lambda self: sum(o.bytes_written for o in self.ops))
    bytes = property(lambda self: self.bytes_read + self.bytes_written)

    def floor_us(self, bandwidth: float) -> float:
        """Microseconds to move ``bytes`` at ``bandwidth`` bytes/s."""
        return self.bytes / bandwidth * 1e6

    def by_op(self) -> dict[str, tuple[int, int]]:
        """{op name: (launches, bytes)} for the ops that launch."""
        out: dict[str, tuple[int, int]] = {}
        for o in (o for o in self.ops if o.launches):
            n, b = out.get(o.name, (0, 0))
            out[o.name] = (n + o.launches, b + o.bytes_read + o.bytes_written)
        return out


class TrafficCounter(TorchDispatchMode):
    """Records every op dispatched inside it (see the module docstring for what counts)."""

    def __init__(self) -> None:
        super().__init__()
        self.traffic = Traffic()
        self._paused = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func.name().split(".")[0]
        body = op_bodies().get(name)
        if body is not None and not self._paused:  # what runs inside the op, counted
            with self:
                return body(*args, **kwargs)
        out = func(*args, **kwargs)
        if not self._paused:
            if func.is_view or name in FREE_OPS or _is_poison(name, args):
                self.traffic.ops.append(OpRecord(name, 0, 0, 0))
            else:
                self.record(name, (args, kwargs), out)
        return out

    def record(self, name: str, inputs, outputs, launches: int = 1) -> None:
        read = sum(tensor_bytes(t) for t in _tensors(inputs))
        written = sum(tensor_bytes(t) for t in _tensors(outputs))
        self.traffic.ops.append(OpRecord(name, launches, read, written))

    def record_launch(self, kernel, args: tuple) -> None:
        """One kernel launch: the arguments :data:`KERNEL_IO` names for it, read and written."""
        fn = getattr(kernel, "fn", kernel)
        label, reads, writes = KERNEL_IO[fn.__name__]
        named = dict(zip(inspect.signature(fn).parameters, args))
        self.record(label, [named[n] for n in reads], [named[n] for n in writes])

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        self._paused += 1
        try:
            yield
        finally:
            self._paused -= 1


def _runtime():
    return importlib.import_module("gam_triton.ops._runtime")


@functools.lru_cache(maxsize=None)
def op_bodies() -> dict:
    """{"gam_triton::<name>": the function the op runs}, from the ``run`` objects the op modules expose
    (``_runtime.entry``'s ``run.op`` and ``run.impl``), found by looking, not listed here."""
    ops = importlib.import_module("gam_triton.ops")
    table = {}
    for info in pkgutil.iter_modules(ops.__path__):
        for obj in vars(importlib.import_module(f"gam_triton.ops.{info.name}")).values():
            if callable(obj) and hasattr(obj, "op") and hasattr(obj, "impl"):
                table[obj.op._qualname] = obj.impl
    return table


@contextlib.contextmanager
def _counting_launches(counter: "TrafficCounter", run: bool) -> Iterator[None]:
    """Each kernel launch through the library's launch seam counted by ``counter``; launched too when ``run``
    (else, on meta tensors, only counted: the op already allocated its outputs)."""
    rt = _runtime()
    real = rt.launch

    def launch(kernel, grid, args, kwargs):
        counter.record_launch(kernel, args)
        if run:
            with counter.paused():  # the interpreter's copies of the arguments are not the kernel's traffic
                return real(kernel, grid, args, kwargs)
        return None

    rt.launch = launch
    try:
        yield
    finally:
        rt.launch = real


def count(fn: Callable[[], object]) -> Traffic:
    """Run ``fn()`` under a :class:`TrafficCounter` (gam_triton's kernels counted at the launch seam and run)
    and return what it moved."""
    with TrafficCounter() as counter, _counting_launches(counter, True):
        fn()
    return counter.traffic


# --- GAM: eager against gam_triton -------------------------------------------------------------------------
def _modules(shape: Shape, dtype: torch.dtype, device: str, train: bool):
    from gam_triton import GAM
    from gam_triton.reference import YoloGAM

    torch.manual_seed(0)
    ref = YoloGAM(shape.channels, shape.channels, group=shape.group, rate=shape.rate).to(dtype=dtype)
    gam = GAM.from_module(ref)  # converted on the CPU (the conversion runs a float64 probe)
    return ref.to(device).train(train), gam.to(device).train(train)


def _call(module, shape: Shape, dtype: torch.dtype, device: str, train: bool) -> Callable[[], object]:
    size = (shape.batch, shape.channels, shape.height, shape.width)
    x = torch.randn(size, dtype=dtype, device=device, requires_grad=train)
    if not train:
        def fwd():
            with torch.no_grad():
                module(x)
        return fwd
    grad = torch.randn(size, dtype=dtype, device=device)

    def step():  # one training step as an optimizer loop runs it: gradients set to None first (zero_grad)
        module.zero_grad(set_to_none=True)
        x.grad = None
        module(x).backward(grad)
    return step


def eager_traffic(shape: Shape, dtype: torch.dtype, mode: str = "forward", device: str = "meta") -> Traffic:
    """Traffic of the reference YOLO GAM (eval forward, or train forward + backward)."""
    train = mode == "train"
    ref, _ = _modules(shape, dtype, device, train)
    return count(_call(ref, shape, dtype, device, train))


@contextlib.contextmanager
def _triton_path_on_meta() -> Iterator[None]:
    """The GAM module sent down its Triton path on meta tensors (``_runtime.use_triton`` answers True), the
    tuner off for the duration (heuristic tiles, no cache file touched)."""
    rt, tuner = _runtime(), importlib.import_module("gam_triton.ops._autotune")
    real, old, rt.use_triton = rt.use_triton, os.environ.get("GAM_TRITON_AUTOTUNE"), lambda x: True
    os.environ["GAM_TRITON_AUTOTUNE"] = "0"
    tuner.reset()
    try:
        yield
    finally:
        rt.use_triton = real
        os.environ.pop("GAM_TRITON_AUTOTUNE") if old is None else os.environ.update(GAM_TRITON_AUTOTUNE=old)
        tuner.reset()


def gam_triton_traffic(shape: Shape, dtype: torch.dtype, mode: str = "forward", device: str = "meta",
                       conv: str = "cudnn") -> Traffic:
    """Traffic of gam_triton's GAM: its kernels as launches, the rest (cuDNN convs, ...) as dispatched.

    ``device="meta"``: any machine, any size, shapes only (the kernels counted, not run). On "cuda", or "cpu"
    under TRITON_INTERPRET=1, the kernels run. ``conv``: the eval spatial branch's path (GAM_TRITON_CONV):
    "cudnn" (two cuDNN convolutions, a ReLU and the final-gate kernel) or "triton" (the fused path).
    """
    train = mode == "train"
    _, gam = _modules(shape, dtype, device, train)
    fn = _call(gam, shape, dtype, device, train)
    meta = device == "meta"
    with conv_mode(conv), (_triton_path_on_meta() if meta else contextlib.nullcontext()):
        with TrafficCounter() as warm, _counting_launches(warm, not meta):
            fn()  # the first call folds BN1 into conv1 and caches BN2's affine; steady state is what counts
        with TrafficCounter() as counter, _counting_launches(counter, not meta):
            fn()
    return counter.traffic


def _mb(n: int) -> str:
    return f"{n / 1e6:.1f}"


def _table(head: str, rows: list) -> str:
    return "\n".join([head, "|" + "---|" * (head.count("|") - 1)] + rows)


def gam_table(shapes: Sequence[Shape], dtype_name: str, mode: str = "forward", device: str = "meta") -> str:
    """Markdown: eager vs gam_triton bytes, launches and H100 floors per shape (eval: also the fused spatial branch,
    GAM_TRITON_CONV=triton)."""
    dtype, bw, rows = DTYPES[dtype_name], GPU_BANDWIDTH["H100"], []
    for s in shapes:
        e, g = eager_traffic(s, dtype, mode, device), gam_triton_traffic(s, dtype, mode, device)
        row = (f"| {s.label()} | {gam_flops(s, mode) / 1e9:.1f} | {_mb(gam_bytes(s, dtype, mode))} | {_mb(e.bytes)} | "
               f"{e.launches} | {_mb(g.bytes)} | {g.launches} | {e.floor_us(bw):.0f} | {g.floor_us(bw):.0f} |")
        if mode == "forward":
            f = gam_triton_traffic(s, dtype, mode, device, conv="triton")
            row += f" {_mb(f.bytes)} | {f.launches} | {f.floor_us(bw):.0f} |"
        rows.append(row)
    head = ("| shape | GFLOP | ideal MB | eager MB | eager launches | gam_triton MB | gam_triton launches | "
            "floor H100 eager us | floor H100 gam_triton us |")
    return _table(head + (" fused MB | fused launches | floor H100 fused us |" if mode == "forward" else ""), rows)


def op_breakdown(shape: Shape, dtype_name: str, mode: str = "forward", device: str = "meta") -> str:
    """Markdown: launches and MB per op name, eager and gam_triton, for one shape."""
    e = eager_traffic(shape, DTYPES[dtype_name], mode, device).by_op()
    g = gam_triton_traffic(shape, DTYPES[dtype_name], mode, device).by_op()
    rows = [f"| {n} | {e.get(n, (0, 0))[0]} | {_mb(e.get(n, (0, 0))[1])} | {g.get(n, (0, 0))[0]} | "
            f"{_mb(g.get(n, (0, 0))[1])} |" for n in dict.fromkeys(list(e) + list(g))]
    rows.append(f"| **total** | {sum(v[0] for v in e.values())} | {_mb(sum(v[1] for v in e.values()))} | "
                f"{sum(v[0] for v in g.values())} | {_mb(sum(v[1] for v in g.values()))} |")
    return _table(f"| op ({shape.label()}, {dtype_name}, {mode}) | eager launches | eager MB | gam_triton launches | "
                  "gam_triton MB |", rows)


def report(batch: int, dtype_name: str, mode: str = "forward", device: str = "meta") -> str:
    """The markdown tables for the YOLO shapes at one batch size, dtype and mode."""
    shapes = [Shape(batch, c, s, s, 4, g) for c, s in yolo_pairs() for g in (True, False)]
    what = "eval forward" if mode == "forward" else "train forward + backward (gradients set to None first)"
    parts = [
        f"Computed by `python perf/traffic.py --batch {batch} --dtype {dtype_name} --mode {mode}` ({what}, rate 4, "
        f"counted on {device} tensors): computed values, not measured times. GFLOP = channel MLP + the two 7x7 "
        "convolutions (train: 3x forward); ideal = read x and the weights, write out (one perfect kernel); floor = "
        "bytes / bandwidth (H100 3.0 TB/s).", "### Whole block", gam_table(shapes, dtype_name, mode, device),
        "### Per op, one shape", op_breakdown(Shape(batch, 256, 40, 40, 4, True), dtype_name, mode, device)]
    return "\n\n".join(parts) + "\n"


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="perf/traffic.py", description=__doc__.split("\n\n")[0])
    ap.add_argument("--batch", type=int, default=16, help="batch size (default 16)")
    ap.add_argument("--dtype", choices=list(DTYPES), default="bf16")
    ap.add_argument("--mode", choices=["forward", "train"], default="forward")
    ap.add_argument("--device", choices=["meta", "cuda"], default="meta",
                    help="meta: shapes only, any machine (default); cuda: run for real on the GPU")
    ap.add_argument("--out", help="write the markdown to this file too")
    args = ap.parse_args(argv)
    if args.batch < 1:
        ap.error(f"--batch must be >= 1, got {args.batch}")
    if args.device == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda: no CUDA device here")
    text = report(args.batch, args.dtype, args.mode, args.device)
    print(text, end="")
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
