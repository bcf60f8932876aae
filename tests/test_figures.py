"""The notebook's figures (perf/figures.py) and gam_triton.inspect.attention_maps.

Each figure is checked for its axes, titles and labels and for drawing what its inputs hold: bar heights
equal the traffic counted or the speedups of a handwritten CSV, measured points sit where the CSV puts them,
the "no GPU results" and "no compile report yet" fallbacks say so. Shapes are tiny (interpreter).
"""
import json
import os
import sys

import pandas as pd
import pytest
import torch

PERF = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "perf")
sys.path.insert(0, PERF)

import common  # noqa: E402
import figures  # noqa: E402
import traffic  # noqa: E402
from common import CPU_NOTE, Shape  # noqa: E402

from gam_triton import GAM  # noqa: E402
from gam_triton.ops import _autotune  # noqa: E402
from gam_triton.ops._runtime import INTERPRET  # noqa: E402
from gam_triton.inspect import attention_maps  # noqa: E402
from gam_triton.reference import PaperGAM, SeedGAM, YoloGAM  # noqa: E402

TINY = Shape(1, 16, 4, 4, 4, True)
H100 = "NVIDIA H100 80GB HBM3"


def _bars(ax, x: float) -> list:
    """Heights of the bars of ``ax`` centred at ``x``."""
    return [p.get_height() for p in ax.patches if abs(p.get_x() + p.get_width() / 2 - x) < 1e-6]


def _texts(fig) -> str:
    parts = []
    for sub in [fig, *getattr(fig, "subfigs", [])]:
        if sub._suptitle is not None:
            parts.append(sub._suptitle.get_text())
    for ax in fig.get_axes():
        parts += [t.get_text() for t in ax.texts] + [ax.get_title()]
        leg = ax.get_legend()
        if leg:
            parts += [t.get_text() for t in leg.get_texts()]
    for leg in fig.legends:
        parts += [t.get_text() for t in leg.get_texts()]
    return "\n".join(parts)


def _results_csv(path, device=H100, note="", date="2026-11-25T10:00:00+00:00"):
    rows = []
    for (b, c, h, g) in [(1, 128, 80, "True"), (16, 256, 40, "False")]:
        for mode in ("forward", "train"):
            for prov, ms in [("eager", 2.0), ("compile", 1.5), ("compile-max-autotune", 1.2), ("gam_triton", 1.0)]:
                rows.append(dict(device=device, torch="2.11.0", triton="3.6.0", dtype="bf16", mode=mode, kind="gam",
                                 batch=b, channels=c, height=h, width=h, rate=4, group=g, provider=prov, ms=ms,
                                 gbps=100 / ms, tflops=10 / ms, copy_gbps=3000, note=note, date=date))
    rows.append(dict(device=device, torch="2.11.0", triton="3.6.0", dtype="bf16", mode="forward",
                     kind="channel_gate", batch=16, channels=256, height=40, width=40, rate=4, group="",
                     provider="gam_triton", ms=0.01, gbps=2600, tflops=160, copy_gbps=3000, note=note, date=date))
    os.makedirs(os.path.dirname(str(path)), exist_ok=True)
    pd.DataFrame(rows).to_csv(path, index=False)
    return str(path)


# --- traffic -----------------------------------------------------------------------------------------------
def test_traffic_figure_stacks_the_counted_bytes_and_launches(device):
    fig = figures.traffic_figure(TINY, "fp32")
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


@pytest.mark.skipif(not INTERPRET and not torch.cuda.is_available(),
                    reason="gam_triton's train traffic is counted where its kernels run (CUDA or TRITON_INTERPRET=1)")
def test_traffic_figure_counts_gam_triton_train_where_kernels_run(device):
    fig = figures.traffic_figure(TINY, "fp32", train_device=device)
    launches = fig.get_axes()[3]
    want = traffic.gam_triton_traffic(TINY, torch.float32, "train", device).launches
    assert sum(_bars(launches, 1)) == want
    assert "not counted here" not in _texts(fig)


