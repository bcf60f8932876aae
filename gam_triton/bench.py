"""Benchmark your own model: eager GAM blocks against gam_triton, block by block and for the whole model.

    python -m gam_triton.bench MODEL [--imgsz 640] [--batch 1] [--device cuda] [--out DIR] [--amp fp16]

``MODEL`` is one of:

* an ultralytics model yaml (``yolov8n-gam.yaml``): built with ``ultralytics.YOLO(yaml)``. ultralytics is needed
  then (``pip install 'gam_triton[ultralytics]'``); if the yaml names ``GAM_Attention``, ``GAMAttention`` or
  ``GAM`` and the installed ultralytics does not define them (a fork does), ``gam_triton.ultralytics`` is
  imported to register them;
* a ``.pt`` checkpoint: an ultralytics one (a dict whose ``"ema"`` or ``"model"`` holds the pickled module;
  ultralytics must be importable to unpickle it) or ``torch.save(module)``. Loaded with ``weights_only=False``:
  only load checkpoints you trust;
* ``package.module:factory`` or ``path/to/file.py:factory``: a callable returning the model (or a module
  object); an ultralytics ``YOLO`` object is unwrapped to its ``.model``.

The model is loaded in fp32 on the CPU, then moved to ``--device``. Three variants are measured: *eager* (any
gam_triton block reverted to its plain PyTorch form, :func:`gam_triton.revert`), *gam_triton*
(:func:`gam_triton.convert` of eager: the blocks are the ones ``convert`` finds) and *no GAM* (every GAM block
replaced by ``nn.Identity``: what the model costs without them). Eval is a forward under ``torch.no_grad`` (on
an ultralytics model after its ``fuse()``, as its ``predict`` does); one train step is a train-mode forward, a
scalar loss (the sum of the means of the outputs) and its backward with every parameter trained (a checkpoint's
EMA comes frozen), no optimizer step. ``--amp`` runs both under
``torch.autocast``.

Per GAM block (input shape, dtype and layout captured with a forward pre-hook during one eval forward): eager
and gam_triton times for eval and for a train step of the block alone (its input requiring a gradient, as
inside the model), speedup, the block's share of its variant's whole-model time (the block timed alone over
the model timed whole), and peak memory. For the whole model: the three variants, images per second, the GAM
blocks' share in context ((model - no GAM) / model), and the largest difference between eager's and
gam_triton's eval outputs (``max_abs_diff``, measured before any train step moves the BatchNorm statistics).

Timing: ``triton.testing.do_bench`` on CUDA (median, L2 flushed); on the CPU, and on CUDA without Triton, the
median of ``time.perf_counter`` repeats (synchronised on CUDA) for ``--rep-ms`` per figure, at least 5 repeats.
Every measured callable runs 3 times first (the first gam_triton calls of a new shape compile and tune). Peak
memory: ``torch.cuda.max_memory_allocated`` during one call minus what was allocated before it (activations,
gradients and workspace; the resident weights not counted); empty ("n/a") on the CPU. Figures taken on a CPU
are CPU figures, labelled so in every row, never GPU performance; under ``TRITON_INTERPRET=1`` they are not
performance figures at all.

Output: ``DIR/<model>_<device>_b<batch>_<imgsz>.csv`` (one row per block and mode, then the whole model per
mode; columns in :data:`COLUMNS`) and ``.png`` (eager against gam_triton per row, eval and train), and a summary
on stdout. Exit status 2 with a message naming what is missing for a MODEL that cannot be loaded; 1 when a
measurement raised (e.g. BatchNorm in train mode on a 1x1 map at a tiny ``--imgsz``): it is named on stderr and
its cells are left empty.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import csv
import importlib
import importlib.util
import os
import pickle
import platform
import statistics
import sys
import time
from typing import Callable, NamedTuple, Optional, Sequence

import torch
from torch import nn

from . import forms
from .convert import convert, revert
from .module import GAM
from .ops._runtime import HAS_TRITON, INTERPRET

if HAS_TRITON:
    import triton
    from triton.testing import do_bench

__all__ = ["main", "parse_args", "load_model", "BenchError", "COLUMNS"]

#: The names GAM users write in ultralytics yaml files (what gam_triton.ultralytics registers).
YAML_GAM_NAMES = ("GAM_Attention", "GAMAttention", "GAM")
AMP = {"none": None, "fp16": torch.float16, "bf16": torch.bfloat16}
WARMUP_CALLS, MIN_REPS, MAX_REPS = 3, 5, 1000
COLUMNS = ("figures", "scope", "name", "input", "mode", "no_gam_ms", "eager_ms", "gam_triton_ms", "speedup",
           "eager_share_pct", "gam_triton_share_pct", "eager_peak_mb", "gam_triton_peak_mb", "no_gam_img_per_s",
           "eager_img_per_s", "gam_triton_img_per_s", "max_abs_diff", "timer", "device", "batch", "imgsz", "amp",
           "torch", "triton")


class BenchError(Exception):
    """MODEL cannot be loaded or measured: the message says why and what is missing."""


# --- loading -----------------------------------------------------------------------------------------------
def load_model(spec: str) -> nn.Module:
    """The nn.Module named by ``spec`` (yaml, .pt, or module:factory), in fp32 on the CPU."""
    if spec.endswith((".yaml", ".yml")):
        model = _from_yaml(spec)
    elif spec.endswith((".pt", ".pth")):
        model = _from_checkpoint(spec)
    elif ":" in spec:
        model = _from_factory(spec)
    else:
        raise BenchError(f"MODEL {spec!r} is neither a .yaml, a .pt/.pth checkpoint nor module:factory")
    model = _unwrap(model)
    if not isinstance(model, nn.Module):
        raise BenchError(f"MODEL {spec!r} gave a {type(model).__name__}, not a torch.nn.Module")
    return model.float().cpu()


def _need_ultralytics(why: str) -> None:
    if importlib.util.find_spec("ultralytics") is None:
        raise BenchError(f"{why} needs ultralytics, which is not installed: pip install 'gam_triton[ultralytics]'")


def _yaml_modules(path: str) -> set:
    """The layer module names of an ultralytics yaml (``[from, repeats, module, args]`` rows)."""
    if not os.path.isfile(path):  # a name ultralytics resolves itself (yolov8n.yaml)
        return set()
    import yaml  # PyYAML: an ultralytics dependency

    with open(path, encoding="utf-8") as f:
        cfg = yaml.safe_load(f)
    if not isinstance(cfg, dict):
        raise BenchError(f"{path} is not an ultralytics model yaml (a mapping with backbone and head)")
    rows = [r for k in ("backbone", "head") for r in (cfg.get(k) or []) if isinstance(r, (list, tuple))]
    return {str(r[2]).rsplit(".", 1)[-1] for r in rows if len(r) >= 3}


def _from_yaml(path: str) -> nn.Module:
    _need_ultralytics(f"{path} (an ultralytics model yaml)")
    wanted = sorted(_yaml_modules(path) & set(YAML_GAM_NAMES))
    if wanted:
        tasks = importlib.import_module("ultralytics.nn.tasks")
        if not all(hasattr(tasks, n) for n in wanted):  # stock ultralytics: gam_triton registers the names
            try:  # by name: an optional integration, imported only for a yaml that needs it
                importlib.import_module("gam_triton.ultralytics")
            except ImportError as e:
                raise BenchError(f"{path} uses {', '.join(wanted)}, which this ultralytics does not define, and "
                                 f"gam_triton.ultralytics (which registers them) cannot be imported: {e}") from e
    from ultralytics import YOLO

    return YOLO(path).model


def _from_checkpoint(path: str) -> nn.Module:
    if not os.path.isfile(path):
        raise BenchError(f"no such checkpoint: {path}")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=False)
    except ModuleNotFoundError as e:
        if (e.name or "").split(".")[0] == "ultralytics":
            _need_ultralytics(f"{path} (an ultralytics checkpoint)")
        raise BenchError(f"{path}: unpickling needs the module {e.name!r}, which cannot be imported here "
                         f"(put the code that defined the model on PYTHONPATH): {e}") from e
    except AttributeError as e:  # a class the checkpoint names is not in its module (a fork's class)
        raise BenchError(f"{path}: a class of the checkpoint is missing here ({e}); run with the code that "
                         "defined it importable (a fork: its own ultralytics)") from e
    except (pickle.UnpicklingError, RuntimeError, EOFError) as e:
        raise BenchError(f"{path} cannot be read by torch.load: {type(e).__name__}: {e}") from e
    if isinstance(obj, dict):
        for k in ("ema", "model"):
            if isinstance(obj.get(k), nn.Module):
                return obj[k]
        raise BenchError(f"{path} holds a dict with no pickled module under 'ema' or 'model' (a state dict "
                         "holds no architecture): pass MODEL as module:factory, a function building the model")
    return obj


def _from_factory(spec: str) -> nn.Module:
    where, _, attr = spec.rpartition(":")
    try:
        if where.endswith(".py"):
            loader = importlib.util.spec_from_file_location(os.path.splitext(os.path.basename(where))[0], where)
            if loader is None or not os.path.isfile(where):
                raise BenchError(f"no such file: {where}")
            mod = importlib.util.module_from_spec(loader)
            loader.loader.exec_module(mod)
        else:
            mod = importlib.import_module(where)
    except ImportError as e:
        raise BenchError(f"cannot import {where!r} (from MODEL {spec!r}): {e}") from e
    obj = mod
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise BenchError(f"{where} has no attribute {attr!r} (from MODEL {spec!r})")
        obj = getattr(obj, part)
    return obj if isinstance(obj, nn.Module) or not callable(obj) else obj()


def _unwrap(obj):
    """An ultralytics ``YOLO``/``Model`` object (a subclass of ``ultralytics.engine.model.Model``) -> its
    network (``.model``)."""
    if any(c.__module__ == "ultralytics.engine.model" for c in type(obj).__mro__):
        return obj.model
    return obj


# --- variants ----------------------------------------------------------------------------------------------
def gam_paths(converted: nn.Module) -> list:
    """The names of the gam_triton blocks of a converted model (the blocks ``convert`` found)."""
    return [n for n, m in converted.named_modules() if isinstance(m, GAM) and n]


def without(model: nn.Module, paths: Sequence[str]) -> nn.Module:
    """A copy of ``model`` with the GAM of each block at ``paths`` taken out: the block replaced by
    ``nn.Identity``, or by its tail where it has one (a module after GAM, such as the adaptive form's
    ``channel_adjust``), attributes such as ultralytics' ``f``/``i`` carried over. GAM keeps its shape, so
    the model still runs."""
    out = copy.deepcopy(model)
    for p in paths:
        parent, _, name = p.rpartition(".")
        host = out.get_submodule(parent) if parent else out
        block = host.get_submodule(name)
        tail = forms.structure(block).tail
        rest = nn.Identity() if tail is None else block.get_submodule(tail)
        setattr(host, name, forms.carry_over(block, rest, hooks=False))
    return out


def for_eval(model: nn.Module) -> nn.Module:
    """An eval copy, fused as ultralytics' predict fuses (Conv+BN of its own layers) when it can."""
    m = copy.deepcopy(model).eval()
    fuse = getattr(m, "fuse", None)
    if callable(fuse) and type(m).__module__.split(".")[0] == "ultralytics":
        try:
            fuse(verbose=False)
        except TypeError:
            fuse()
    return m.eval()


