"""The reporting tool: a results.csv of ``perf/bench.py`` as PNGs and ``summary.md``, and the notebook's figures.

    python perf/report.py DIR            # DIR/results.csv -> DIR/speedup_<dtype>.png, floors_<dtype>.png, summary.md

Every figure says where its numbers come from: **computed** (``perf/traffic.py``), **CPU figures** (never GPU
performance), **interpreter** or **rehearsal** (never performance figures), or **GPU** (the card is named). Goals
are judged on GPU rows only. PNGs: :func:`speedup_figure` (the whole block against eager and torch.compile) and
:func:`floors_figure` (components and kernels alone against their floors). The notebook's figures:
:func:`traffic_figure`, :func:`roofline_figure`, :func:`speedup_figure`, :func:`autotune_figure` (tiles, tuning
cache, compile report of ``make compile-check``) and :func:`attention_figure`.
"""
from __future__ import annotations

import contextlib
import glob
import importlib
import io
import json
import math
import os
import sys
from typing import Optional, Sequence

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402

import bench  # noqa: E402
import traffic  # noqa: E402
from bench import CPU_NOTE, DTYPES, GPU_BANDWIDTH, GPU_PEAK_FLOPS, INTERPRET_NOTE, PERF_DIR, Shape  # noqa: E402

COMPUTED_NOTE = "computed by the traffic model (perf/traffic.py): not measured times"
COMPILE_REPORT = os.path.join(PERF_DIR, "compile", "report.csv")
RESULTS_DIR = os.path.join(PERF_DIR, "results")
GOALS = {"forward": 1.5, "train": 1.3}   # speedup over eager the block must show on a GPU (issue 4)
_PROVIDER_COLOURS = {"eager": "#7f7f7f", "compile": "#1f77b4", "compile-max-autotune": "#9467bd",
                     "gam_triton": "#d62728", "gam_triton-tconv": "#ff7f0e"}


def load(path):
    """results.csv as a DataFrame of the measured rows (failed rows dropped, the newest row of a key kept)."""
    import pandas as pd

    df = pd.read_csv(path, dtype={c: str for c in ("group", "error", "note", "noisy", "date")})
    for col in bench.COLUMNS:
        if col not in df.columns:
            df[col] = math.nan
    for col in ("group", "error", "note", "noisy", "date"):
        df[col] = df[col].astype(object).fillna("").astype(str)
    df = df[(df["error"] == "") & df["ms"].notna()]
    return df.drop_duplicates(subset=bench.KEY_COLUMNS, keep="last").reset_index(drop=True)


def latest_run(df):
    """The rows of the newest (device, torch, triton): speedups must not mix versions."""
    if df.empty:
        return df
    newest = df.groupby(["device", "torch", "triton"], dropna=False)["date"].max().sort_values().index[-1]
    return df[(df[["device", "torch", "triton"]] == list(newest)).all(axis=1)].reset_index(drop=True)


def shape_label(row) -> str:
    """'B16 C128 80x80 g' (grouped), '... p' (plain), no suffix for component rows."""
    suffix = {"True": " g", "False": " p"}.get(str(row["group"]), "")
    return f"B{int(row['batch'])} C{int(row['channels'])} {int(row['height'])}x{int(row['width'])}{suffix}"


def geomean(values) -> float:
    vals = [math.log(v) for v in values if v == v and v > 0]
    return math.exp(sum(vals) / len(vals)) if vals else math.nan


def data_label(df) -> str:
    """Where a results table's numbers come from: 'GPU: <name>', or the rehearsal / CPU / interpreter notes."""
    if df is None or len(df) == 0:
        return "no measurements"
    note, device = " ".join(str(n) for n in set(df["note"])), str(df.iloc[0]["device"])
    label = f"GPU: {device}" if device != "cpu" and CPU_NOTE not in note else CPU_NOTE
    label = ("REHEARSAL, not figures; " if "REHEARSAL" in note else "") + label
    return label + ("; " + INTERPRET_NOTE if "interpreter" in note else "")


def _sort_shapes(df):
    """Grouped before plain, big maps first, then channels, then batch."""
    d = df.assign(_g=df["group"].map({"True": 0, "False": 1}).fillna(2), _h=-df["height"])
    return d.sort_values(["_g", "_h", "channels", "batch"]).drop(columns=["_g", "_h"])


def _pivot(df, value: str):
    d = df.assign(shape=[shape_label(r) for _, r in df.iterrows()])
    return d.pivot_table(index="shape", columns="provider", values=value, aggfunc="last").reindex(
        list(dict.fromkeys(d["shape"])))


