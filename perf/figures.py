"""The notebook's figures: where the bytes, launches and time go, the tiles, and what the block computes.

Each function returns a ``matplotlib.figure.Figure`` (made without pyplot: nothing global, nothing shown
or written) with a title that says where its numbers come from, in the sweep's words (``perf/NOTES.md``):
**computed** (the traffic model), **CPU figures** (never GPU performance), **interpreter** (Triton's
interpreter, never a performance figure) or **GPU** (the card is named).

* :func:`traffic_figure` - eager's bytes and launches op by op beside gam_triton's (``perf/traffic.py``),
  eval and train, at one shape;
* :func:`roofline_figure` - each kernel and the whole block by arithmetic intensity under the H100 / H200
  ceilings of GAM_NOTES, with the measured points of a results CSV on top;
* :func:`speedup_figure` - gam_triton's speedup over eager and torch.compile per shape, from a results CSV;
  :func:`newest_results` finds committed GPU results, :func:`results_or_quick_sweep` falls back on a tiny
  CPU sweep;
* :func:`autotune_figure` - the tile each shape gets per kernel (heuristic, or tuned from the tuning cache)
  and, once ``perf/compile/report.csv`` exists, registers / spills / warps per SM per GPU architecture;
* :func:`attention_figure` - the channel gate and spatial map of a block before and after conversion
  (:func:`gam_triton.inspect.attention_maps`) on :func:`synthetic_input`.
"""
from __future__ import annotations

import contextlib
import glob
import io
import json
import math
import os
import sys
from typing import Optional, Sequence

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402

import common  # noqa: E402
import components  # noqa: E402
import results  # noqa: E402
import traffic  # noqa: E402
from common import CPU_NOTE, DTYPES, GPU_BANDWIDTH, INTERPRET_NOTE, PERF_DIR, Shape  # noqa: E402

#: bf16 dense matmul ceilings of the target GPUs, FLOP/s (GAM_NOTES.md: H100 ~798, H200 770-800 TFLOP/s).
GPU_PEAK_FLOPS = {"H100": 798e12, "H200": 790e12}
COMPUTED_NOTE = "computed by the traffic model (perf/traffic.py): not measured times"
#: Written by perf/compile_check.py (registers, spills, shared memory, warps per SM per architecture; not committed).
COMPILE_REPORT = os.path.join(PERF_DIR, "compile", "report.csv")
RESULTS_DIR = os.path.join(PERF_DIR, "results")

_PROVIDER_COLOURS = {"eager": "#7f7f7f", "compile": "#1f77b4", "compile-max-autotune": "#9467bd",
                     "gam_triton": "#d62728"}


def _figure(width: float, height: float):
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), layout="constrained")


def _dtype_name(dtype) -> str:
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise ValueError(f"unknown dtype {dtype!r}: choose from {', '.join(DTYPES)}")
        return dtype
    for name, d in DTYPES.items():
        if d == dtype:
            return name
    raise ValueError(f"unsupported dtype {dtype}: choose from {', '.join(DTYPES)}")


def data_label(df) -> str:
    """Where a results table's numbers come from: 'GPU: <name>', or the CPU / interpreter notes."""
    if df is None or len(df) == 0:
        return "no measurements"
    device = str(df.iloc[0]["device"])
    note = " ".join(str(n) for n in set(df["note"]))
    if device != "cpu" and CPU_NOTE not in note:
        label = f"GPU: {device}"
    else:
        label = CPU_NOTE
    if "interpreter" in note:
        label += "; " + INTERPRET_NOTE
    return label


def yolo_shapes(batch: int = 16, group: bool = True) -> list[Shape]:
    """The YOLO widths at the 80/40/20 maps of a 640 input (GAM_NOTES.md), rate 4, at one batch size."""
    return [Shape(batch, c, s, s, 4, group) for c, s in common.yolo_pairs()]


# --- 1. bytes and launches, op by op -------------------------------------------------------------------
def _op_label(name: str) -> str:
    return name.replace("aten::", "").replace("gam_triton::", "gam_triton ")


