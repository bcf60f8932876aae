"""The notebook's figures (perf/report.py): axes, titles, labels, and that they draw what their inputs hold (bars =
the traffic counted or a handwritten CSV's speedups; measured points where the CSV puts them; the fallbacks say so)."""
import json
import os
import sys

import pandas as pd
import pytest
import torch

PERF = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "perf")
sys.path.insert(0, PERF)

import bench  # noqa: E402
import report  # noqa: E402
import traffic  # noqa: E402
from bench import CPU_NOTE, Shape  # noqa: E402

from gam_triton.reference import YoloGAM  # noqa: E402

TINY = Shape(1, 16, 4, 4, 4, True)
H100 = "NVIDIA H100 80GB HBM3"


def _bars(ax, x: float) -> list:
    """Heights of the bars of ``ax`` centred at ``x``."""
    return [p.get_height() for p in ax.patches if abs(p.get_x() + p.get_width() / 2 - x) < 1e-6]


def _texts(fig) -> str:
    """Every title, text and legend entry of ``fig``."""
    parts = [sub._suptitle.get_text() for sub in [fig, *getattr(fig, "subfigs", [])] if sub._suptitle is not None]
    for ax in fig.get_axes():
        parts += [t.get_text() for t in ax.texts] + [ax.get_title()]
    legends = [ax.get_legend() for ax in fig.get_axes() if ax.get_legend()] + list(fig.legends)
    return "\n".join(parts + [t.get_text() for leg in legends for t in leg.get_texts()])


def _results_csv(path, device=H100, note="", date="2026-11-25T10:00:00+00:00"):
    rows = [dict(mode=mode, kind="gam", batch=b, channels=c, height=h, group=g, provider=prov, ms=ms, gbps=100 / ms,
                 tflops=10 / ms) for b, c, h, g in [(1, 128, 80, "True"), (16, 256, 40, "False")]
            for mode in ("forward", "train")
            for prov, ms in [("eager", 2.0), ("compile", 1.5), ("compile-max-autotune", 1.2), ("gam_triton", 1.0)]]
    rows.append(dict(mode="forward", kind="channel_gate", batch=16, channels=256, height=40, group="",
                     provider="gam_triton", ms=0.01, gbps=2600, tflops=160))
    os.makedirs(os.path.dirname(str(path)), exist_ok=True)
    pd.DataFrame(rows).assign(device=device, torch="2.11.0", triton="3.6.0", dtype="bf16", width=lambda d: d["height"],
                              rate=4, copy_gbps=3000, note=note, date=date).to_csv(path, index=False)
    return str(path)


def test_traffic_figure_stacks_the_counted_bytes_and_launches(device):
    fig = report.traffic_figure(TINY, "fp32")
    axes = fig.get_axes()
    assert [ax.get_title().split(":")[-1].strip() for ax in axes] == ["bytes", "bytes", "launches", "launches"]
    assert axes[0].get_title().startswith("eval") and axes[1].get_title().startswith("train")
    assert "MB" in axes[0].get_ylabel() and "launches" in axes[2].get_ylabel()
    assert [t.get_text() for t in axes[0].get_xticklabels()] == ["eager", "gam_triton"]
    assert "computed" in fig._suptitle.get_text() and TINY.label() in fig._suptitle.get_text()
    dt = torch.float32
    e, g = traffic.eager_traffic(TINY, dt, "forward"), traffic.gam_triton_traffic(TINY, dt, "forward")
    assert sum(_bars(axes[0], 0)) == pytest.approx(e.bytes / 1e6)
    assert sum(_bars(axes[0], 1)) == pytest.approx(g.bytes / 1e6)
    assert sum(_bars(axes[2], 0)) == e.launches and sum(_bars(axes[2], 1)) == g.launches
    assert sum(_bars(axes[3], 0)) == traffic.eager_traffic(TINY, dt, "train").launches
    if device == "cpu":  # gam_triton's train traffic needs its kernels to run: counted on a GPU by default
        assert _bars(axes[3], 1) == [] and "not counted here" in _texts(fig)
    labels = [t.get_text() for t in fig.legends[0].get_texts()]
    assert "gam_triton channel_gate" in labels and "convolution" in labels