def speedups(df, kind: str, dtype: str, mode: str, base: str, provider: str = "gam_triton"):
    """Per shape, ``provider``'s speedup over ``base``: the per-round ratios' median (``vs_<base>``), else ms / ms."""
    d, cols = df[(df["kind"] == kind) & (df["dtype"] == dtype) & (df["mode"] == mode)], bench.KEY_COLUMNS[6:12]
    a, pr = d[d["provider"] == base].set_index(cols)["ms"], d[d["provider"] == provider].set_index(cols)
    both = a.index.intersection(pr.index)
    sp = a.loc[both] / pr.loc[both, "ms"]
    return pr.loc[both, f"vs_{base}"].where(pr.loc[both, f"vs_{base}"].notna(), sp) if f"vs_{base}" in pr else sp


def _x(v, pattern: str = "x{:.2f}") -> str:
    return "n/a" if v != v else pattern.format(v)


def summary(df) -> str:
    """Markdown: the block's speedups, components and kernels against their floors, the detector, the goals."""
    df = latest_run(df)
    if df.empty:
        return "# Sweep summary\n\nNo measured rows.\n"
    first, label, noisy = df.iloc[0], data_label(df), int((df["noisy"] == "True").sum())
    lines = ["# Sweep summary", "", f"{first['device']} | torch {first['torch']} | triton {first['triton']} | "
             f"{first['date']}", ""] + ([f"**{first['note']}.**", ""] if first["note"] else []) + ([
                 f"**{noisy} of {len(df)} rows flagged noisy** (their rounds disagree by more than x1.5: the machine "
                 "was busy); their figures are not readable, rerun them.", ""] if noisy else [])
    lines += ["## Whole GAM block (YOLO form): geomean speedup of gam_triton", "",
              "| dtype | mode | shapes | vs eager | vs compile | vs compile-max-autotune |", "|" + "---|" * 6]
    goals = []
    for dtype in sorted(set(df["dtype"])):
        for mode in ("forward", "train"):
            sp = {b: speedups(df, "gam", dtype, mode, b) for b in ("eager", "compile", "compile-max-autotune")}
            if all(len(s) == 0 for s in sp.values()):
                continue
            g = {b: geomean(s) for b, s in sp.items()}
            lines.append(f"| {dtype} | {mode} | {max(len(s) for s in sp.values())} | {_x(g['eager'])} | "
                         f"{_x(g['compile'])} | {_x(g['compile-max-autotune'])} |")
            e, m = g["eager"], g["compile-max-autotune"]
            goals.append((f"GAM {mode} {dtype}: >= x{GOALS[mode]} eager geomean" + " (aim x2)" * (mode == "forward"),
                          None if e != e else e >= GOALS[mode], _x(e)))
            goals += [(f"GAM forward {dtype}: ahead of torch.compile max-autotune", None if m != m else m > 1, _x(m))
                      ] if mode == "forward" else []
    lines += ["", "## Components and kernels alone: gam_triton's fraction of the floor", "",
              "Floor: compulsory bytes / the copy bandwidth measured in the same run (the convolutions: FLOPs / the "
              "measured matmul rate where that is longer).", "",
              "| kind | dtype | shapes | median | min | min at C >= 128 | median ms |", "|---|---|---|---|---|---|---|"]
    alone = df[~df["kind"].isin(["gam", "model"]) & (df["provider"] == "gam_triton")]
    gate = None
    for (kind, dtype), d in alone.groupby(["kind", "dtype"]):
        frac, big = d["roofline_frac"].dropna(), d[d["channels"] >= 128]["roofline_frac"].dropna()
        lines.append(f"| {kind} | {dtype} | {len(d)} | {_x(frac.median(), '{:.0%}')} | {_x(frac.min(), '{:.0%}')} | "
                     f"{_x(big.min() if len(big) else math.nan, '{:.0%}')} | {d['ms'].median():.4g} |")
        if kind == "channel_gate" and dtype == "bf16" and len(big):
            gate = (bool(big.min() >= 0.85), _x(big.min(), "min {:.0%}"))
    goals.insert(0, ("channel gate bf16, C >= 128: >= 85% of copy bandwidth (every shape)", *(gate or (None, "n/a"))))
    lines += ["", "## The detector (perf/model.py): GAM share of its time", "",
              "| mode | dtype | provider | ms | vs eager | GAM share |", "|" + "---|" * 6]
    for (mode, dtype), d in df[df["kind"] == "model"].groupby(["mode", "dtype"]):
        bare = d[d["provider"] == "no_gam"]["ms"].tolist() or [math.nan]
        lines += [f"| {mode} | {dtype} | {r['provider']} | {r['ms']:.3f} | {_x(r['vs_eager'])} | "
                  f"{_x(1 - bare[0] / r['ms'], '{:.0%}')} |" for _, r in d[d["provider"] != "no_gam"].iterrows()]
    lines += ["", "## Goals (issue 4; judged on a GPU only)", ""]
    if not label.startswith("GPU"):
        return "\n".join(lines + [f"Not judged: these are {label}. Run the sweep on a GPU (`make gpu-check`)."]) + "\n"
    lines += ["| goal | measured | verdict |", "|---|---|---|"]
    verdict = {True: "PASS", False: "FAIL", None: "not measured"}
    return "\n".join(lines + [f"| {n} | {v} | {verdict[ok]} |" for n, ok, v in goals]) + "\n"