def traffic_figure(shape: Shape, dtype="bf16", train_device: Optional[str] = None):
    """Stacked bars: bytes (MB) and launches per op, eager beside gam_triton, eval and train.

    Counted by ``perf/traffic.py`` on meta tensors (any shape is instant). gam_triton's train traffic is
    counted where its kernels run: ``train_device`` "cuda" (default on a GPU) or "cpu" under
    TRITON_INTERPRET=1 (slow: tiny shapes only); otherwise that bar says it was not counted.
    """
    name = _dtype_name(dtype)
    dt = DTYPES[name]
    if train_device is None and torch.cuda.is_available() and not common.interpreting():
        train_device = "cuda"
    counted = {"eval": {"eager": traffic.eager_traffic(shape, dt, "forward"),
                        "gam_triton": traffic.gam_triton_traffic(shape, dt, "forward")},
               "train": {"eager": traffic.eager_traffic(shape, dt, "train")}}
    if train_device is not None:
        counted["train"]["gam_triton"] = traffic.gam_triton_traffic(shape, dt, "train", train_device)
    ops = list(dict.fromkeys(op for mode in counted.values() for t in mode.values() for op in t.by_op()))
    cmap = _colours(len(ops))
    colour = {op: cmap[i] for i, op in enumerate(ops)}

    fig = _figure(13, 8)
    axes = fig.subplots(2, 2)
    providers = ["eager", "gam_triton"]
    for col, mode in enumerate(("eval", "train")):
        for row, (what, unit) in enumerate((("bytes", "MB moved (compulsory, per op)"),
                                            ("launches", "kernel launches"))):
            ax = axes[row][col]
            for i, prov in enumerate(providers):
                t = counted[mode].get(prov)
                if t is None:
                    ax.text(i, 0, "not counted here:\ngam_triton's train\ntraffic is counted\nwhere its kernels run\n"
                            "(GPU, or interpreter)", ha="center", va="bottom", fontsize=7)
                    continue
                bottom = 0.0
                for op, (n, b) in t.by_op().items():
                    v = b / 1e6 if what == "bytes" else n
                    ax.bar(i, v, bottom=bottom, color=colour[op], edgecolor="white", linewidth=0.5, width=0.6,
                           label=_op_label(op))
                    bottom += v
                ax.text(i, bottom, f"{bottom:.1f} MB" if what == "bytes" else f"{bottom:.0f}", ha="center",
                        va="bottom", fontsize=8)
            if what == "bytes":
                ideal = common.gam_bytes(shape, dt, "train" if mode == "train" else "forward") / 1e6
                ax.axhline(ideal, color="black", linestyle="--", linewidth=0.8,
                           label=f"ideal: one perfect kernel ({ideal:.1f} MB)")
            ax.set_xticks(range(len(providers)))
            ax.set_xticklabels(providers)
            ax.set_xlim(-0.6, len(providers) - 0.4)
            ax.set_ylabel(unit)
            ax.grid(True, axis="y", alpha=0.3)
            ax.set_title(f"{mode} ({'forward, no grad' if mode == 'eval' else 'forward + backward'}): {what}",
                         fontsize=10)
    handles = {}
    for ax in axes.flat:
        for h, lab in zip(*ax.get_legend_handles_labels()):
            handles.setdefault(lab, h)
    _side_legend(fig, list(handles.values()), list(handles.keys()), title="op")
    floors = ", ".join(f"{gpu} {t.floor_us(bw):.0f} us" for gpu, bw in GPU_BANDWIDTH.items()
                       for t in [counted["eval"]["gam_triton"]])
    fig.suptitle(f"Where eager's bytes and launches go, op by op, beside gam_triton's: {shape.label()}, {name}, "
                 f"rate {shape.rate}\n{COMPUTED_NOTE}; gam_triton eval floor (bytes / bandwidth): {floors}",
                 fontsize=10)
    return fig


def _side_legend(fig, handles, labels, title: Optional[str] = None) -> None:
    """A legend right of the axes ("outside" placement needs matplotlib >= 3.7)."""
    import matplotlib

    major, minor = (int(v) for v in matplotlib.__version__.split(".")[:2])
    where = dict(loc="outside right center") if (major, minor) >= (3, 7) else \
        dict(loc="center left", bbox_to_anchor=(1.0, 0.5))
    fig.legend(handles, labels, fontsize=7, title=title, **where)


def _colours(n: int) -> list:
    from matplotlib import colormaps

    cmap = colormaps["tab20"]
    return [cmap(i % 20) for i in range(n)]