# --- roofline ------------------------------------------------------------------------------------------------
def test_kernel_points_place_kernels_and_block():
    pts = {p["name"]: p for p in figures.kernel_points(TINY, "bf16")}
    for name in ("channel gate kernel", "final gate kernel", "conv1 7x7 (BN1 folded)", "conv2 7x7"):
        assert name in pts and pts[name]["intensity"] > 0
    cg = pts["channel gate kernel"]
    assert cg["flops"] == 4 * TINY.batch * TINY.pixels * TINY.channels * TINY.hidden
    blocks = [pts[f"whole block, {w}"]["intensity"] for w in ("ideal bytes", "gam_triton's traffic", "eager's traffic")]
    assert blocks[0] > blocks[1] > blocks[2]  # eager moves the most bytes for the same FLOPs


def test_roofline_without_results_draws_the_computed_points_only():
    fig = figures.roofline_figure([TINY], "bf16", None)
    ax = fig.get_axes()[0]
    assert ax.get_xscale() == "log" and ax.get_yscale() == "log"
    assert "arithmetic intensity" in ax.get_xlabel() and "TFLOP/s" in ax.get_ylabel()
    text = _texts(fig)
    assert "no measured results" in text and "H100 roof: 3.0 TB/s, 798" in text and "H200 roof: 4.3 TB/s, 790" in text
    assert "measured:" not in text
    # the H100 roof: 3.0 TB/s up to the ridge, then 798 TFLOP/s
    h100 = next(line for line in ax.get_lines() if line.get_label().startswith("H100"))
    xs, ys = h100.get_data()
    assert ys[0] == pytest.approx(3.0 * xs[0]) and ys[-1] == pytest.approx(798)


def test_roofline_puts_the_measured_gpu_points_where_the_csv_says(tmp_path):
    csv = _results_csv(tmp_path / "gpu" / "results.csv")
    fig = figures.roofline_figure([TINY], "bf16", csv)
    ax = fig.get_axes()[0]
    assert f"GPU: {H100}" in fig._suptitle.get_text()
    gate = [c for c in ax.collections if c.get_label() == f"measured: channel_gate gam_triton (GPU: {H100})"]
    assert len(gate) == 1
    assert gate[0].get_offsets().tolist() == [[pytest.approx(160 * 1e3 / 2600), pytest.approx(160)]]
    assert "no measured results" not in _texts(fig)


def test_roofline_labels_cpu_points_as_cpu_figures(tmp_path):
    note = f"{CPU_NOTE}; {common.INTERPRET_NOTE}"
    csv = _results_csv(tmp_path / "cpu" / "results.csv", device="cpu", note=note)
    fig = figures.roofline_figure([TINY], "bf16", csv)
    text = _texts(fig)
    assert CPU_NOTE in fig._suptitle.get_text()
    assert "measured: gam eager (CPU figures)" in text
    assert "measured: gam gam_triton (interpreter: not performance)" in text
    assert "CPU copy bandwidth 3000 GB/s" in text


# --- speedup and the results it reads -------------------------------------------------------------------------
def test_speedup_figure_draws_the_ratios_of_the_csv(tmp_path):
    csv = _results_csv(tmp_path / "gpu" / "results.csv")
    fig = figures.speedup_figure(csv)
    axes = fig.get_axes()
    assert [ax.get_title().split(" ")[0] for ax in axes] == ["forward", "train"]
    assert all("speedup" in ax.get_ylabel() for ax in axes)
    assert [t.get_text() for t in axes[0].get_xticklabels()] == ["B1 C128 80x80 g", "B16 C256 40x40 p"]
    heights = sorted(round(p.get_height(), 6) for p in axes[0].patches)
    assert heights == [1.2, 1.2, 1.5, 1.5, 2.0, 2.0]  # over max-autotune, compile, eager; two shapes
    text = _texts(fig)
    assert "over eager (geomean x2.00)" in text and "goal over eager: x1.5" in text
    assert f"GPU: {H100}" in fig._suptitle.get_text()


