"""The sweep's CSV: its columns, appending rows as they are measured, resuming, and loading for analysis.

``results.csv`` holds one row per (device, versions, dtype, mode, kind, shape, provider). Rows are appended
and flushed one at a time, so an interrupted sweep keeps everything measured so far; a rerun reads the
keys already present and skips them (``--retry-errors`` measures failed rows again; the newest row of a
key wins when the CSV is loaded).
"""
from __future__ import annotations

import csv
import os
from typing import Iterable

#: Columns of results.csv, in order. Units: ms (milliseconds, median / 20th / 80th percentile of one
#: call), gbps (1e9 bytes/s over the compulsory bytes), tflops (1e12 FLOP/s), peak_mem_mb (MiB one call
#: allocates beyond its inputs and weights, GPU only), roofline_frac (gbps / copy_gbps, component rows),
#: copy_gbps (a large device copy measured in the same run), compile_s (seconds of the untimed first call).
#: Added later (older files are upgraded in place, the new columns left empty): rounds (interleaved rounds the
#: providers of a shape were timed in), vs_eager / vs_eager_p20 / vs_eager_p80 and vs_compile (median, p20, p80
#: of the per-round speedups over eager / compile), spread (p80 / p20 across rounds of the ratio to eager, or of
#: the time for eager rows) and noisy ("True" when spread > 1.5: the row's figure is not readable).
COLUMNS = [
    "device", "torch", "triton", "dtype", "mode", "kind", "batch", "channels", "height", "width", "rate",
    "group", "provider", "ms", "ms_p20", "ms_p80", "gbps", "tflops", "peak_mem_mb", "roofline_frac",
    "copy_gbps", "compile_s", "reps", "error", "note", "date",
    "rounds", "vs_eager", "vs_eager_p20", "vs_eager_p80", "vs_compile", "spread", "noisy",
]
KEY_COLUMNS = ["device", "torch", "triton", "dtype", "mode", "kind", "batch", "channels", "height", "width",
               "rate", "group", "provider"]


def row_key(row: dict) -> tuple:
    """The identity of a row: everything but the measurements, as strings."""
    return tuple(str(row.get(c, "")) for c in KEY_COLUMNS)


def read_rows(path: str) -> list[dict]:
    if not os.path.exists(path) or os.path.getsize(path) == 0:
        return []
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def done_keys(path: str, retry_errors: bool = False) -> set[tuple]:
    """Keys of the rows already in ``path`` (without the failed ones when ``retry_errors``)."""
    done = set()
    for row in read_rows(path):
        if retry_errors and row.get("error"):
            continue
        done.add(row_key(row))
    return done


def _upgrade_header(path: str) -> None:
    """Rewrite a CSV written with other columns so that appending with COLUMNS stays consistent."""
    with open(path, newline="") as f:
        header = next(csv.reader(f), None)
    if header is None or header == COLUMNS:
        return
    rows = read_rows(path)
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)


class RowWriter:
    """Appends rows to a CSV, writing the header first when the file is new; flushes every row."""

    def __init__(self, path: str) -> None:
        self.path = path
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        fresh = not os.path.exists(path) or os.path.getsize(path) == 0
        if not fresh:
            _upgrade_header(path)
        self._file = open(path, "a", newline="")
        self._writer = csv.DictWriter(self._file, fieldnames=COLUMNS, extrasaction="ignore")
        if fresh:
            self._writer.writeheader()
            self._file.flush()

    def write(self, row: dict) -> None:
        self._writer.writerow({c: _fmt(row.get(c, "")) for c in COLUMNS})
        self._file.flush()
        os.fsync(self._file.fileno())

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> "RowWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _fmt(value) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return "" if value != value else f"{value:.6g}"  # NaN -> empty
    return str(value)


def load(path_or_rows) -> "pandas.DataFrame":  # noqa: F821
    """results.csv as a DataFrame of measured rows: failed rows dropped, then the newest row per key."""
    import pandas as pd

    df = pd.read_csv(path_or_rows, dtype={"group": str, "error": str, "note": str, "noisy": str},
                     keep_default_na=True)
    for col in COLUMNS:
        if col not in df.columns:
            df[col] = float("nan") if col not in ("error", "note", "group", "noisy") else ""
    df["noisy"] = df["noisy"].astype(object).fillna("").astype(str)
    df["error"] = df["error"].fillna("")
    df["note"] = df["note"].fillna("")
    df["group"] = df["group"].fillna("")
    df = df[(df["error"] == "") & df["ms"].notna()]
    return df.drop_duplicates(subset=KEY_COLUMNS, keep="last").reset_index(drop=True)


def latest_run(df):
    """The rows of the newest (device, torch, triton) in ``df``: a folder reused after an upgrade
    holds rows of several versions, and speedups must not mix them."""
    if df.empty:
        return df
    runs = df.assign(date=df["date"].astype(object).fillna("").astype(str)).groupby(
        ["device", "torch", "triton"], dropna=False)["date"].max().sort_values()
    device, torch_v, triton_v = runs.index[-1]
    keep = (df["device"] == device) & (df["torch"] == torch_v) & (df["triton"] == triton_v)
    return df[keep].reset_index(drop=True)


def shape_label(row) -> str:
    """'B16 C128 80x80 g' (grouped), '... p' (plain), no suffix for component rows."""
    group = str(row["group"])
    suffix = " g" if group == "True" else (" p" if group == "False" else "")
    return f"B{int(row['batch'])} C{int(row['channels'])} {int(row['height'])}x{int(row['width'])}{suffix}"


def geomean(values: Iterable[float]) -> float:
    import math

    vals = [v for v in values if v == v and v > 0]
    if not vals:
        return float("nan")
    return math.exp(sum(math.log(v) for v in vals) / len(vals))