class Seen(NamedTuple):
    shape: tuple
    dtype: torch.dtype
    channels_last: bool


def capture_inputs(model: nn.Module, paths: Sequence[str], x: torch.Tensor, amp) -> dict:
    """{path: Seen} of each block's first input during one eval forward of ``model``."""
    seen, handles = {}, []
    for p in paths:
        def hook(mod, args, p=p):
            t = args[0]
            seen.setdefault(p, Seen(tuple(t.shape), t.dtype, t.dim() == 4 and t.shape[1] > 1 and t.stride(1) == 1))
        handles.append(model.get_submodule(p).register_forward_pre_hook(hook))
    try:
        with torch.no_grad(), autocast(x.device, amp):
            model.eval()(x)
    finally:
        for h in handles:
            h.remove()
    return seen


# --- measuring ---------------------------------------------------------------------------------------------
def autocast(device: torch.device, amp):
    return torch.autocast(device.type, dtype=amp) if amp is not None else contextlib.nullcontext()


def _scalar(out) -> Optional[torch.Tensor]:
    """The sum of the means of every floating tensor in ``out`` (nested tuples, lists, dicts)."""
    if isinstance(out, torch.Tensor):
        return out.float().mean() if out.is_floating_point() else None
    items = out.values() if isinstance(out, dict) else out if isinstance(out, (list, tuple)) else ()
    parts = [s for s in map(_scalar, items) if s is not None]
    return sum(parts[1:], parts[0]) if parts else None