def test_roofline_places_kernels_and_block_under_the_roofs_then_the_measured_points(tmp_path):
    pts = {p["name"]: p for p in report.kernel_points(TINY, "bf16")}
    assert pts["channel gate kernel"]["flops"] == 4 * TINY.batch * TINY.pixels * TINY.channels * TINY.hidden
    blocks = [pts[f"whole block, {w}"]["intensity"] for w in ("ideal bytes", "gam_triton's traffic", "eager's traffic")]
    assert blocks[0] > blocks[1] > blocks[2] and pts["conv2 7x7"]["intensity"] > 0
    fig = report.roofline_figure([TINY], "bf16", None)
    ax = fig.get_axes()[0]
    assert (ax.get_xscale(), ax.get_yscale()) == ("log", "log") and "arithmetic intensity" in ax.get_xlabel()
    text = _texts(fig)
    assert "no measured results" in text and "H100 roof: 3.0 TB/s, 798" in text and "measured:" not in text
    xs, ys = next(line for line in ax.get_lines() if line.get_label().startswith("H100")).get_data()
    assert ys[0] == pytest.approx(3.0 * xs[0]) and ys[-1] == pytest.approx(798)  # 3.0 TB/s, then 798 TFLOP/s
    fig = report.roofline_figure([TINY], "bf16", _results_csv(tmp_path / "gpu" / "results.csv"))
    gate = [c for c in fig.get_axes()[0].collections
            if c.get_label() == f"measured: channel_gate gam_triton (GPU: {H100})"]
    assert gate[0].get_offsets().tolist() == [[pytest.approx(160 * 1e3 / 2600), pytest.approx(160)]]
    csv = _results_csv(tmp_path / "cpu" / "results.csv", device="cpu", note=f"{CPU_NOTE}; {bench.INTERPRET_NOTE}")
    text = _texts(report.roofline_figure([TINY], "bf16", csv))
    assert "measured: gam eager (CPU figures)" in text and "CPU copy bandwidth 3000 GB/s" in text
    assert "measured: gam gam_triton (interpreter: not performance)" in text


def test_speedup_figure_draws_the_ratios_of_the_csv(tmp_path):
    csv = _results_csv(tmp_path / "gpu" / "results.csv")
    fig = report.speedup_figure(csv)
    axes = fig.get_axes()
    assert [ax.get_title().split(" ")[0] for ax in axes] == ["forward", "train"]
    assert all("speedup" in ax.get_ylabel() for ax in axes)
    assert [t.get_text() for t in axes[0].get_xticklabels()] == ["B1 C128 80x80 g", "B16 C256 40x40 p"]
    heights = sorted(round(p.get_height(), 6) for p in axes[0].patches)
    assert heights == [1.2, 1.2, 1.5, 1.5, 2.0, 2.0]  # over max-autotune, compile, eager; two shapes
    text = _texts(fig)
    assert "over eager (geomean x2.00)" in text and "goal over eager: x1.5" in text
    assert f"GPU: {H100}" in fig._suptitle.get_text()
    fig = report.speedup_figure(_results_csv(tmp_path / "cpu" / "results.csv", device="cpu", note=CPU_NOTE))
    assert CPU_NOTE in fig._suptitle.get_text() and "goal" not in _texts(fig)


def test_newest_results_prefers_the_newest_gpu_run_and_ignores_cpu(tmp_path, monkeypatch):
    _results_csv(tmp_path / "cpu" / "results.csv", device="cpu", note=CPU_NOTE, date="2027-01-01T00:00:00")
    assert report.newest_results(str(tmp_path)) is None
    calls = []
    monkeypatch.setattr(report, "quick_cpu_sweep", lambda out: calls.append(out) or "swept.csv")
    assert report.results_or_quick_sweep("somewhere", str(tmp_path)) == "swept.csv" and calls == ["somewhere"]

    old = _results_csv(tmp_path / "NVIDIA-H100" / "results.csv", date="2026-11-01T00:00:00")
    new = _results_csv(tmp_path / "NVIDIA-H200" / "20261120" / "results.csv", device="NVIDIA H200",
                       date="2026-11-20T00:00:00")  # a gpu-check folder, one level deeper
    assert report.newest_results(str(tmp_path)) == new != old
    assert report.results_or_quick_sweep("elsewhere", str(tmp_path)) == new and calls == ["somewhere"]


