"""Summarise a sweep: geomean speedups per dtype and mode, component rooflines, and the GPU goals.

    python perf/summary.py perf/results/<device>/results.csv

Reads results.csv; returns / prints markdown (the sweep writes it to ``summary.md``). The goals of
issue 4 are judged on GPU rows only:

* channel gate (gam_triton) >= 85% of the measured copy bandwidth at bf16 for every C >= 128;
* whole GAM, forward: >= 1.5x eager geomean (aim 2x) and ahead of torch.compile max-autotune;
* whole GAM, train: >= 1.3x eager geomean.

CPU rows are summarised as CPU figures and no goal is judged on them.
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Optional, Sequence

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import results  # noqa: E402

SHAPE_COLS = ["batch", "channels", "height", "width", "rate", "group"]


def speedups(df, kind: str, dtype: str, mode: str, base: str, provider: str = "gam_triton"):
    """Per-shape speedup of ``provider`` over ``base`` for one kind, dtype and mode (a pandas Series): the
    median of the per-round ratios (``vs_<base>`` column) where measured, else ``ms(base) / ms(provider)``."""
    d = df[(df["kind"] == kind) & (df["dtype"] == dtype) & (df["mode"] == mode)]
    a = d[d["provider"] == base].set_index(SHAPE_COLS)["ms"]
    pr = d[d["provider"] == provider].set_index(SHAPE_COLS)
    b = pr["ms"]
    both = a.index.intersection(b.index)
    sp = a.loc[both] / b.loc[both]
    col = f"vs_{base}"  # the per-round ratios, where the sweep measured them
    if col in pr.columns:
        sp = pr.loc[both, col].where(pr.loc[both, col].notna(), sp)
    return sp


def _fmt(x: float, pattern: str = "x{:.2f}") -> str:
    return "n/a" if x != x else pattern.format(x)


def _verdict(ok: Optional[bool]) -> str:
    return {True: "PASS", False: "FAIL", None: "not measured"}[ok]


def summarize(df) -> str:
    """Markdown summary of a loaded results DataFrame (see ``results.load``)."""
    df = results.latest_run(df)
    if df.empty:
        return "# Sweep summary\n\nNo measured rows.\n"
    first = df.iloc[0]
    on_gpu = first["device"] != "cpu"
    lines = ["# Sweep summary", "",
             f"{first['device']} | torch {first['torch']} | triton {first['triton']} | {first['date']}", ""]
    if str(first.get("note", "") or ""):
        lines += [f"**{first['note']}.**", ""]
    n_noisy = int((df["noisy"] == "True").sum()) if "noisy" in df.columns else 0
    if n_noisy:
        lines += [f"**{n_noisy} of {len(df)} rows flagged noisy** (their rounds disagree by more than x1.5: "
                  "the machine was busy); their figures are not readable, rerun them.", ""]
    lines += ["## Whole GAM block (YOLO form): geomean speedup of gam_triton", "",
              "| dtype | mode | shapes | vs eager | vs compile | vs compile-max-autotune |",
              "|---|---|---|---|---|---|"]
    goals: list[tuple[str, Optional[bool], str]] = []
    for dtype in sorted(set(df["dtype"])):
        for mode in ("forward", "train"):
            sp = {b: speedups(df, "gam", dtype, mode, b) for b in ("eager", "compile", "compile-max-autotune")}
            if all(len(s) == 0 for s in sp.values()):
                continue
            g = {b: results.geomean(s) for b, s in sp.items()}
            n = max(len(s) for s in sp.values())
            lines.append(f"| {dtype} | {mode} | {n} | {_fmt(g['eager'])} | {_fmt(g['compile'])} | "
                         f"{_fmt(g['compile-max-autotune'])} |")
            target = 1.5 if mode == "forward" else 1.3
            ok = None if g["eager"] != g["eager"] else g["eager"] >= target
            goals.append((f"GAM {mode} {dtype}: >= x{target} eager geomean" +
                          (" (aim x2)" if mode == "forward" else ""), ok, _fmt(g["eager"])))
            if mode == "forward":
                m = g["compile-max-autotune"]
                goals.append((f"GAM forward {dtype}: ahead of torch.compile max-autotune", None if m != m
                              else m > 1.0, _fmt(m)))
    lines += ["", "## Components alone (forward): gam_triton's fraction of the copy bandwidth", "",
              "| kind | dtype | shapes | median | min | min at C >= 128 |", "|---|---|---|---|---|---|"]
    comp = df[(df["kind"] != "gam") & (df["provider"] == "gam_triton")]
    for (kind, dtype), d in comp.groupby(["kind", "dtype"]):
        frac = d["roofline_frac"].dropna()
        big = d[d["channels"] >= 128]["roofline_frac"].dropna()
        lines.append(f"| {kind} | {dtype} | {len(d)} | {_fmt(frac.median(), '{:.0%}')} | "
                     f"{_fmt(frac.min(), '{:.0%}')} | {_fmt(big.min() if len(big) else float('nan'), '{:.0%}')} |")
        if kind == "channel_gate" and dtype == "bf16":
            goals.insert(0, ("channel gate bf16, C >= 128: >= 85% of copy bandwidth (every shape)",
                             None if not len(big) else bool(big.min() >= 0.85),
                             _fmt(big.min() if len(big) else float("nan"), "min {:.0%}")))
    lines += ["", "## Goals (issue 4; judged on a GPU only)", ""]
    if not on_gpu:
        lines.append("Not judged: these are CPU figures. Run the sweep on a GPU (`make gpu-suite`).")
    else:
        if not any(g[0].startswith("channel gate bf16") for g in goals):
            goals.insert(0, ("channel gate bf16, C >= 128: >= 85% of copy bandwidth (every shape)", None, "n/a"))
        lines += ["| goal | measured | verdict |", "|---|---|---|"]
        lines += [f"| {name} | {value} | {_verdict(ok)} |" for name, ok, value in goals]
    return "\n".join(lines) + "\n"


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="perf/summary.py", description="Summarise a sweep's results.csv.")
    ap.add_argument("csv")
    args = ap.parse_args(argv)
    if not os.path.isfile(args.csv):
        ap.error(f"no such file: {args.csv}")
    print(summarize(results.load(args.csv)), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