def _figure(width: float, height: float):
    return importlib.import_module("matplotlib.figure").Figure(figsize=(width, height), layout="constrained")


def _dtype_name(dtype) -> str:
    names = {d: n for n, d in DTYPES.items()}
    if dtype in DTYPES or dtype in names:
        return names.get(dtype, dtype)
    raise ValueError(f"unknown dtype {dtype!r}: choose from {', '.join(DTYPES)}")


_fig_width = lambda n: max(8.0, min(40.0, 2.5 + 0.28 * n))  # noqa: E731


def yolo_shapes(batch: int = 16, group: bool = True) -> list[Shape]:
    """The YOLO widths at the 80/40/20 maps of a 640 input (GAM_NOTES.md), rate 4, at one batch size."""
    return [Shape(batch, c, s, s, 4, group) for c, s in bench.yolo_pairs()]


def floors_figure(df, dtype: str):
    """Bars per shape: each component's and kernel's time as a fraction of its floor, per provider."""
    d = latest_run(df)
    d = d[~d["kind"].isin(["gam", "model"]) & (d["dtype"] == dtype) & d["roofline_frac"].notna()]
    if d.empty:
        return None
    kinds = list(dict.fromkeys(d["kind"]))
    fig = _figure(_fig_width(3 * len(d)), 3.0 * len(kinds) + 1.5)
    for ax, kind in zip(fig.subplots(len(kinds), 1, squeeze=False)[:, 0], kinds):
        frac = _pivot(_sort_shapes(d[d["kind"] == kind]), "roofline_frac")
        width = 0.8 / len(frac.columns)
        for i, p in enumerate(frac.columns):
            ax.bar([x + (i - (len(frac.columns) - 1) / 2) * width for x in range(len(frac))], frac[p], width=width,
                   color=_PROVIDER_COLOURS.get(p, "#2ca02c"), label=p)
        ax.axhline(0.85, color="black", linestyle="--", linewidth=0.8, label="85% of the floor")
        ax.set_xticks(range(len(frac)), list(frac.index), fontsize=8)
        ax.set(ylabel="floor / time", title=kind)
        ax.grid(True, axis="y", alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(f"Components and kernels alone against their floors (bytes / copy bandwidth; convolutions: FLOPs "
                 f"/ matmul rate where longer), {dtype}\n{data_label(d)}", fontsize=10)
    return fig


def draw(csv_path: str, out_dir: Optional[str] = None) -> list[str]:
    """Write the PNGs of every figure the CSV has data for; return their paths."""
    out_dir = out_dir or os.path.dirname(os.path.abspath(csv_path))
    df = latest_run(load(csv_path))
    paths = []
    for dtype in sorted(set(df["dtype"])):
        figs = {f"floors_{dtype}.png": floors_figure(df, dtype)}
        if ((df["kind"] == "gam") & (df["dtype"] == dtype)).any():
            figs[f"speedup_{dtype}.png"] = speedup_figure(csv_path, dtype)
        for name, fig in figs.items():
            if fig is not None:
                paths.append(os.path.join(out_dir, name))
                fig.savefig(paths[-1], dpi=110)
    return paths


def traffic_figure(shape: Shape, dtype="bf16", train_device: Optional[str] = None):
    """Stacked bars: bytes (MB) and launches per op, eager beside gam_triton, eval and train, counted by
    ``perf/traffic.py`` on meta tensors; gam_triton's train traffic where its kernels run (``train_device``
    "cuda", the default on a GPU, or "cpu" under TRITON_INTERPRET=1), else that bar says it was not counted."""
    name = _dtype_name(dtype)
    dt, on_gpu = DTYPES[name], torch.cuda.is_available() and not bench.interpreting()
    train_device = train_device or ("cuda" if on_gpu else None)
    counted = {"eval": {"eager": traffic.eager_traffic(shape, dt, "forward"),
                        "gam_triton": traffic.gam_triton_traffic(shape, dt, "forward")},
               "train": {"eager": traffic.eager_traffic(shape, dt, "train")}}
    if train_device is not None:
        counted["train"]["gam_triton"] = traffic.gam_triton_traffic(shape, dt, "train", train_device)
    ops = list(dict.fromkeys(op for mode in counted.values() for t in mode.values() for op in t.by_op()))
    colour = dict(zip(ops, _colours(len(ops))))
    fig, providers = _figure(13, 8), ["eager", "gam_triton"]
    axes = fig.subplots(2, 2)
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
                           label=op.replace("aten::", "").replace("gam_triton::", "gam_triton "))
                    bottom += v
                ax.text(i, bottom, f"{bottom:.1f} MB" if what == "bytes" else f"{bottom:.0f}", ha="center",
                        va="bottom", fontsize=8)
            if what == "bytes":
                ideal = bench.gam_bytes(shape, dt, "train" if mode == "train" else "forward") / 1e6
                ax.axhline(ideal, color="black", linestyle="--", linewidth=0.8,
                           label=f"ideal: one perfect kernel ({ideal:.1f} MB)")
            ax.set_xticks(range(len(providers)), providers)
            ax.set(xlim=(-0.6, len(providers) - 0.4), ylabel=unit)
            ax.grid(True, axis="y", alpha=0.3)
            ax.set_title(f"{mode} ({'forward, no grad' if mode == 'eval' else 'forward + backward'}): {what}",
                         fontsize=10)
    handles: dict = {}
    for ax in axes.flat:
        handles.update({lab: h for h, lab in zip(*ax.get_legend_handles_labels()) if lab not in handles})
    _side_legend(fig, list(handles.values()), list(handles.keys()), title="op")
    floors = ", ".join(f"{g} {counted['eval']['gam_triton'].floor_us(bw):.0f} us" for g, bw in GPU_BANDWIDTH.items())
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

    return [colormaps["tab20"](i % 20) for i in range(n)]