def test_speedup_figure_on_cpu_rows_says_cpu_figures_and_no_goal(tmp_path):
    csv = _results_csv(tmp_path / "cpu" / "results.csv", device="cpu", note=CPU_NOTE)
    fig = figures.speedup_figure(csv)
    assert CPU_NOTE in fig._suptitle.get_text() and "goal" not in _texts(fig)


def test_newest_results_prefers_the_newest_gpu_run_and_ignores_cpu(tmp_path, monkeypatch):
    _results_csv(tmp_path / "cpu" / "results.csv", device="cpu", note=CPU_NOTE, date="2027-01-01T00:00:00")
    assert figures.newest_results(str(tmp_path)) is None
    calls = []
    monkeypatch.setattr(figures, "quick_cpu_sweep", lambda out: calls.append(out) or "swept.csv")
    assert figures.results_or_quick_sweep("somewhere", str(tmp_path)) == "swept.csv" and calls == ["somewhere"]

    old = _results_csv(tmp_path / "NVIDIA-H100" / "results.csv", date="2026-11-01T00:00:00")
    new = _results_csv(tmp_path / "NVIDIA-H200" / "results.csv", device="NVIDIA H200",
                       date="2026-11-20T00:00:00")
    assert figures.newest_results(str(tmp_path)) == new != old
    assert figures.results_or_quick_sweep("elsewhere", str(tmp_path)) == new and calls == ["somewhere"]


