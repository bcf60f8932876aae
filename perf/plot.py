"""Draw a sweep's results.csv as PNGs (matplotlib), readable without the CSV.

    python perf/plot.py perf/results/<device>/results.csv [--out DIR]

Reads results.csv (newest row per key, failed rows left out). Writes into ``--out`` (default: the CSV's
folder), one figure per dtype and mode:

* ``gam_<mode>_<dtype>.png`` - the whole GAM block: TFLOP/s per provider across shapes, the speedup of
  every provider over eager, and over torch.compile (default and max-autotune), geomeans in the legends;
* ``components_<dtype>.png`` - channel gate and final gate alone (forward): GB/s per provider across
  shapes against the copy bandwidth measured in the same run (the roofline) and 85% of it.

CPU runs say so in every title: those are CPU figures, not GPU performance. Speedups are the medians of the
per-round ratios the sweep measured (``vs_eager``, ``vs_compile``; the ratio of the medians for older CSVs and
for max-autotune); rows flagged ``noisy`` get a hollow red ring and the title counts them.
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Optional, Sequence

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import results  # noqa: E402

PROVIDER_STYLE = {
    "eager": dict(color="#7f7f7f", marker="o"),
    "compile": dict(color="#1f77b4", marker="s"),
    "compile-max-autotune": dict(color="#9467bd", marker="D"),
    "gam_triton": dict(color="#d62728", marker="^"),
}
GOALS = {"forward": 1.5, "train": 1.3}  # speedup over eager the sweep must show on a GPU (issue 4)


def _sort_shapes(df):
    """Shapes in reading order: grouped before plain, big maps first, then channels, then batch."""
    d = df.assign(_g=df["group"].map({"True": 0, "False": 1}).fillna(2), _h=-df["height"])
    return d.sort_values(["_g", "_h", "channels", "batch"]).drop(columns=["_g", "_h"])


def _title(df, what: str) -> str:
    first = df.iloc[0]
    title = f"{what}\n{first['device']} | torch {first['torch']} | triton {first['triton']}"
    note = str(first.get("note", "") or "")
    if note:
        title += f"\n{note}"
    n_noisy = int((df["noisy"] == "True").sum()) if "noisy" in df.columns else 0
    if n_noisy:
        title += (f"\n{n_noisy} of {len(df)} rows NOISY (hollow markers): their rounds disagree by more than "
                  "x1.5; do not read them")
    return title


def _mark_noisy(ax, x, values, noisy) -> None:
    """Hollow red rings over the points of rows flagged noisy."""
    pts = [(i, v) for i, v, n in zip(x, values, noisy) if n and v == v]
    if pts:
        ax.scatter([p[0] for p in pts], [p[1] for p in pts], s=140, facecolors="none", edgecolors="#d62728",
                   linewidths=1.5, zorder=5)


def _speedup(ms, table, base: str, p: str):
    """Speedup of provider ``p`` over ``base`` per shape: the per-round ratio column (``vs_eager``,
    ``vs_compile``) where the sweep measured it, else the ratio of the medians."""
    sp = ms[base] / ms[p]
    col = table.get(f"vs_{base}")
    if col is not None and p in col.columns:
        sp = col[p].where(col[p].notna(), sp)
    return sp


def _pivot(df, value: str):
    if value == "noisy_flag":
        df = df.assign(noisy_flag=(df["noisy"] == "True").astype(float))
    d = df.assign(shape=[results.shape_label(r) for _, r in df.iterrows()])
    order = list(dict.fromkeys(d["shape"]))
    table = d.pivot_table(index="shape", columns="provider", values=value, aggfunc="last")
    return table.reindex(order)


def _providers(table) -> list[str]:
    known = [p for p in PROVIDER_STYLE if p in table.columns]
    return known + [p for p in table.columns if p not in PROVIDER_STYLE]


def _finish_axis(ax, labels: Sequence[str], ylabel: str, show_x: bool) -> None:
    ax.set_ylabel(ylabel)
    ax.grid(True, axis="y", alpha=0.3)
    ax.set_xticks(range(len(labels)))
    ax.set_xticklabels(labels if show_x else [], rotation=60, ha="right", fontsize=8)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8, loc="best")


def _fig_width(n: int) -> float:
    return max(8.0, min(40.0, 2.5 + 0.28 * n))


def plot_gam(df, mode: str, dtype: str, out_dir: str) -> Optional[str]:
    import matplotlib.pyplot as plt

    d = _sort_shapes(df[(df["kind"] == "gam") & (df["mode"] == mode) & (df["dtype"] == dtype)])
    if d.empty:
        return None
    ms = _pivot(d, "ms")
    tflops = _pivot(d, "tflops")
    noisy = _pivot(d, "noisy_flag").reindex(ms.index).fillna(0) > 0
    ratios = {f"vs_{b}": _pivot(d, f"vs_{b}").reindex(ms.index) for b in ("eager", "compile")}
    labels = list(ms.index)
    x = range(len(labels))
    fig, axes = plt.subplots(3, 1, figsize=(_fig_width(len(labels)), 11), sharex=True)
    for p in _providers(tflops):
        axes[0].plot(x, tflops[p], label=p, linestyle="-", **PROVIDER_STYLE.get(p, {}))
        if p in noisy.columns:
            _mark_noisy(axes[0], x, tflops[p], noisy[p])
    axes[0].set_yscale("log")
    _finish_axis(axes[0], labels, "TFLOP/s (higher is better)", False)
    axes[0].set_title("Throughput: model FLOPs / median time" + (" (train counts 3x forward)"
                                                                  if mode == "train" else ""), fontsize=10)

    if "eager" in ms.columns:
        for p in _providers(ms):
            if p == "eager":
                continue
            sp = _speedup(ms, ratios, "eager", p)
            axes[1].plot(x, sp, label=f"{p} (geomean x{results.geomean(sp):.2f})", **PROVIDER_STYLE.get(p, {}))
            if p in noisy.columns:
                _mark_noisy(axes[1], x, sp, noisy[p])
        axes[1].axhline(1.0, color="black", linewidth=0.8)
        axes[1].axhline(GOALS[mode], color="#d62728", linewidth=0.8, linestyle="--",
                        label=f"GPU goal for gam_triton: x{GOALS[mode]}")
        _finish_axis(axes[1], labels, "speedup over eager (x)", False)
        axes[1].set_title("Speedup over eager PyTorch (the reference YOLO GAM): median of per-round ratios",
                          fontsize=10)

    base = [b for b in ("compile", "compile-max-autotune") if b in ms.columns]
    for b in base:
        if "gam_triton" in ms.columns:
            sp = _speedup(ms, ratios, b, "gam_triton")
            style = dict(PROVIDER_STYLE["gam_triton"], linestyle="-" if b == "compile" else ":")
            if b != "compile":
                style.update(marker="v", color="#ff7f0e")
            axes[2].plot(x, sp, label=f"gam_triton vs {b} (geomean x{results.geomean(sp):.2f})", **style)
    axes[2].axhline(1.0, color="black", linewidth=0.8)
    _finish_axis(axes[2], labels, "speedup over torch.compile (x)", True)
    axes[2].set_title("gam_triton's speedup over torch.compile of the reference (default mode, "
                      "max-autotune)", fontsize=10)
    axes[2].set_xlabel("shape: batch, channels, map (g = grouped 7x7 convolutions, p = plain); rate 4")
    return _save(fig, _title(d, f"GAM block (YOLO form), {mode}, {dtype}"),
                 os.path.join(out_dir, f"gam_{mode}_{dtype}.png"))


def plot_components(df, dtype: str, out_dir: str) -> Optional[str]:
    import matplotlib.pyplot as plt

    d = df[(df["kind"].isin(["channel_gate", "final_gate"])) & (df["dtype"] == dtype)]
    if d.empty:
        return None
    kinds = [k for k in ("channel_gate", "final_gate") if k in set(d["kind"])]
    n_shapes = max(len(set(map(tuple, d[d["kind"] == k][["batch", "channels", "height", "width"]].values)))
                   for k in kinds)
    fig, axes = plt.subplots(len(kinds), 1, figsize=(_fig_width(n_shapes), 4.2 * len(kinds) + 1.5),
                             squeeze=False)
    for ax, kind in zip(axes[:, 0], kinds):
        k = _sort_shapes(d[d["kind"] == kind])
        gbps = _pivot(k, "gbps")
        noisy = _pivot(k, "noisy_flag").reindex(gbps.index).fillna(0) > 0
        labels = list(gbps.index)
        x = range(len(labels))
        for p in _providers(gbps):
            ax.plot(x, gbps[p], label=p, **PROVIDER_STYLE.get(p, {}))
            if p in noisy.columns:
                _mark_noisy(ax, x, gbps[p], noisy[p])
        copy = k["copy_gbps"].dropna()
        if len(copy):
            bw = float(copy.iloc[-1])
            ax.axhline(bw, color="black", linewidth=1.0, label=f"copy bandwidth {bw:.0f} GB/s (roofline)")
            ax.axhline(0.85 * bw, color="black", linewidth=0.8, linestyle="--", label="85% of copy bandwidth")
        ax.set_ylim(bottom=0)
        name = "Channel gate: x * MLP(x) per pixel" if kind == "channel_gate" else \
            "Final gate: x1 * shuffle(sigmoid(BN(y2)))"
        ax.set_title(f"{name} (forward)", fontsize=10)
        _finish_axis(ax, labels, "GB/s over compulsory bytes", True)
        ax.set_xlabel("shape: batch, channels, map")
    return _save(fig, _title(d, f"Fused components alone, {dtype}"),
                 os.path.join(out_dir, f"components_{dtype}.png"))


def _save(fig, title: str, path: str) -> str:
    """Title, lay out, write the PNG, free the figure; return its path."""
    import matplotlib.pyplot as plt

    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_csv(csv_path: str, out_dir: Optional[str] = None) -> list[str]:
    """Draw every figure the CSV has data for; return the PNG paths."""
    import matplotlib

    matplotlib.use("Agg")
    out_dir = out_dir or os.path.dirname(os.path.abspath(csv_path))
    os.makedirs(out_dir, exist_ok=True)
    df = results.latest_run(results.load(csv_path))
    paths = []
    for dtype in sorted(set(df["dtype"])):
        for mode in ("forward", "train"):
            p = plot_gam(df, mode, dtype, out_dir)
            if p:
                paths.append(p)
        p = plot_components(df, dtype, out_dir)
        if p:
            paths.append(p)
    return paths


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="perf/plot.py", description="Draw a sweep's results.csv as PNGs.")
    ap.add_argument("csv", help="results.csv written by perf/sweep.py")
    ap.add_argument("--out", help="folder for the PNGs (default: the CSV's folder)")
    args = ap.parse_args(argv)
    if not os.path.isfile(args.csv):
        ap.error(f"no such file: {args.csv}")
    paths = plot_csv(args.csv, args.out)
    for p in paths:
        print(p)
    if not paths:
        print("no measured rows to draw", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