def kernel_points(shape: Shape, dtype="bf16") -> list[dict]:
    """FLOPs and bytes (``perf/traffic.py``'s) of each kernel gam_triton launches in eval, and of the whole block at
    its ideal bytes, gam_triton's and eager's traffic."""
    dt, n = DTYPES[_dtype_name(dtype)], shape.batch * shape.pixels
    conv = 2 * n * shape.hidden * (shape.channels // shape.groups) * 49
    flops = {"gam_triton::channel_gate": bench.component_work("channel_gate", shape, dt)[1],
             "gam_triton::final_gate": bench.component_work("final_gate", shape, dt)[1],
             "aten::relu_": n * shape.hidden, "aten::convolution": conv}
    names = {"aten::convolution": ["conv1 7x7 (BN1 folded)", "conv2 7x7"], "aten::relu_": ["ReLU (z1)"],
             "gam_triton::channel_gate": ["channel gate kernel"], "gam_triton::final_gate": ["final gate kernel"]}
    seen: dict[str, int] = {}
    points, g = [], traffic.gam_triton_traffic(shape, dt, "forward")
    for op in g.ops:
        if not op.launches or op.name not in flops:
            continue
        k = seen.get(op.name, 0)
        seen[op.name] = k + 1
        label = names[op.name][min(k, len(names[op.name]) - 1)]
        points.append(dict(name=label, kind="kernel", flops=flops[op.name], bytes=op.bytes_read + op.bytes_written))
    total, e = bench.gam_flops(shape, "forward"), traffic.eager_traffic(shape, dt, "forward")
    points += [dict(name=f"whole block, {w}", kind="block", flops=total, bytes=b) for w, b in (
        ("ideal bytes", bench.gam_bytes(shape, dt, "forward")), ("gam_triton's traffic", g.bytes),
        ("eager's traffic", e.bytes))]
    return [dict(p, intensity=p["flops"] / p["bytes"]) for p in points]


def _roof(intensity, gpu: str) -> float:
    return min(GPU_PEAK_FLOPS[gpu], GPU_BANDWIDTH[gpu] * intensity) / 1e12


def roofline_figure(shapes: Sequence[Shape], dtype="bf16", csv: Optional[str] = None):
    """FLOP/byte against TFLOP/s: the H100 and H200 roofs, each kernel and the block of ``shapes`` on the H100 roof
    (computed), the measured rows of ``csv`` on top (CPU rows as CPU figures, under the CPU's copy bandwidth)."""
    import numpy as np

    name, fig, xs = _dtype_name(dtype), _figure(11, 6.5), np.logspace(-1, 3.5, 200)
    ax = fig.subplots()
    for gpu, style in (("H100", "-"), ("H200", "--")):
        ax.plot(xs, [_roof(x, gpu) for x in xs], color="black", linestyle=style, linewidth=1.2,
                label=f"{gpu} roof: {GPU_BANDWIDTH[gpu] / 1e12:.1f} TB/s, {GPU_PEAK_FLOPS[gpu] / 1e12:.0f} "
                      "bf16 TFLOP/s (GAM_NOTES)")
    markers, colours, palette = dict(kernel="o", block="s"), {}, _colours(20)
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
    ax.set(xscale="log", yscale="log", xlabel="arithmetic intensity: FLOP per byte of compulsory traffic",
           ylabel="TFLOP/s")
    ax.grid(True, which="both", alpha=0.25)
    _side_legend(fig, *ax.get_legend_handles_labels())
    shapes_text = ", ".join(s.label() for s in shapes)
    fig.suptitle(f"Roofline: gam_triton's kernels and the whole GAM block, {name}, {shapes_text}\n"
                 f"hollow: {COMPUTED_NOTE}\nfilled: measured ({source})", fontsize=10)
    return fig


def _short(source: str, provider: str) -> str:
    return source if source.startswith("GPU") else "interpreter: not performance" if (
        provider == "gam_triton" and "interpreter" in source) else "CPU figures"


def _measured_points(csv: Optional[str], dtype: str):
    if not csv or not os.path.isfile(csv):
        return None
    df = latest_run(load(csv))
    df = df[df["dtype"] == dtype] if (df["dtype"] == dtype).any() else df
    df = df[(df["tflops"] > 0) & (df["gbps"] > 0)]
    return None if df.empty else (df.assign(intensity=df["tflops"] * 1e3 / df["gbps"]), data_label(df))


def newest_results(results_dir: str = RESULTS_DIR) -> Optional[str]:
    """The results.csv of the newest GPU run under ``results_dir`` (any depth; CPU rows are no GPU results), by
    the dates in the files; None when there is none."""
    best, best_date = None, ""
    for path in sorted(glob.glob(os.path.join(results_dir, "**", "results.csv"), recursive=True)):
        try:
            df = load(path)
        except Exception:  # an unreadable CSV is skipped: the figure says what it used
            continue
        gpu = not df.empty and not (df["device"] == "cpu").all() and "REHEARSAL" not in " ".join(set(df["note"]))
        if gpu and (best is None or str(df["date"].max()) > best_date):
            best, best_date = path, str(df["date"].max())
    return best


def quick_cpu_sweep(out_dir: str, channels: int = 16, size: int = 4, budget_s: float = 0.05) -> str:
    """A tiny eval sweep of the block (B1 C16 4x4, eager / compile / gam_triton) into ``out_dir``: its results.csv.
    CPU figures (interpreter ones under TRITON_INTERPRET=1), 10-20 s; on a GPU it runs there (bf16): a toy shape."""
    argv = ["--quick", "--channels", str(channels), "--sizes", str(size), "--batches", "1", "--group", "grouped",
            "--kinds", "gam", "--modes", "forward", "--providers", "eager,compile,gam_triton",
            "--dtypes", "bf16" if torch.cuda.is_available() and not bench.interpreting() else "fp32",
            "--budget-s", str(budget_s), "--no-plot", "--out", out_dir]
    with contextlib.redirect_stdout(io.StringIO()):
        return bench.run(argv)


def results_or_quick_sweep(out_dir: str, results_dir: str = RESULTS_DIR) -> str:
    """:func:`newest_results` if there are GPU results, else :func:`quick_cpu_sweep` into ``out_dir``."""
    return newest_results(results_dir) or quick_cpu_sweep(out_dir)


def speedup_figure(csv: str, dtype: Optional[str] = None):
    """Bars per shape: gam_triton's speedup over eager, torch.compile (and max-autotune), one panel per mode."""
    df = latest_run(load(csv))
    df = df[df["kind"] == "gam"]
    if df.empty:
        raise ValueError(f"{csv}: no measured whole-block rows to draw")
    dtype = dtype or ("bf16" if "bf16" in set(df["dtype"]) else sorted(set(df["dtype"]))[0])
    df = df[df["dtype"] == dtype]
    modes = [m for m in ("forward", "train") if (df["mode"] == m).any()]
    n_shapes = df[["batch", "channels", "height", "width", "group"]].drop_duplicates().shape[0]
    fig = _figure(_fig_width(2 * n_shapes), 3.6 * len(modes) + 1.2)
    axes = fig.subplots(len(modes), 1, squeeze=False)[:, 0]
    label = data_label(df)
    for ax, mode in zip(axes, modes):
        ms = _pivot(_sort_shapes(df[df["mode"] == mode]), "ms")
        bases = [b for b in ("eager", "compile", "compile-max-autotune") if b in ms.columns]
        if "gam_triton" not in ms.columns or not bases:
            ax.text(0.5, 0.5, "no gam_triton row with a baseline", ha="center", transform=ax.transAxes)
            continue
        width = 0.8 / len(bases)
        for i, b in enumerate(bases):
            sp = ms[b] / ms["gam_triton"]
            ax.bar([x + (i - (len(bases) - 1) / 2) * width for x in range(len(sp))], sp, width=width,
                   color=_PROVIDER_COLOURS[b], label=f"over {b} (geomean x{geomean(sp):.2f})")
        ax.axhline(1.0, color="black", linewidth=0.8)
        if label.startswith("GPU"):
            ax.axhline(GOALS[mode], color="#d62728", linestyle="--", linewidth=0.8,
                       label=f"goal over eager: x{GOALS[mode]}")
        ax.set_xticks(range(len(ms.index)), list(ms.index), rotation=30, ha="right", fontsize=8)
        ax.set_ylabel("speedup of gam_triton (x)")
        ax.set_title(f"{mode} ({'eval, no grad' if mode == 'forward' else 'forward + backward'})", fontsize=10)
        ax.grid(True, axis="y", alpha=0.3)
        ax.legend(fontsize=8)
    axes[-1].set_xlabel("shape: batch, channels, map (g = grouped 7x7 convolutions, p = plain); rate 4")
    first = df.iloc[0]
    fig.suptitle(f"gam_triton's speedup over eager PyTorch and torch.compile, whole GAM block (YOLO form), "
                 f"{dtype}\n{first['device']} | torch {first['torch']} | triton {first['triton']}\n"
                 + label.replace("; ", "\n"), fontsize=10)
    return fig


def kernel_keys(shape: Shape, dtype="bf16", channels_last: bool = True, cuda: bool = True) -> dict:
    """The tuner's key of each kernel the block launches in eval (YOLO form), from the ops' own key functions."""
    from gam_triton.module import x1_channels_last
    from gam_triton.ops import channel_gate, elementwise
    from gam_triton.ops._runtime import dot_precision

    dt = DTYPES[_dtype_name(dtype)]
    x1_cl = x1_channels_last(channels_last, cuda, dt)
    b, c, cr, h, w = shape.batch, shape.channels, shape.hidden, shape.height, shape.width
    meta = lambda size, cl=False: torch.empty(size, dtype=dt, device="meta").contiguous(  # noqa: E731
        memory_format=torch.channels_last if cl else torch.contiguous_format)
    x, w1 = meta((b, c, h, w), channels_last), meta((cr, c))
    x1, z1 = meta((b, c, h, w), x1_cl), meta((b, cr, h, w), x1_cl)
    keys = {"channel_gate": channel_gate.key(x, w1, x1_cl, dot_precision(dt)),
            "bn_relu": elementwise.bn_relu_key(z1),
            "final_gate": elementwise.final_gate_key(x1, x1, 4, channels_last)}
    return {op: ",".join(map(str, k)) for op, k in keys.items()}


def tuning_cache(directory: Optional[str] = None) -> tuple[Optional[str], dict]:
    """(GPU name, {op: {key: entry}}) of the first GPU tuning cache in ``directory`` (default: the tuner's)."""
    from gam_triton.ops import _autotune

    for path in sorted(glob.glob(os.path.join(directory or _autotune.cache_dir(), "*.json"))):
        try:  # the interpreter's files, other formats and unreadable files are skipped
            with open(path) as f:
                data = json.load(f)
            if data.get("format") == _autotune.FORMAT and not os.path.basename(path).startswith("cpu-interpreter"):
                return str(data.get("device", os.path.basename(path))), {
                    op: {k: v for k, v in keys.items() if _autotune.decode(v) is not None}
                    for op, keys in data["entries"].items()}
        except (OSError, ValueError, KeyError, AttributeError, TypeError):
            pass
    return None, {}


def _tile(cfg) -> str:
    """A launch choice (a Config or a dict of its fields) in short: P, C, R, N, K blocks, w warps, s stages."""
    d = cfg if isinstance(cfg, dict) else dict(cfg.kwargs, num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    short = {"BLOCK_P": "P", "BLOCK_C": "C", "BLOCK_R": "R", "BLOCK_N": "N", "BLOCK_K": "K"}
    blocks = " ".join(f"{s}{int(d[k])}" for k, s in short.items() if d.get(k) == d.get(k) and d.get(k))
    return f"{blocks} w{int(d['num_warps'])} s{int(d['num_stages'])}"


def tile_table(shapes: Sequence[Shape], dtype="bf16", channels_last: bool = True,
               cache_dir: Optional[str] = None):
    """DataFrame, one row per (shape, kernel): the GPU heuristic's tile, or the tuned one where the tuning cache
    holds it (with its time against the heuristic's)."""
    import pandas as pd

    from gam_triton.module import x1_channels_last
    from gam_triton.ops import _autotune, channel_gate, elementwise

    dt, (device, cache), rows = DTYPES[_dtype_name(dtype)], tuning_cache(cache_dir), []
    for s in shapes:
        keys = kernel_keys(s, dtype, channels_last)
        x1_cl = x1_channels_last(channels_last, True, dt)
        heur = {"channel_gate": channel_gate.heuristic(s.channels, s.hidden, s.pixels, dt, target="gpu"),
                "bn_relu": elementwise.heuristic(s.hidden, s.pixels, x1_cl, target="gpu", batch=s.batch),
                "final_gate": elementwise.heuristic(s.channels, s.pixels, x1_cl, target="gpu", batch=s.batch)}
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


#: Column names the compile report may use for what the figure reads (first match wins).
_ALIASES = {"kernel": "name op", "arch": "sm target gpu_arch cc", "registers": "regs registers_per_thread num_regs",
            "spill_bytes": "spills spill_store_bytes n_spills", "shared_bytes": "shared_memory smem_bytes smem shared",
            "warps_per_sm": "active_warps_per_sm occupancy_warps_per_sm"}


def read_compile_report(path: str = COMPILE_REPORT):
    """The compile report as a DataFrame with the names of :data:`_ALIASES`, or None when there is none."""
    import pandas as pd

    if not os.path.isfile(path):
        return None
    df = pd.read_csv(path)
    lower = {c.lower(): c for c in df.columns}
    df = df.rename(columns={hit: want for want, names in _ALIASES.items()
                            for hit in [next((lower[a] for a in (want, *names.split()) if a in lower), None)] if hit})
    missing = [c for c in ("kernel", "arch", "registers") if c not in df.columns]
    if missing:
        raise ValueError(f"{path}: no column for {', '.join(missing)} (columns: {', '.join(map(str, df.columns))})")
    return df


def autotune_figure(shapes: Sequence[Shape], dtype="bf16", channels_last: bool = True,
                    report: str = COMPILE_REPORT, cache_dir: Optional[str] = None):
    """Top: the tile each shape gets per kernel (heuristic, or tuned from the tuning cache). Bottom: registers,
    spills and warps per SM of those tiles per architecture from the compile report (or 'no compile report yet')."""
    from matplotlib.patches import Rectangle

    table, name = tile_table(shapes, dtype, channels_last, cache_dir), _dtype_name(dtype)
    has_report = os.path.isfile(report)
    kernels, labels = list(dict.fromkeys(table["kernel"])), list(dict.fromkeys(table["shape"]))
    fig = _figure(13, (4.2 if has_report else 1.6) + 0.45 * len(labels) + 1.0)
    top, bottom = fig.subfigures(2, 1, height_ratios=[0.45 * len(labels) + 1.0, 4.2 if has_report else 1.6])
    ax = top.subplots()
    colours = {"heuristic": "#dddddd", "tuned": "#98df8a"}
    for i, shape in enumerate(labels):
        for j, op in enumerate(kernels):
            r = table[(table["shape"] == shape) & (table["kernel"] == op)].iloc[0]
            ax.add_patch(Rectangle((j - 0.5, i - 0.5), 1, 1, facecolor=colours[r["source"]], edgecolor="white"))
            timed = r["source"] == "tuned" and r["speedup"] == r["speedup"]
            text = r["tile"] + (f"\ntuned x{r['speedup']:.2f}" if timed else f"\n{r['source']}")
            ax.text(j, i, text, ha="center", va="center", fontsize=7)
    ax.set(xlim=(-0.5, len(kernels) - 0.5), ylim=(len(labels) - 0.5, -0.5), ylabel="shape (YOLO form)")
    ax.set_xticks(range(len(kernels)), kernels)
    ax.xaxis.tick_top()
    ax.set_yticks(range(len(labels)), labels, fontsize=8)
    device = table["device"].iloc[0] if len(table) else ""
    source = f"tuned entries from the tuning cache of {device} (GPU)" if device else \
        "no GPU tuning cache found: heuristic tiles (what an untuned GPU run launches)"
    top.suptitle(f"Autotuner: the tile each shape gets, {name}, {'channels_last' if channels_last else 'NCHW'} "
                 f"input (P = pixels, C = channels, R = C/r block, w = warps, s = stages)\n{source}", fontsize=10)
    _compile_panel(bottom, table, report)
    return fig


def _compile_panel(subfig, table, report: str) -> None:
    df = read_compile_report(report)
    if df is None:
        subfig.subplots().axis("off")
        where = os.path.relpath(report, os.path.dirname(PERF_DIR))
        subfig.axes[0].text(0.5, 0.5, f"no compile report yet\n({where} is written by `make compile-check`: registers, "
                            "spills, shared memory and warps per SM of each kernel's tiles per GPU architecture)",
                            ha="center", va="center", fontsize=10, wrap=True)
        subfig.suptitle("Compile report (ptxas): not available", fontsize=10)
        return
    tile = ("BLOCK_P", "BLOCK_C", "BLOCK_R", "num_warps", "num_stages")
    fields = [f for f in tile if f in df.columns]
    if fields:  # keep the tiles in use when the report has them
        sel = df.merge(table[["kernel", *fields]].drop_duplicates(), on=["kernel", *fields], how="inner")
        df = sel if not sel.empty else df
        df = df.assign(config=[f"{r['kernel']} " + _tile({f: r.get(f, 0) for f in tile}) for _, r in df.iterrows()])
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
            vals = [float(d.loc[[c], m].iloc[0]) if c in d.index and d.loc[[c], m].notna().any() else 0.0
                    for c in configs]
            ax.bar([x + (i - (len(archs) - 1) / 2) * width for x in range(len(configs))], vals, width=width,
                   label=arch)
        if m == "registers":
            ax.axhline(255, color="black", linestyle="--", linewidth=0.8, label="255: hardware limit")
        ax.set_xticks(range(len(configs)), configs, rotation=60, ha="right", fontsize=6)
        ax.set(ylim=(0, None), ylabel=lab)
        ax.set_title(lab, fontsize=9)
        ax.grid(True, axis="y", alpha=0.3)
        ax.legend(fontsize=7, title="arch")
    subfig.suptitle(f"Compile report (ptxas, {os.path.basename(report)}): the tiles above per GPU architecture "
                    "(compiled ahead of time: no GPU run)", fontsize=10)


def synthetic_input(channels: int = 16, size: int = 48, seed: int = 0) -> torch.Tensor:
    """A 1 x C x size x size image: each channel mixes a disc, a square, a ring, two gradients and stripes."""
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
    """Input, channel gate, spatial map and output (channel means) of ``reference`` and of its conversion on ``x``,
    and their differences."""
    from gam_triton import GAM
    from gam_triton.ops._runtime import use_triton
    from gam_triton.inspect import attention_maps

    reference, x = reference.eval().to(device), x.to(device)
    before, after = attention_maps(reference, x), attention_maps(GAM.from_module(reference).eval(), x)
    cols = [("input x", lambda m: x), ("channel gate", lambda m: m.channel_gate),
            ("spatial map", lambda m: m.spatial_map), ("output", lambda m: m.out)]
    fig, rows = _figure(13, 9), [("reference (eager PyTorch)", before), ("gam_triton (GAM.from_module)", after)]
    axes = fig.subplots(3, 4)
    for j, (title, get) in enumerate(cols):
        imgs = [get(m)[0].float().mean(0).cpu().numpy() for _, m in rows]
        lo, hi = min(float(i.min()) for i in imgs), max(float(i.max()) for i in imgs)
        for i, ((row_name, _), img) in enumerate(zip(rows, imgs)):
            im = axes[i][j].imshow(img, cmap="viridis", vmin=lo, vmax=hi)
            axes[i][j].set_title(f"{title}\n{row_name}" if i == 0 or j == 0 else title, fontsize=8)
        fig.colorbar(im, ax=axes[:2, j].tolist(), shrink=0.7)
        if j == 0:
            continue
        diff = (get(rows[0][1])[0].float() - get(rows[1][1])[0].float()).abs().amax(0).cpu().numpy()
        im = axes[2][j].imshow(diff, cmap="magma", vmin=0.0, vmax=max(float(diff.max()), 1e-12))
        axes[2][j].set_title(f"|before - after| of the {title}\n(max over channels; max {diff.max():.1e})", fontsize=8)
        fig.colorbar(im, ax=axes[2][j], shrink=0.7)
    axes[2][0].axis("off")
    axes[2][0].text(0.5, 0.5, "before: the reference module's\nown layers and forward\n\nafter: gam_triton's GAM\n"
                    "built by GAM.from_module\n(same weights)", ha="center", va="center", fontsize=9,
                    transform=axes[2][0].transAxes)
    for ax in axes.flat:
        ax.set(xticks=[], yticks=[])
    axes[0][0].set_ylabel("before conversion"), axes[1][0].set_ylabel("after conversion")
    err = (before.out.float() - after.out.float()).abs().max().item()
    path = ("Triton kernels (GPU)" if x.is_cuda and use_triton(x) else
            "Triton kernels in the interpreter" if use_triton(x) else "gam_triton's PyTorch path")
    form = (f"channel gate {'sigmoid' if before.channel_sigmoid else 'identity (no sigmoid)'}, spatial map "
            f"{'shuffled in %d groups' % before.shuffle_groups if before.shuffle_groups else 'not shuffled'}")
    fig.suptitle(f"What the block computes: {type(reference).__name__} ({form}), input {tuple(x.shape)}\n"
                 "images are means over the channels; weights as given (random: an untrained block)\n"
                 f"max |out gam_triton - out reference| = {err:.2e} (gam_triton ran {path})\n"
                 f"out = x * channel gate * spatial map to {max(before.residual, after.residual):.1e}", fontsize=10)
    return fig


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``perf/report.py DIR``: DIR/results.csv -> the PNGs and summary.md in DIR."""
    folder = (argv or sys.argv[1:] or [""])[0]
    path = os.path.join(folder, "results.csv")
    if not os.path.isfile(path):
        sys.exit(f"usage: perf/report.py DIR (a folder holding results.csv of perf/bench.py); none in {folder!r}")
    paths, text = draw(path, folder), summary(load(path))
    with open(os.path.join(folder, "summary.md"), "w") as f:
        f.write(text)
    print(text + f"{len(paths)} figure(s) in {folder}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