def test_autotune_figure_shows_heuristic_or_tuned_tiles_and_the_compile_report(tmp_path):
    from gam_triton.ops import channel_gate

    shapes = [Shape(16, 64, 80, 80), Shape(16, 256, 40, 40)]
    fig = report.autotune_figure(shapes, "bf16", report=str(tmp_path / "none.csv"), cache_dir=str(tmp_path))
    assert "no compile report yet" in _texts(fig) and "no GPU tuning cache found" in _texts(fig)
    assert [t.get_text() for t in fig.get_axes()[0].get_yticklabels()] == ["B16 C64 80x80 g", "B16 C256 40x40 g"]
    table = report.tile_table(shapes, "bf16", cache_dir=str(tmp_path))
    assert set(table["source"]) == {"heuristic"} and len(table) == 3 * len(shapes)
    cfg = channel_gate.heuristic(256, 64, 1600, torch.bfloat16, target="gpu")  # the GPU's, even when interpreted
    got = table[(table["shape"] == "B16 C256 40x40 g") & (table["kernel"] == "channel_gate")].iloc[0]
    assert {k: int(got[k]) for k in cfg.kwargs} == cfg.kwargs and got["num_warps"] == cfg.num_warps
    key = report.kernel_keys(shapes[1], "bf16")["channel_gate"]
    entry = dict(config=dict(BLOCK_P=32, BLOCK_C=64, BLOCK_R=64, num_warps=8, num_stages=3), source="tuned",
                 ms=0.01, heuristic_ms=0.0125)
    data = {"format": 2, "device": H100, "triton": "3.6.0", "entries": {"channel_gate": {key: entry}}}
    (tmp_path / "NVIDIA_H100__triton-3.6.0.json").write_text(json.dumps(data))
    table = report.tile_table(shapes[1:], "bf16", cache_dir=str(tmp_path))
    row = table[table["kernel"] == "channel_gate"].iloc[0]
    assert (row["source"], row["tile"], row["device"]) == ("tuned", "P32 C64 R64 w8 s3", H100)
    assert row["speedup"] == pytest.approx(1.25) and set(table["source"]) == {"tuned", "heuristic"}
    rows = [dict(kernel=t["kernel"], arch=arch, **{f: t[f] for f in ("BLOCK_P", "BLOCK_C", "BLOCK_R", "num_warps",
                                                                     "num_stages")},
                 registers=regs, spill_bytes=regs // 8 - 12, warps_per_sm=16)
            for _, t in table.iterrows() for arch, regs in (("sm_90a", 96), ("sm_80", 128))]
    rows.append(dict(rows[0], BLOCK_P=2048, registers=250))  # a tile no shape uses: left out
    pd.DataFrame(rows).to_csv(tmp_path / "report.csv", index=False)
    fig = report.autotune_figure(shapes[1:], "bf16", report=str(tmp_path / "report.csv"), cache_dir=str(tmp_path))
    axes = {ax.get_ylabel(): ax for ax in fig.get_axes()}
    assert sorted(p.get_height() for p in axes["registers per thread"].patches) == [96] * 3 + [128] * 3
    assert sorted(p.get_height() for p in axes["spill bytes"].patches) == [0] * 3 + [4] * 3
    assert "sm_90a" in _texts(fig) and "tuned x1.25" in _texts(fig) and "no compile report yet" not in _texts(fig)
    pd.DataFrame([dict(kernel="x", registers=1)]).to_csv(tmp_path / "bad.csv", index=False)
    with pytest.raises(ValueError, match="arch"):
        report.read_compile_report(str(tmp_path / "bad.csv"))


def test_attention_figure_shows_both_sides_and_their_difference(device):
    torch.manual_seed(0)
    x = report.synthetic_input(16, 8)
    assert x.shape == (1, 16, 8, 8) and x.std() > 0.1
    assert not torch.allclose(x[0, 0], x[0, 1])  # channels mix the patterns differently
    fig = report.attention_figure(YoloGAM(16, 16), x, device)
    axes = fig.get_axes()
    images = [ax for ax in axes if ax.images]
    assert len(images) == 11  # 4 before, 4 after, 3 differences (the input's is a caption)
    title = fig._suptitle.get_text()
    assert "max |out gam_triton - out reference| =" in title and "YoloGAM" in title
    err = float(title.split("max |out gam_triton - out reference| = ")[1].split(" ")[0])
    assert err < 1e-5
    titles = " ".join(ax.get_title() for ax in axes)
    assert "channel gate" in titles and "spatial map" in titles and "|before - after|" in titles