def eval_step(model: nn.Module, x: torch.Tensor, amp) -> Callable[[], None]:
    def run() -> None:
        with torch.no_grad(), autocast(x.device, amp):
            model(x)

    return run


def train_step(model: nn.Module, x: torch.Tensor, amp) -> Optional[Callable[[], None]]:
    """Forward in train mode, scalar loss, backward (gradients reset first); None when nothing needs a gradient."""
    model.train()
    leaves = [p for p in model.parameters() if p.requires_grad] + ([x] if x.requires_grad else [])
    if not leaves:
        return None

    def reset() -> None:
        for t in leaves:
            t.grad = None

    def run() -> None:
        reset()
        with autocast(x.device, amp):
            loss = _scalar(model(x))
        if loss is not None and loss.requires_grad:
            loss.backward()

    run.reset = reset  # peak_mb: the gradients of the previous call are not part of the baseline
    return run


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timer_name(device: torch.device) -> str:
    return "triton.testing.do_bench" if device.type == "cuda" and HAS_TRITON else "perf_counter median"


def time_ms(fn: Callable[[], None], device: torch.device, rep_ms: float) -> float:
    """Median milliseconds of one call of ``fn`` (see the module docstring for the timer)."""
    for _ in range(WARMUP_CALLS):
        fn()
    if device.type == "cuda" and HAS_TRITON:
        with torch.cuda.device(device):
            return float(do_bench(fn, warmup=max(1, int(rep_ms // 4)), rep=max(1, int(rep_ms)),
                                  return_mode="median"))
    times, end = [], time.perf_counter() + rep_ms / 1e3
    while len(times) < MIN_REPS or (time.perf_counter() < end and len(times) < MAX_REPS):
        _sync(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def peak_mb(fn: Callable[[], None], device: torch.device) -> Optional[float]:
    """Peak CUDA memory of one call above what was allocated before it, MiB; None off CUDA."""
    if device.type != "cuda":
        return None
    getattr(fn, "reset", lambda: None)()
    _sync(device)
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    _sync(device)
    return (torch.cuda.max_memory_allocated(device) - base) / 2 ** 20


def measure(fn: Optional[Callable[[], None]], device: torch.device, rep_ms: float, what: str = "",
            failures: Optional[list] = None) -> tuple:
    """(ms, peak MiB) of ``fn``; (None, None) when there is nothing to run, or when it raises and ``failures``
    is given (the error is appended to it, named by ``what``: the other figures still count)."""
    if fn is None:
        return None, None
    try:
        ms = time_ms(fn, device, rep_ms)
        return ms, peak_mb(fn, device)
    except Exception as e:  # noqa: BLE001 - reported by main, exit status 1
        if failures is None:
            raise
        failures.append(f"{what}: {type(e).__name__}: {(str(e).strip().splitlines() or [''])[0][:300]}")
        return None, None


# --- the run -----------------------------------------------------------------------------------------------
def figures_label(device: torch.device) -> str:
    if device.type == "cuda":
        return f"GPU figures ({torch.cuda.get_device_name(device)})"
    if INTERPRET and HAS_TRITON:
        return "CPU figures under TRITON_INTERPRET=1 (Triton's interpreter): not performance figures"
    return f"CPU figures ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads): " \
           "not GPU performance"


def _fmt(v, digits: int = 3):
    return "" if v is None else f"{v:.{digits}g}" if isinstance(v, float) else v


def _ratio(a, b) -> Optional[float]:
    return a / b if a and b else None


def _tensors(out) -> list:
    if isinstance(out, torch.Tensor):
        return [out]
    items = out.values() if isinstance(out, dict) else out if isinstance(out, (list, tuple)) else ()
    return [t for o in items for t in _tensors(o)]


def max_abs_diff(a: nn.Module, b: nn.Module, x: torch.Tensor, amp) -> Optional[float]:
    """The largest difference between the eval outputs of two variants (the conversion keeps the numbers)."""
    with torch.no_grad(), autocast(x.device, amp):
        ta, tb = _tensors(a(x)), _tensors(b(x))
    diffs = [(u.double() - v.double()).abs().max().item() for u, v in zip(ta, tb) if u.is_floating_point() and
             u.shape == v.shape and u.numel()]
    return max(diffs) if diffs and len(ta) == len(tb) else None


def _whole(variants: dict, x: torch.Tensor, amp, rep_ms: float, failures: list) -> dict:
    """{mode: {variant: (ms, peak MiB)}} of the whole model."""
    out = {}
    for mode in ("eval", "train"):
        out[mode] = {name: measure(eval_step(for_eval(m), x, amp) if mode == "eval" else train_step(m, x, amp),
                                   x.device, rep_ms, f"whole model, {name}, {mode}", failures)
                     for name, m in variants.items()}
    return out


def _block_row(row: dict, p: str, s: Seen, mode: str, variants: dict, whole: dict, amp, rep_ms: float,
               failures: list) -> dict:
    """Fill ``row`` with eager against gam_triton for the block at ``p`` alone, on a random input like ``s``."""
    row["input"] = "x".join(map(str, s.shape)) + f" {str(s.dtype).replace('torch.', '')}" + (
        " channels_last" if s.channels_last else "")
    device = whole["device"]
    for name in ("eager", "gam_triton"):
        blk = variants[name].get_submodule(p)
        xb = torch.randn(s.shape, dtype=s.dtype, device=device)
        xb = xb.contiguous(memory_format=torch.channels_last) if s.channels_last else xb
        step = eval_step(blk.eval(), xb, amp) if mode == "eval" else train_step(blk, xb.requires_grad_(), amp)
        ms, mb = measure(step, device, rep_ms, f"block {p}, {name}, {mode}", failures)
        total = whole[mode][name][0]
        row.update({f"{name}_ms": ms, f"{name}_peak_mb": mb, f"{name}_share_pct": _pct(ms, total)})
    row["speedup"] = _ratio(row["eager_ms"], row["gam_triton_ms"])
    return row


def _pct(part, total) -> Optional[float]:
    return 100 * part / total if part is not None and total else None


def run(args: argparse.Namespace) -> tuple[list, list]:
    """Measure ``args.model``: (rows, dicts keyed by :data:`COLUMNS`; the measurements that raised)."""
    device, amp = torch.device(args.device), AMP[args.amp]
    model = load_model(args.model).requires_grad_(True)  # a checkpoint's EMA is frozen: train every parameter
    ch = args.channels or (model.yaml.get("ch") if isinstance(getattr(model, "yaml", None), dict) else None) or 3
    eager = revert(model).to(device)
    converted = convert(copy.deepcopy(eager))
    paths = gam_paths(converted)
    variants = dict(no_gam=without(eager, paths), eager=eager, gam_triton=converted) if paths else dict(eager=eager)
    x = torch.randn(args.batch, ch, args.imgsz, args.imgsz, device=device)
    seen = capture_inputs(eager, paths, x, amp)
    diff = max_abs_diff(for_eval(eager), for_eval(converted), x, amp) if paths else None  # before train steps
    common = dict(figures=figures_label(device), timer=timer_name(device), device=str(device), batch=args.batch,
                  imgsz=args.imgsz, amp=args.amp, torch=torch.__version__,
                  triton=triton.__version__ if HAS_TRITON else "not installed")
    failures: list = []
    whole = dict(_whole(variants, x, amp, args.rep_ms, failures), device=device)
    rows = []
    for p in paths:
        for mode in ("eval", "train"):
            row = dict(common, scope="block", name=p, mode=mode, input="not called in the forward")
            rows.append(_block_row(row, p, seen[p], mode, variants, whole, amp, args.rep_ms, failures)
                        if p in seen else row)
    for mode in ("eval", "train"):
        r = whole[mode]
        row = dict(common, scope="model", name="(whole model)", mode=mode, input="x".join(map(str, x.shape)) +
                   " float32", max_abs_diff=diff if mode == "eval" else None)
        for name, (ms, mb) in r.items():
            row.update({f"{name}_ms": ms, f"{name}_img_per_s": 1e3 * args.batch / ms if ms else None})
            if name != "no_gam":
                row.update({f"{name}_peak_mb": mb, f"{name}_share_pct": _pct(ms - r["no_gam"][0], ms)
                            if ms and "no_gam" in r and r["no_gam"][0] else None})
        row["speedup"] = _ratio(row.get("eager_ms"), row.get("gam_triton_ms"))
        rows.append(row)
    return rows, failures


def write_csv(rows: list, path: str) -> None:
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS)
        w.writeheader()
        for r in rows:
            w.writerow({c: _fmt(r.get(c), 5) for c in COLUMNS})


def write_png(rows: list, path: str, title: str) -> None:
    """Per mode: eager and gam_triton time of each block and of the whole model (and of the model without its
    GAM blocks), log scale, speedups marked."""
    import matplotlib
    import matplotlib.ticker

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    modes = ("eval", "train")
    n = max(1, sum(r["mode"] == "eval" for r in rows))
    fig, axes = plt.subplots(1, 2, figsize=(13, 1.5 + 0.55 * n), squeeze=False)
    for ax, mode in zip(axes[0], modes):
        sel = [r for r in rows if r["mode"] == mode]
        labels = [f"{r['name']}\n{r['input']}" for r in sel]
        pos = range(len(sel))
        for off, key, color in ((-0.28, "no_gam_ms", "tab:olive"), (0, "eager_ms", "tab:gray"),
                                (0.28, "gam_triton_ms", "tab:blue")):
            if any(r.get(key) for r in sel):
                ax.barh([p + off for p in pos], [r.get(key) or 0 for r in sel], height=0.27, color=color,
                        label={"no_gam_ms": "model without GAM"}.get(key, key[:-3]))
        for p, r in zip(pos, sel):
            if r.get("speedup"):
                ax.annotate(f"x{r['speedup']:.2f}", (max(r.get("eager_ms") or 0, r.get("gam_triton_ms") or 0), p),
                            xytext=(4, -3), textcoords="offset points", fontsize=8)
        ax.set_yticks(list(pos), labels, fontsize=7)
        ax.invert_yaxis()
        if any(r.get("eager_ms") for r in sel):
            ax.set_xscale("log")
            ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.set_xlabel("ms per call (median)")
        ax.set_title("eval forward" if mode == "eval" else "one train step (forward + backward)")
        ax.legend(fontsize=8, loc="best")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def summary(rows: list) -> str:
    lines = [rows[0]["figures"] if rows else "", f"{'':40} {'mode':5} {'eager ms':>9} {'gam_triton':>10} "
             f"{'speedup':>7} {'share %':>8} {'peak MiB (eager/gam_triton)':>28}"]
    for r in rows:
        peak = "n/a" if r["device"] == "cpu" else f"{_fmt(r.get('eager_peak_mb'))}/{_fmt(r.get('gam_triton_peak_mb'))}"
        lines.append(f"{(r['name'] + ' ' + r['input'])[:40]:40} {r['mode']:5} {_fmt(r.get('eager_ms')):>9} "
                     f"{_fmt(r.get('gam_triton_ms')):>10} {_fmt(r.get('speedup')):>7} "
                     f"{_fmt(r.get('eager_share_pct')):>8} {peak:>28}")
    for r in rows:
        if r["scope"] == "model" and r["mode"] == "eval" and r.get("no_gam_img_per_s"):
            lines.append(f"images/s at eval: without GAM {r['no_gam_img_per_s']:.4g}, eager GAM "
                         f"{r['eager_img_per_s']:.4g}, gam_triton {r['gam_triton_img_per_s']:.4g}; largest output "
                         f"difference eager - gam_triton: {_fmt(r.get('max_abs_diff'))}")
    return "\n".join(lines)


def _stem(spec: str) -> str:
    """A file name for MODEL: the yaml's or checkpoint's name, or the factory's."""
    if not spec.endswith((".yaml", ".yml", ".pt", ".pth")):
        spec = spec.rpartition(":")[2]
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in os.path.splitext(os.path.basename(spec))[0]) \
        or "model"


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m gam_triton.bench", description=__doc__.splitlines()[0])
    p.add_argument("model", help="an ultralytics .yaml, a .pt checkpoint, or module:factory / file.py:factory")
    p.add_argument("--imgsz", type=int, default=640, help="input height and width (default 640)")
    p.add_argument("--batch", type=int, default=1, help="batch size (default 1)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="cuda, cuda:N or cpu (default: cuda if available)")
    p.add_argument("--out", default="gam_triton_bench", help="folder for the CSV and PNG (default gam_triton_bench)")
    p.add_argument("--channels", type=int, default=None, help="input channels (default: the yaml's ch, else 3)")
    p.add_argument("--amp", choices=tuple(AMP), default="none", help="run under torch.autocast (default none: fp32)")
    p.add_argument("--rep-ms", type=float, default=200.0, help="time spent timing each figure (default 200 ms)")
    a = p.parse_args(argv)
    if a.imgsz < 1 or a.batch < 1 or (a.channels is not None and a.channels < 1) or a.rep_ms <= 0:
        p.error("--imgsz, --batch, --channels and --rep-ms must be positive")
    try:
        dev = torch.device(a.device)
    except RuntimeError as e:
        p.error(f"--device: {e}")
    if dev.type == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: CUDA is not available here")
    if dev.type not in ("cuda", "cpu"):
        p.error(f"--device {a.device}: cuda or cpu")
    return a


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    if INTERPRET and HAS_TRITON and torch.device(args.device).type == "cpu":
        print("gam_triton.bench: TRITON_INTERPRET=1: the kernels run in Triton's interpreter; the figures are "
              "not performance figures (unset it for the PyTorch path's CPU figures)", file=sys.stderr)
    try:
        rows, failures = run(args)
    except BenchError as e:
        print(f"gam_triton.bench: error: {e}", file=sys.stderr)
        return 2
    os.makedirs(args.out, exist_ok=True)
    base = os.path.join(args.out, f"{_stem(args.model)}_{torch.device(args.device).type}_b{args.batch}_{args.imgsz}")
    write_csv(rows, base + ".csv")
    n = sum(r["scope"] == "block" and r["mode"] == "eval" for r in rows)
    write_png(rows, base + ".png", f"{args.model}: batch {args.batch}, {args.imgsz}x{args.imgsz}, amp {args.amp}, "
              f"{n} GAM block(s) - {rows[0]['figures']}")
    print(summary(rows))
    if not n:
        print("no GAM block found (as gam_triton.convert finds them): the model is measured as it is")
    print(f"wrote {base}.csv and {base}.png")
    for f in failures:
        print(f"gam_triton.bench: failed, left empty: {f}", file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