# --- 2. roofline ---------------------------------------------------------------------------------------
def kernel_points(shape: Shape, dtype="bf16") -> list[dict]:
    """FLOPs and compulsory bytes of each kernel gam_triton launches (eval) and of the whole block.

    Bytes per kernel are those ``perf/traffic.py`` counts; FLOPs: channel MLP 4*N*C*C/r, each 7x7
    convolution 2*N*(C/r)*(C/g)*49, final gate 5 per element, ReLU 1 per element. The whole block is
    placed three times: at its ideal bytes (one perfect kernel), gam_triton's and eager's traffic.
    """
    name = _dtype_name(dtype)
    dt = DTYPES[name]
    n = shape.batch * shape.pixels
    conv = 2 * n * shape.hidden * (shape.channels // shape.groups) * 49
    flops = {"gam_triton::channel_gate": components.channel_gate_flops(shape),
             "gam_triton::final_gate": components.final_gate_flops(shape),
             "aten::relu_": n * shape.hidden, "aten::convolution": conv}
    names = {"aten::convolution": ["conv1 7x7 (BN1 folded)", "conv2 7x7"], "aten::relu_": ["ReLU (z1)"],
             "gam_triton::channel_gate": ["channel gate kernel"], "gam_triton::final_gate": ["final gate kernel"]}
    seen: dict[str, int] = {}
    points = []
    g = traffic.gam_triton_traffic(shape, dt, "forward")
    for op in g.ops:
        if not op.launches or op.name not in flops:
            continue
        k = seen.get(op.name, 0)
        seen[op.name] = k + 1
        label = names[op.name][min(k, len(names[op.name]) - 1)]
        points.append(dict(name=label, kind="kernel", flops=flops[op.name], bytes=op.bytes_read + op.bytes_written))
    total = common.gam_flops(shape, "forward")
    e = traffic.eager_traffic(shape, dt, "forward")
    ideal = common.gam_bytes(shape, dt, "forward")
    points += [dict(name="whole block, ideal bytes", kind="block", flops=total, bytes=ideal),
               dict(name="whole block, gam_triton's traffic", kind="block", flops=total, bytes=g.bytes),
               dict(name="whole block, eager's traffic", kind="block", flops=total, bytes=e.bytes)]
    for p in points:
        p["intensity"] = p["flops"] / p["bytes"]
    return points


def _roof(intensity, gpu: str) -> float:
    return min(GPU_PEAK_FLOPS[gpu], GPU_BANDWIDTH[gpu] * intensity) / 1e12


def roofline_figure(shapes: Sequence[Shape], dtype="bf16", csv: Optional[str] = None):
    """Arithmetic intensity (FLOP/byte) against TFLOP/s: H100 and H200 roofs, each kernel and the whole
    block of ``shapes`` placed on the H100 roof (computed), and the measured rows of ``csv`` on top
    (GPU rows as such; CPU rows labelled CPU figures, with the CPU's measured copy bandwidth as their roof).
    """
    import numpy as np

    name = _dtype_name(dtype)
    fig = _figure(11, 6.5)
    ax = fig.subplots()
    xs = np.logspace(-1, 3.5, 200)
    for gpu, style in (("H100", "-"), ("H200", "--")):
        ax.plot(xs, [_roof(x, gpu) for x in xs], color="black", linestyle=style, linewidth=1.2,
                label=f"{gpu} roof: {GPU_BANDWIDTH[gpu] / 1e12:.1f} TB/s, {GPU_PEAK_FLOPS[gpu] / 1e12:.0f} "
                      "bf16 TFLOP/s (GAM_NOTES)")
    markers = dict(kernel="o", block="s")
    colours: dict[str, object] = {}
    palette = _colours(20)
    for shape in shapes:
        for p in kernel_points(shape, name):
            c = colours.setdefault(p["name"], palette[len(colours) * 2 % 20])
            label = f"{p['name']} (computed, on the H100 roof)" if len(shapes) == 1 or shape == shapes[0] else None
            ax.scatter(p["intensity"], _roof(p["intensity"], "H100"), marker=markers[p["kind"]], s=60,
                       facecolors="none", edgecolors=[c], linewidths=1.5, label=label, zorder=3)
    measured = _measured_points(csv, name)
    if measured is None:
        ax.text(0.02, 0.02, "no measured results: computed positions only", transform=ax.transAxes, fontsize=9)
        source = "no measured results"
    else:
        df, source = measured
        for (kind, prov), d in df.groupby(["kind", "provider"]):
            ax.scatter(d["intensity"], d["tflops"], marker={"gam": "*"}.get(kind, "^"), s=50,
                       color=_PROVIDER_COLOURS.get(prov, "#2ca02c"), alpha=0.85, zorder=4,
                       label=f"measured: {kind} {prov} ({_short(source, prov)})")
        if source.startswith(CPU_NOTE):
            bw = float(df["copy_gbps"].dropna().iloc[-1]) if df["copy_gbps"].notna().any() else None
            if bw:
                ax.plot(xs, bw * 1e9 * xs / 1e12, color="grey", linestyle=":",
                        label=f"CPU copy bandwidth {bw:.0f} GB/s (measured; CPU figures)")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("arithmetic intensity: FLOP per byte of compulsory traffic")
    ax.set_ylabel("TFLOP/s")
    ax.grid(True, which="both", alpha=0.25)
    _side_legend(fig, *ax.get_legend_handles_labels())
    shapes_text = ", ".join(s.label() for s in shapes)
    fig.suptitle(f"Roofline: gam_triton's kernels and the whole GAM block, {name}, {shapes_text}\n"
                 f"hollow: {COMPUTED_NOTE}\nfilled: measured ({source})", fontsize=10)
    return fig


def _short(source: str, provider: str) -> str:
    if source.startswith("GPU"):
        return source
    if provider == "gam_triton" and "interpreter" in source:
        return "interpreter: not performance"
    return "CPU figures"


def _measured_points(csv: Optional[str], dtype: str):
    if not csv or not os.path.isfile(csv):
        return None
    df = results.latest_run(results.load(csv))
    if df.empty:
        return None
    if (df["dtype"] == dtype).any():
        df = df[df["dtype"] == dtype]
    df = df[(df["tflops"] > 0) & (df["gbps"] > 0)]
    if df.empty:
        return None
    df = df.assign(intensity=df["tflops"] * 1e3 / df["gbps"])
    return df, data_label(df)


# --- 3. speedups from the newest results ---------------------------------------------------------------
def newest_results(results_dir: str = RESULTS_DIR) -> Optional[str]:
    """The results.csv of the newest committed GPU run under ``results_dir`` (``cpu*`` folders are not
    GPU results), by the dates in the files; None when there is none."""
    best, best_date = None, ""
    for path in sorted(glob.glob(os.path.join(results_dir, "*", "results.csv"))):
        if os.path.basename(os.path.dirname(path)).startswith("cpu"):
            continue
        try:
            df = results.load(path)
        except Exception:  # an unreadable CSV is skipped: the figure says what it used
            continue
        if df.empty or (df["device"] == "cpu").all():
            continue
        date = str(df["date"].astype(str).max())
        if best is None or date > best_date:
            best, best_date = path, date
    return best


def quick_cpu_sweep(out_dir: str, channels: int = 16, size: int = 4, modes: Sequence[str] = ("forward",),
                    budget_s: float = 0.05) -> str:
    """A tiny CPU sweep of the whole block (one grouped shape, batch 1, eager / compile / gam_triton) into
    ``out_dir``; returns its results.csv. CPU figures (interpreter figures for gam_triton under
    TRITON_INTERPRET=1). About 10-20 s, most of it torch.compile. On a GPU machine it runs on the GPU (bf16)
    and its rows say so: a toy shape, not the sweep (``make gpu-suite``)."""
    import sweep

    argv = ["--quick", "--channels", str(channels), "--sizes", str(size), "--batches", "1", "--group", "grouped",
            "--kinds", "gam", "--modes", ",".join(modes), "--providers", "eager,compile,gam_triton",
            "--budget-s", str(budget_s), "--no-plot",
            "--out", out_dir]
    with contextlib.redirect_stdout(io.StringIO()):
        return sweep.run(argv)


def results_or_quick_sweep(out_dir: str, results_dir: str = RESULTS_DIR) -> str:
    """:func:`newest_results` if there are GPU results, else :func:`quick_cpu_sweep` into ``out_dir``."""
    return newest_results(results_dir) or quick_cpu_sweep(out_dir)


def speedup_figure(csv: str, dtype: Optional[str] = None):
    """Bars per shape: gam_triton's speedup over eager, torch.compile (and max-autotune where measured),
    one panel per mode, geomeans in the legend, from the newest run in ``csv``."""
    import plot

    df = results.latest_run(results.load(csv))
    df = df[df["kind"] == "gam"]
    if df.empty:
        raise ValueError(f"{csv}: no measured whole-block rows to draw")
    dtypes = sorted(set(df["dtype"]))
    dtype = dtype or ("bf16" if "bf16" in dtypes else dtypes[0])
    df = df[df["dtype"] == dtype]
    modes = [m for m in ("forward", "train") if (df["mode"] == m).any()]
    n_shapes = df[["batch", "channels", "height", "width", "group"]].drop_duplicates().shape[0]
    fig = _figure(plot._fig_width(2 * n_shapes), 3.6 * len(modes) + 1.2)
    axes = fig.subplots(len(modes), 1, squeeze=False)[:, 0]
    label = data_label(df)
    for ax, mode in zip(axes, modes):
        ms = plot._pivot(plot._sort_shapes(df[df["mode"] == mode]), "ms")
        bases = [b for b in ("eager", "compile", "compile-max-autotune") if b in ms.columns]
        if "gam_triton" not in ms.columns or not bases:
            ax.text(0.5, 0.5, "no gam_triton row with a baseline", ha="center", transform=ax.transAxes)
            continue
        width = 0.8 / len(bases)
        for i, b in enumerate(bases):
            sp = ms[b] / ms["gam_triton"]
            ax.bar([x + (i - (len(bases) - 1) / 2) * width for x in range(len(sp))], sp, width=width,
                   color=_PROVIDER_COLOURS[b], label=f"over {b} (geomean x{results.geomean(sp):.2f})")
        ax.axhline(1.0, color="black", linewidth=0.8)
        if label.startswith("GPU"):
            ax.axhline(plot.GOALS[mode], color="#d62728", linestyle="--", linewidth=0.8,
                       label=f"goal over eager: x{plot.GOALS[mode]}")
        ax.set_xticks(range(len(ms.index)))
        ax.set_xticklabels(list(ms.index), rotation=30, ha="right", fontsize=8)
        ax.set_ylabel("speedup of gam_triton (x)")
        ax.set_title(f"{mode} ({'eval, no grad' if mode == 'forward' else 'forward + backward'})", fontsize=10)
        ax.grid(True, axis="y", alpha=0.3)
        ax.legend(fontsize=8)
    axes[-1].set_xlabel("shape: batch, channels, map (g = grouped 7x7 convolutions, p = plain); rate 4")
    first = df.iloc[0]
    fig.suptitle(f"gam_triton's speedup over eager PyTorch and torch.compile, whole GAM block (YOLO form), "
                 f"{dtype}\n{first['device']} | torch {first['torch']} | triton {first['triton']}\n"
                 + label.replace("; ", "\n"),
                 fontsize=10)
    return fig


# --- 4. the autotuner --------------------------------------------------------------------------------------
def _meta(shape, dtype: torch.dtype, channels_last: bool = False) -> torch.Tensor:
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    return torch.empty(shape, dtype=dtype, device="meta", memory_format=fmt)


def kernel_keys(shape: Shape, dtype="bf16", channels_last: bool = True, cuda: bool = True) -> dict:
    """The tuner's key string of each kernel the GAM module launches in eval for ``shape`` (YOLO form: shuffle
    in 4), from the ops' own key functions: x1 is channels_last for a channels_last input, or for fp16/bf16
    on CUDA; the convolutions keep x1's layout; the output keeps the input's."""
    from gam_triton.ops import channel_gate, elementwise
    from gam_triton.ops._runtime import dot_precision

    dt = DTYPES[_dtype_name(dtype)]
    x1_cl = channels_last or (cuda and dt != torch.float32)
    b, c, cr, h, w = shape.batch, shape.channels, shape.hidden, shape.height, shape.width
    x, w1 = _meta((b, c, h, w), dt, channels_last), _meta((cr, c), dt)
    x1, z1 = _meta((b, c, h, w), dt, x1_cl), _meta((b, cr, h, w), dt, x1_cl)
    keys = {"channel_gate": channel_gate.key(x, w1, x1_cl, dot_precision(dt)),
            "bn_relu": elementwise.bn_relu_key(z1),
            "final_gate": elementwise.final_gate_key(x1, x1, 4, channels_last)}
    return {op: ",".join(map(str, k)) for op, k in keys.items()}


def tuning_cache(directory: Optional[str] = None) -> tuple[Optional[str], dict]:
    """(GPU name, {op: {key: entry}}) of the first GPU tuning cache file in ``directory`` (default the
    tuner's, ``$GAM_TRITON_CACHE_DIR`` or ``~/.cache/gam_triton``); (None, {}) when there is none. Entries
    whose choice does not decode are left out."""
    from gam_triton.ops import _autotune

    for path in sorted(glob.glob(os.path.join(directory or _autotune.cache_dir(), "*.json"))):
        if os.path.basename(path).startswith("cpu-interpreter"):
            continue
        try:
            with open(path) as f:
                data = json.load(f)
            if data.get("format") != _autotune.FORMAT:
                continue
            entries = {op: {k: v for k, v in keys.items() if _autotune.decode(v) is not None}
                       for op, keys in data["entries"].items()}
        except (OSError, ValueError, KeyError, AttributeError, TypeError):
            continue
        return str(data.get("device", os.path.basename(path))), entries
    return None, {}


def _tile(cfg) -> str:
    """A launch choice (a ``triton.Config``, or a dict of its fields) in short: P = pixels, C = channels,
    R = C/r block, N/K = the convolutions' blocks, w = warps, s = stages; absent or zero blocks left out."""
    d = cfg if isinstance(cfg, dict) else dict(cfg.kwargs, num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    short = {"BLOCK_P": "P", "BLOCK_C": "C", "BLOCK_R": "R", "BLOCK_N": "N", "BLOCK_K": "K"}
    blocks = " ".join(f"{s}{int(d[k])}" for k, s in short.items() if d.get(k) == d.get(k) and d.get(k))
    return f"{blocks} w{int(d['num_warps'])} s{int(d['num_stages'])}"


def tile_table(shapes: Sequence[Shape], dtype="bf16", channels_last: bool = True,
               cache_dir: Optional[str] = None):
    """DataFrame, one row per (shape, kernel): the GPU heuristic's tile and, where the tuning cache holds
    one, the tuned tile (with its time against the heuristic's)."""
    import pandas as pd

    from gam_triton.ops import _autotune, channel_gate, elementwise

    dt = DTYPES[_dtype_name(dtype)]
    device, cache = tuning_cache(cache_dir)
    rows = []
    for s in shapes:
        keys = kernel_keys(s, dtype, channels_last)
        x1_cl = channels_last or dt != torch.float32
        heur = {"channel_gate": channel_gate.heuristic(s.channels, s.hidden, s.pixels, dt, target="gpu"),
                "bn_relu": elementwise.heuristic(s.hidden, s.pixels, x1_cl, target="gpu"),
                "final_gate": elementwise.heuristic(s.channels, s.pixels, x1_cl, target="gpu")}
        for op, cfg in heur.items():
            entry = cache.get(op, {}).get(keys[op])
            row = dict(shape=s.label(), kernel=op, key=keys[op], **cfg.kwargs, num_warps=cfg.num_warps,
                       num_stages=cfg.num_stages, source="heuristic", tile=_tile(cfg), speedup=float("nan"),
                       device=device or "")
            if entry is not None and entry.get("source") == "tuned":
                tuned = _autotune.decode(entry)
                row.update(tuned.kwargs, num_warps=tuned.num_warps, num_stages=tuned.num_stages, source="tuned",
                           tile=_tile(tuned))
                if entry.get("ms") and entry.get("heuristic_ms"):
                    row["speedup"] = entry["heuristic_ms"] / entry["ms"]
            rows.append(row)
    return pd.DataFrame(rows)


_REPORT_ALIASES = {
    "kernel": ("kernel", "name", "op"),
    "arch": ("arch", "sm", "target", "gpu_arch", "cc"),
    "registers": ("registers", "regs", "registers_per_thread", "num_regs", "n_regs"),
    "spill_bytes": ("spill_bytes", "spills", "spill_store_bytes", "spill_stores", "n_spills"),
    "shared_bytes": ("shared_bytes", "shared_memory", "smem_bytes", "shared_mem_bytes", "smem", "shared"),
    "warps_per_sm": ("warps_per_sm", "active_warps_per_sm", "occupancy_warps_per_sm", "max_warps_per_sm"),
}


def read_compile_report(path: str = COMPILE_REPORT):
    """The compile report as a DataFrame with normalised column names (kernel, arch, the Config fields,
    registers, spill_bytes, shared_bytes, warps_per_sm), or None when the file does not exist."""
    import pandas as pd

    if not os.path.isfile(path):
        return None
    df = pd.read_csv(path)
    lower = {c.lower(): c for c in df.columns}
    rename = {}
    for want, aliases in _REPORT_ALIASES.items():
        for a in aliases:
            if a in lower:
                rename[lower[a]] = want
                break
    df = df.rename(columns=rename)
    missing = [c for c in ("kernel", "arch", "registers") if c not in df.columns]
    if missing:
        raise ValueError(f"{path}: no column for {', '.join(missing)} (columns: {', '.join(map(str, df.columns))})")
    return df


def autotune_figure(shapes: Sequence[Shape], dtype="bf16", channels_last: bool = True,
                    report: str = COMPILE_REPORT, cache_dir: Optional[str] = None):
    """Top: the tile each shape gets per kernel (heuristic, or tuned where the tuning cache has it).
    Bottom: registers, spills and warps per SM of those tiles per GPU architecture from the compile
    report, or a 'no compile report yet' panel."""
    table = tile_table(shapes, dtype, channels_last, cache_dir)
    name = _dtype_name(dtype)
    kernels = list(dict.fromkeys(table["kernel"]))
    labels = list(dict.fromkeys(table["shape"]))
    has_report = os.path.isfile(report)
    fig = _figure(13, (4.2 if has_report else 1.6) + 0.45 * len(labels) + 1.0)
    top, bottom = fig.subfigures(2, 1, height_ratios=[0.45 * len(labels) + 1.0, 4.2 if has_report else 1.6])
    ax = top.subplots()
    colours = {"heuristic": "#dddddd", "tuned": "#98df8a"}
    for i, shape in enumerate(labels):
        for j, op in enumerate(kernels):
            r = table[(table["shape"] == shape) & (table["kernel"] == op)].iloc[0]
            ax.add_patch(_rect(j - 0.5, i - 0.5, colours[r["source"]]))
            timed = r["source"] == "tuned" and r["speedup"] == r["speedup"]
            text = r["tile"] + (f"\ntuned x{r['speedup']:.2f}" if timed else f"\n{r['source']}")
            ax.text(j, i, text, ha="center", va="center", fontsize=7)
    ax.set_xlim(-0.5, len(kernels) - 0.5)
    ax.set_ylim(len(labels) - 0.5, -0.5)
    ax.set_xticks(range(len(kernels)))
    ax.set_xticklabels(kernels)
    ax.xaxis.tick_top()
    ax.set_yticks(range(len(labels)))
    ax.set_yticklabels(labels, fontsize=8)
    ax.set_ylabel("shape (YOLO form)")
    device = table["device"].iloc[0] if len(table) else ""
    source = f"tuned entries from the tuning cache of {device} (GPU)" if device else \
        "no GPU tuning cache found: heuristic tiles (what an untuned GPU run launches)"
    top.suptitle(f"Autotuner: the tile each shape gets, {name}, {'channels_last' if channels_last else 'NCHW'} "
                 f"input (P = pixels, C = channels, R = C/r block, w = warps, s = stages)\n{source}", fontsize=10)
    _compile_panel(bottom, table, report)
    return fig


def _rect(x, y, colour):
    from matplotlib.patches import Rectangle

    return Rectangle((x, y), 1, 1, facecolor=colour, edgecolor="white")


def _compile_panel(subfig, table, report: str) -> None:
    df = read_compile_report(report)
    if df is None:
        ax = subfig.subplots()
        ax.axis("off")
        ax.text(0.5, 0.5, f"no compile report yet\n({os.path.relpath(report, os.path.dirname(PERF_DIR))} is "
                "written by `make compile-check`: registers, spills, shared memory and warps per SM of each "
                "kernel's tiles per GPU architecture)", ha="center", va="center", fontsize=10, wrap=True)
        subfig.suptitle("Compile report (ptxas): not available", fontsize=10)
        return
    fields = [f for f in ("BLOCK_P", "BLOCK_C", "BLOCK_R", "num_warps", "num_stages") if f in df.columns]
    if fields:  # keep the tiles in use when the report has them
        used = table[["kernel", *fields]].drop_duplicates()
        sel = df.merge(used, on=["kernel", *fields], how="inner")
        df = sel if not sel.empty else df
        df = df.assign(config=[f"{r['kernel']} " + _tile({f: r[f] if f in fields else 0
                                                            for f in ("BLOCK_P", "BLOCK_C", "BLOCK_R",
                                                                      "num_warps", "num_stages")})
                               for _, r in df.iterrows()])
    else:
        df = df.assign(config=df["kernel"].astype(str))
    configs = list(dict.fromkeys(df["config"]))[:16]
    df = df[df["config"].isin(configs)]
    archs = sorted(set(df["arch"].astype(str)))
    metrics = [(m, lab) for m, lab in (("registers", "registers per thread"), ("spill_bytes", "spill bytes"),
                                       ("warps_per_sm", "warps per SM (occupancy)")) if m in df.columns]
    axes = subfig.subplots(1, len(metrics), squeeze=False)[0]
    width = 0.8 / max(1, len(archs))
    for ax, (m, lab) in zip(axes, metrics):
        for i, arch in enumerate(archs):
            d = df[df["arch"].astype(str) == arch].set_index("config")
            vals = [float(d[m].iloc[0]) if c in d.index and d.loc[[c], m].notna().any() else 0.0 for c in configs]
            ax.bar([x + (i - (len(archs) - 1) / 2) * width for x in range(len(configs))], vals, width=width,
                   label=arch)
        if m == "registers":
            ax.axhline(255, color="black", linestyle="--", linewidth=0.8, label="255: hardware limit")
        ax.set_xticks(range(len(configs)))
        ax.set_xticklabels(configs, rotation=60, ha="right", fontsize=6)
        ax.set_ylim(bottom=0)
        ax.set_ylabel(lab)
        ax.set_title(lab, fontsize=9)
        ax.grid(True, axis="y", alpha=0.3)
        ax.legend(fontsize=7, title="arch")
    subfig.suptitle(f"Compile report (ptxas, {os.path.basename(report)}): the tiles above per GPU architecture "
                    "(compiled ahead of time: no GPU run)", fontsize=10)


# --- 5. what the block computes ------------------------------------------------------------------------------
def synthetic_input(channels: int = 16, size: int = 48, seed: int = 0) -> torch.Tensor:
    """A 1 x C x size x size image with structure: each channel mixes a disc, a square, a ring, two
    gradients and stripes with random weights (plus a little noise)."""
    gen = torch.Generator().manual_seed(seed)
    t = torch.linspace(-1, 1, size)
    yy, xx = torch.meshgrid(t, t, indexing="ij")
    r = torch.sqrt((xx + 0.35) ** 2 + (yy + 0.3) ** 2)
    patterns = torch.stack([
        (r < 0.35).float(),                                                          # disc
        ((xx - 0.4).abs() < 0.3).float() * ((yy - 0.35).abs() < 0.3).float(),       # square
        ((torch.sqrt((xx - 0.35) ** 2 + (yy + 0.4) ** 2) - 0.3).abs() < 0.07).float(),  # ring
        (xx + 1) / 2,                                                                # horizontal gradient
        (yy + 1) / 2,                                                                # vertical gradient
        (torch.sin(6 * math.pi * (xx + yy) / 2) > 0).float() * (yy > 0.5).float(),  # stripes
    ])
    mix = torch.randn(channels, patterns.shape[0], generator=gen)
    img = torch.einsum("cp,phw->chw", mix, patterns) + 0.05 * torch.randn(channels, size, size, generator=gen)
    return img.unsqueeze(0)


def attention_figure(reference: torch.nn.Module, x: torch.Tensor, device: str = "cpu"):
    """Input, channel gate, spatial map and output (channel means) of ``reference`` and of
    ``GAM.from_module(reference)`` on ``x``, and their differences; the max |difference| in the title."""
    from gam_triton import GAM
    from gam_triton.ops._runtime import use_triton
    from gam_triton.inspect import attention_maps

    reference = reference.eval().to(device)
    x = x.to(device)
    converted = GAM.from_module(reference).eval()
    before, after = attention_maps(reference, x), attention_maps(converted, x)
    cols = [("input x", lambda m: x), ("channel gate", lambda m: m.channel_gate),
            ("spatial map", lambda m: m.spatial_map), ("output", lambda m: m.out)]
    fig = _figure(13, 9)
    axes = fig.subplots(3, 4)
    rows = [("reference (eager PyTorch)", before), ("gam_triton (GAM.from_module)", after)]
    for j, (title, get) in enumerate(cols):
        imgs = [get(m)[0].float().mean(0).cpu().numpy() for _, m in rows]
        lo = min(float(i.min()) for i in imgs)
        hi = max(float(i.max()) for i in imgs)
        for i, ((row_name, _), img) in enumerate(zip(rows, imgs)):
            im = axes[i][j].imshow(img, cmap="viridis", vmin=lo, vmax=hi)
            axes[i][j].set_title(f"{title}\n{row_name}" if i == 0 or j == 0 else title, fontsize=8)
        fig.colorbar(im, ax=axes[:2, j].tolist(), shrink=0.7)
        if j == 0:
            continue
        diff = (get(rows[0][1])[0].float() - get(rows[1][1])[0].float()).abs().amax(0).cpu().numpy()
        im = axes[2][j].imshow(diff, cmap="magma", vmin=0.0, vmax=max(float(diff.max()), 1e-12))
        axes[2][j].set_title(f"|before - after| of the {title}\n(max over channels; max {float(diff.max()):.1e})",
                             fontsize=8)
        fig.colorbar(im, ax=axes[2][j], shrink=0.7)
    axes[2][0].axis("off")
    axes[2][0].text(0.5, 0.5, "before: the reference module's\nown layers and forward\n\nafter: gam_triton's GAM\n"
                    "built by GAM.from_module\n(same weights)", ha="center", va="center", fontsize=9,
                    transform=axes[2][0].transAxes)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    for i, lab in enumerate(["before conversion", "after conversion"]):
        axes[i][0].set_ylabel(lab)
    err = (before.out.float() - after.out.float()).abs().max().item()
    path = ("Triton kernels (GPU)" if x.is_cuda and use_triton(x) else
            "Triton kernels in the interpreter" if use_triton(x) else "gam_triton's PyTorch path")
    form = (f"channel gate {'sigmoid' if before.channel_sigmoid else 'identity (no sigmoid)'}, spatial map "
            f"{'shuffled in %d groups' % before.shuffle_groups if before.shuffle_groups else 'not shuffled'}")
    fig.suptitle(f"What the block computes: {type(reference).__name__} ({form}), input {tuple(x.shape)}\n"
                 "images are means over the channels; weights as given (random: an untrained block)\n"
                 f"max |out gam_triton - out reference| = {err:.2e} (gam_triton ran {path})\n"
                 f"out = x * channel gate * spatial map to {max(before.residual, after.residual):.1e}",
                 fontsize=10)
    return fig