# --- autotuner ------------------------------------------------------------------------------------------------
def test_autotune_figure_without_report_or_cache_shows_heuristic_tiles(tmp_path):
    from gam_triton.ops import channel_gate, elementwise

    shapes = [Shape(16, 64, 80, 80), Shape(16, 512, 20, 20)]
    fig = figures.autotune_figure(shapes, "bf16", report=str(tmp_path / "none.csv"), cache_dir=str(tmp_path))
    text = _texts(fig)
    assert "no compile report yet" in text and "no GPU tuning cache found" in text
    table = figures.tile_table(shapes, "bf16", cache_dir=str(tmp_path))
    assert set(table["source"]) == {"heuristic"} and len(table) == 3 * len(shapes)
    cfg = channel_gate.heuristic(512, 128, 400, torch.bfloat16, target="gpu")
    want = dict(cfg.kwargs, num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    cfg = elementwise.heuristic(512, 400, True, target="gpu")
    want_fg = dict(cfg.kwargs, num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    got = table[(table["shape"] == "B16 C512 20x20 g") & (table["kernel"] == "channel_gate")].iloc[0]
    assert {k: int(got[k]) for k in want} == want
    assert got["BLOCK_C"] <= 128  # the GPU heuristic chunks wide channels, even when this runs interpreted
    got = table[(table["shape"] == "B16 C512 20x20 g") & (table["kernel"] == "final_gate")].iloc[0]
    assert {k: int(got[k]) for k in want_fg} == want_fg
    labels = [t.get_text() for t in fig.get_axes()[0].get_yticklabels()]
    assert labels == ["B16 C64 80x80 g", "B16 C512 20x20 g"]


def test_tile_table_reads_a_gpu_tuning_cache(tmp_path):
    shape = Shape(16, 256, 40, 40)
    key = figures.kernel_keys(shape, "bf16")["channel_gate"]
    entry = dict(config=dict(BLOCK_P=32, BLOCK_C=64, BLOCK_R=64, num_warps=8, num_stages=3), source="tuned",
                 ms=0.01, heuristic_ms=0.0125)
    data = {"format": 2, "device": H100, "triton": "3.6.0", "entries": {"channel_gate": {key: entry}}}
    (tmp_path / "NVIDIA_H100__triton-3.6.0.json").write_text(json.dumps(data))
    table = figures.tile_table([shape], "bf16", cache_dir=str(tmp_path))
    row = table[table["kernel"] == "channel_gate"].iloc[0]
    assert row["source"] == "tuned" and row["tile"] == "P32 C64 R64 w8 s3"
    assert row["speedup"] == pytest.approx(1.25) and row["device"] == H100
    assert set(table[table["kernel"] != "channel_gate"]["source"]) == {"heuristic"}
    fig = figures.autotune_figure([shape], "bf16", report=str(tmp_path / "none.csv"), cache_dir=str(tmp_path))
    assert "tuned x1.25" in _texts(fig) and H100 in _texts(fig)


def test_autotune_figure_reads_the_compile_report(tmp_path):
    shape = Shape(16, 256, 40, 40)
    table = figures.tile_table([shape], "bf16", cache_dir=str(tmp_path))
    rows = []
    for _, t in table.iterrows():
        for arch, regs in (("sm_90a", 96), ("sm_80", 128)):
            rows.append(dict(kernel=t["kernel"], arch=arch, BLOCK_P=t["BLOCK_P"], BLOCK_C=t["BLOCK_C"],
                             BLOCK_R=t["BLOCK_R"], num_warps=t["num_warps"], num_stages=t["num_stages"],
                             registers=regs, spill_bytes=0 if arch == "sm_90a" else 16, shared_bytes=1024,
                             warps_per_sm=16))
    rows.append(dict(rows[0], BLOCK_P=2048, registers=250))  # a tile no shape uses: left out
    report = tmp_path / "report.csv"
    pd.DataFrame(rows).to_csv(report, index=False)
    fig = figures.autotune_figure([shape], "bf16", report=str(report), cache_dir=str(tmp_path))
    axes = {ax.get_ylabel(): ax for ax in fig.get_axes()}
    assert {"registers per thread", "spill bytes", "warps per SM (occupancy)"} <= set(axes)
    regs = axes["registers per thread"]
    assert sorted(p.get_height() for p in regs.patches) == [96] * 3 + [128] * 3
    assert sorted(p.get_height() for p in axes["spill bytes"].patches) == [0] * 3 + [16] * 3
    text = _texts(fig)
    assert "sm_90a" in text and "sm_80" in text and "no compile report yet" not in text
    bad = tmp_path / "bad.csv"
    pd.DataFrame([dict(kernel="x", registers=1)]).to_csv(bad, index=False)
    with pytest.raises(ValueError, match="arch"):
        figures.read_compile_report(str(bad))
    assert figures.read_compile_report(str(tmp_path / "missing.csv")) is None


@pytest.mark.skipif(not INTERPRET and not torch.cuda.is_available(),
                    reason="the autotuner is only asked where gam_triton's kernels run (CUDA or TRITON_INTERPRET=1)")
@pytest.mark.parametrize("channels_last", [False, True])
def test_kernel_keys_are_the_keys_the_kernels_use(device, channels_last, tmp_path, monkeypatch):
    monkeypatch.setenv("GAM_TRITON_CACHE_DIR", str(tmp_path))
    _autotune.reset()
    try:
        shape = Shape(2, 16, 4, 5, 4, True)
        gam = GAM(16, group=True, channel_sigmoid=False, shuffle_groups=4).to(device)
        x = torch.randn(2, 16, 4, 5, device=device)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        gam.train()(x.requires_grad_()).sum().backward()
        with torch.no_grad():
            gam.eval()(x)
        got = {r.op: r.key for r in _autotune.drain_log()}
    finally:
        monkeypatch.undo()
        _autotune.reset()
    want = figures.kernel_keys(shape, "fp32", channels_last, cuda=device == "cuda")
    assert set(want) <= set(got), "every kernel the figure shows ran"
    assert {op: got[op] for op in want} == want


# --- what the block computes --------------------------------------------------------------------------------
@pytest.mark.parametrize("form, sigmoid, shuffle", [(lambda: YoloGAM(16, 16), False, 4),
                                                    (lambda: PaperGAM(16), True, None),
                                                    (lambda: SeedGAM(16, 16), False, None)])
def test_attention_maps_are_what_the_block_applies(device, form, sigmoid, shuffle):
    torch.manual_seed(0)
    ref = form().to(device).eval()
    x = torch.randn(2, 16, 5, 6, device=device)
    before = attention_maps(ref, x)
    after = attention_maps(GAM.from_module(ref).eval(), x)
    for m in (before, after):
        assert m.channel_sigmoid == sigmoid and m.shuffle_groups == shuffle
        assert m.channel_gate.shape == m.spatial_map.shape == x.shape
        assert m.residual < 1e-5
        assert ((m.spatial_map > 0) & (m.spatial_map < 1)).all()
    torch.testing.assert_close(after.channel_gate, before.channel_gate, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(after.spatial_map, before.spatial_map, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(after.out, ref(x), atol=1e-5, rtol=1e-5)
    if sigmoid:
        assert ((before.channel_gate > 0) & (before.channel_gate < 1)).all()
    else:  # the YOLO and seed forms multiply by the MLP's raw output
        assert (before.channel_gate < 0).any()


def test_attention_maps_reject_bad_input():
    gam = GAM(16).eval()
    with pytest.raises(TypeError, match="nn.Module"):
        attention_maps("not a module", torch.randn(1, 16, 2, 2))
    with pytest.raises(TypeError, match="torch.Tensor"):
        attention_maps(gam, [[1.0]])
    with pytest.raises(ValueError, match="4-D"):
        attention_maps(gam, torch.randn(16, 2, 2))
    with pytest.raises(TypeError, match="floating-point"):
        attention_maps(gam, torch.ones(1, 16, 2, 2, dtype=torch.int64))
    with pytest.raises(ValueError, match="16 channels"):
        attention_maps(gam, torch.randn(1, 8, 2, 2))
    with pytest.raises(ValueError, match="train mode"):
        attention_maps(gam.train(), torch.randn(1, 16, 2, 2))
    with pytest.raises(ValueError, match="not a GAM block"):
        attention_maps(torch.nn.Linear(4, 4).eval(), torch.randn(1, 4, 2, 2))


def test_attention_figure_shows_both_sides_and_their_difference(device):
    torch.manual_seed(0)
    x = figures.synthetic_input(16, 8)
    assert x.shape == (1, 16, 8, 8) and x.std() > 0.1
    assert not torch.allclose(x[0, 0], x[0, 1])  # channels mix the patterns differently
    fig = figures.attention_figure(YoloGAM(16, 16), x, device)
    axes = fig.get_axes()
    images = [ax for ax in axes if ax.images]
    assert len(images) == 11  # 4 before, 4 after, 3 differences (the input's is a caption)
    title = fig._suptitle.get_text()
    assert "max |out gam_triton - out reference| =" in title and "YoloGAM" in title
    err = float(title.split("max |out gam_triton - out reference| = ")[1].split(" ")[0])
    assert err < 1e-5
    titles = " ".join(ax.get_title() for ax in axes)
    assert "channel gate" in titles and "spatial map" in titles and "|before - after|" in titles


def test_quick_cpu_sweep_plans_one_tiny_shape_without_max_autotune(monkeypatch, tmp_path):
    import sweep

    seen = []
    monkeypatch.setattr(sweep, "run", lambda argv: seen.append(argv) or "x.csv")
    assert figures.quick_cpu_sweep(str(tmp_path)) == "x.csv"
    args = sweep.parser().parse_args(seen[0])
    for on_gpu in (False, True):
        specs = sweep.plan(args, on_gpu)
        assert {s.provider for s in specs} == {"eager", "compile", "gam_triton"}
        assert {(s.kind, s.mode) for s in specs} == {("gam", "forward")}
        assert {s.shape for s in specs} == {Shape(1, 16, 4, 4, 4, True)}
    assert args.out == str(tmp_path) and args.no_plot
