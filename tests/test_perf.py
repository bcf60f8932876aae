"""The perf tooling: the sweep writes its CSV and PNGs and resumes, the plots draw, the traffic counter counts.

The sweep runs for real in a subprocess on one tiny shape (every CPU provider, both modes, every kind);
under ``TRITON_INTERPRET=1`` its gam_triton rows go through Triton's interpreter (never performance).
"""
import os
import subprocess
import sys

import pandas as pd
import pytest
import torch

PERF = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "perf")
sys.path.insert(0, PERF)

import common  # noqa: E402
import plot  # noqa: E402
import results  # noqa: E402
import summary  # noqa: E402
import sweep  # noqa: E402
import traffic  # noqa: E402

REQUIRED_COLUMNS = ["device", "torch", "triton", "dtype", "mode", "batch", "channels", "height", "width",
                    "rate", "group", "provider", "ms", "ms_p20", "ms_p80", "gbps", "tflops", "peak_mem_mb",
                    "roofline_frac", "compile_s", "error", "note", "rounds", "vs_eager", "vs_eager_p20",
                    "vs_eager_p80", "vs_compile", "spread", "noisy"]
TINY = ["--quick", "--channels", "16", "--sizes", "4", "--batches", "1", "--group", "grouped",
        "--budget-s", "0.05"]


def _run_sweep(out_dir, *extra):
    cmd = [sys.executable, os.path.join(PERF, "sweep.py"), *TINY, "--out", str(out_dir), *extra]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU sweep")
def test_quick_sweep_writes_csv_and_png_and_resumes(tmp_path):
    out = _run_sweep(tmp_path)
    assert "CPU figures" in out
    csv_path = tmp_path / "results.csv"
    df = pd.read_csv(csv_path, dtype={"error": str, "group": str}, keep_default_na=False)
    assert set(REQUIRED_COLUMNS) <= set(df.columns)
    assert set(df["provider"]) == {"eager", "compile", "gam_triton"}
    assert set(df["kind"]) == {"gam", "channel_gate", "final_gate"}
    assert set(df[df["kind"] == "gam"]["mode"]) == {"forward", "train"}
    for _, group in df.groupby(["kind", "mode"]):
        assert set(group["provider"]) == {"eager", "compile", "gam_triton"}
    errors = df[df["error"] != ""]
    assert errors.empty, errors[["kind", "mode", "provider", "error"]].to_string()
    assert (pd.to_numeric(df["ms"]) > 0).all()
    assert (pd.to_numeric(df["rounds"]) >= common.MIN_ROUNDS).all()  # interleaved rounds
    others = df[df["provider"] != "eager"]
    vs = pd.to_numeric(others["vs_eager"])
    assert (vs > 0).all() and (pd.to_numeric(others["vs_eager_p20"]) <= vs).all()
    assert (vs <= pd.to_numeric(others["vs_eager_p80"])).all()
    assert (pd.to_numeric(df[df["provider"] == "gam_triton"]["vs_compile"]) > 0).all()
    assert (pd.to_numeric(df["spread"]) >= 1).all() and set(df["noisy"].astype(str)) <= {"True", "False"}
    assert "per-round" in out
    assert df["device"].eq("cpu").all() and df["note"].str.contains("CPU figures").all()
    comp = df[df["kind"] != "gam"]
    assert (pd.to_numeric(comp["roofline_frac"]) > 0).all()
    pngs = sorted(p.name for p in tmp_path.glob("*.png"))
    assert "gam_forward_fp32.png" in pngs and "components_fp32.png" in pngs
    assert (tmp_path / "summary.md").read_text().startswith("# Sweep summary")
    assert (tmp_path / "env.json").exists()

    again = _run_sweep(tmp_path, "--no-plot")  # resumable: nothing left to measure
    assert "0 to measure" in again
    assert len(pd.read_csv(csv_path)) == len(df)


def _handwritten_csv(path, device="NVIDIA H100 80GB HBM3", note="", gate_ms=0.1):
    rows = []
    for (b, c, h, g) in [(1, 128, 80, "True"), (16, 256, 40, "True"), (16, 256, 40, "False")]:
        for mode in ("forward", "train"):
            for prov, ms in [("eager", 2.0), ("compile", 1.5), ("compile-max-autotune", 1.2), ("gam_triton", 1.0)]:
                rows.append(dict(device=device, torch="2.11.0", triton="3.6.0", dtype="bf16", mode=mode, kind="gam",
                                 batch=b, channels=c, height=h, width=h, rate=4, group=g, provider=prov, ms=ms,
                                 ms_p20=ms * 0.95, ms_p80=ms * 1.05, gbps=100 / ms, tflops=10 / ms, note=note))
    for kind in ("channel_gate", "final_gate"):
        for c in (64, 256):
            for prov, ms in [("eager", 0.3), ("compile", 0.2), ("gam_triton", gate_ms)]:
                rows.append(dict(device=device, torch="2.11.0", triton="3.6.0", dtype="bf16", mode="forward",
                                 kind=kind, batch=16, channels=c, height=40, width=40, rate=4, group="",
                                 provider=prov, ms=ms, gbps=270 / ms, roofline_frac=0.09 / ms, copy_gbps=3000,
                                 note=note))
    rows.append(dict(rows[0], provider="gam_triton", ms="", error="RuntimeError: boom"))  # failed row: skipped
    pd.DataFrame(rows).to_csv(path, index=False)


def test_plot_draws_a_handwritten_csv(tmp_path):
    csv_path = tmp_path / "results.csv"
    _handwritten_csv(csv_path)
    paths = plot.plot_csv(str(csv_path), str(tmp_path / "figs"))
    names = sorted(os.path.basename(p) for p in paths)
    assert names == ["components_bf16.png", "gam_forward_bf16.png", "gam_train_bf16.png"]
    for p in paths:
        with open(p, "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    assert plot.main([str(csv_path), "--out", str(tmp_path / "cli")]) == 0


def test_summary_judges_gpu_goals_only_on_gpu_rows(tmp_path):
    gpu_csv, cpu_csv = tmp_path / "gpu.csv", tmp_path / "cpu.csv"
    _handwritten_csv(gpu_csv)
    text = summary.summarize(results.load(str(gpu_csv)))
    assert "| bf16 | forward | 3 | x2.00 | x1.50 | x1.20 |" in text  # the failed row does not count
    assert "PASS" in text and "FAIL" not in text  # channel gate at 90% of copy, GAM x2.0 over eager
    _handwritten_csv(gpu_csv, gate_ms=0.2)
    text = summary.summarize(results.load(str(gpu_csv)))
    assert "| channel gate bf16, C >= 128: >= 85% of copy bandwidth (every shape) | min 45% | FAIL |" in text
    _handwritten_csv(cpu_csv, device="cpu", note=common.CPU_NOTE)
    text = summary.summarize(results.load(str(cpu_csv)))
    assert "Not judged: these are CPU figures" in text and "PASS" not in text


def test_row_writer_resumes_by_key(tmp_path):
    path = str(tmp_path / "r.csv")
    row = dict(device="cpu", torch="t", triton="x", dtype="fp32", mode="forward", kind="gam", batch=1,
               channels=16, height=4, width=4, rate=4, group="True", provider="eager", ms=1.0)
    with results.RowWriter(path) as w:
        w.write(row)
        w.write(dict(row, provider="compile", ms=None, error="Boom: failed"))
    assert results.done_keys(path) == {results.row_key(row), results.row_key(dict(row, provider="compile"))}
    assert results.done_keys(path, retry_errors=True) == {results.row_key(row)}
    assert list(results.load(path)["provider"]) == ["eager"]


@pytest.mark.parametrize("argv", [["--dtypes", "fp64"], ["--batches", "-1"], ["--batches", "x"],
                                  ["--providers", "tvm"], ["--modes", "backward"], ["--budget-s", "0"],
                                  ["--threads", "1,2"]])
def test_sweep_rejects_bad_arguments(argv, capsys):
    with pytest.raises(SystemExit) as e:
        sweep.parser().parse_args(argv)
    assert e.value.code == 2
    assert "error" in capsys.readouterr().err


def test_sweep_plans_the_gpu_sweep_from_the_notes_shapes():
    full = sweep.plan(sweep.parser().parse_args([]), on_gpu=True)
    assert {s.dtype for s in full} == {"bf16", "fp16", "fp32"}
    assert {(s.shape.channels, s.shape.height) for s in full} == set(common.yolo_pairs())
    assert {s.shape.batch for s in full} == {1, 16, 32}
    block_fwd = {s.provider for s in full if s.kind == "gam" and s.mode == "forward"}
    assert block_fwd == {"eager", "compile", "compile-max-autotune", "gam_triton", "gam_triton-tconv"}
    assert all(s.provider != "gam_triton-tconv" for s in full if s.mode == "train" or s.kind != "gam")
    assert all(s.provider != "compile-max-autotune" for s in full if s.mode == "train" or s.kind != "gam")
    assert {s.kind for s in full if s.mode == "train"} == {"gam"}
    quick = sweep.plan(sweep.parser().parse_args(["--quick"]), on_gpu=True)
    assert len(quick) < len(full) / 10
    cpu = sweep.plan(sweep.parser().parse_args([]), on_gpu=False)  # no GPU: the quick CPU sweep
    assert {s.provider for s in cpu} == {"eager", "compile", "gam_triton"} and {s.dtype for s in cpu} == {"fp32"}


def test_sweep_rejects_impossible_shapes():
    with pytest.raises(SystemExit, match="divisible"):
        sweep.run(["--channels", "20", "--sizes", "4", "--group", "grouped", "--dry-run"])
    with pytest.raises(SystemExit, match="go together"):
        sweep.run(["--channels", "16", "--dry-run"])
    with pytest.raises(ValueError, match="batch"):
        common.Shape(0, 16, 4, 4)


def test_traffic_counts_a_known_op_sequence():
    x, y = torch.randn(3, 5), torch.randn(3, 5)
    bias = torch.randn(5)

    def fn():
        z = x + y             # 1 launch: reads 2 x 60 B, writes 60 B
        z = torch.relu(z)     # 1 launch: reads 60 B, writes 60 B
        z = z.view(15).view(3, 5)  # views: free
        z.add_(bias.expand(3, 5))  # in place, stride-0 bias: reads 60 + 20 B, writes 60 B

    t = traffic.count(fn)
    assert t.launches == 3
    assert t.bytes_read == 120 + 60 + 80
    assert t.bytes_written == 60 + 60 + 60
    assert [o.name for o in t.ops if o.launches] == ["aten::add", "aten::relu", "aten::add_"]
    assert t.floor_us(1e6) == pytest.approx(t.bytes)  # 1 MB/s: one microsecond per byte


def test_traffic_of_gam_eager_against_gam_triton():
    shape = common.Shape(2, 16, 5, 6, 4, True)
    eager = traffic.eager_traffic(shape, torch.float32)
    ours = traffic.gam_triton_traffic(shape, torch.float32)
    n = 2 * 16 * 5 * 6 * 4  # bytes of one activation tensor
    assert ours.by_op()["gam_triton::channel_gate"][1] == 2 * n + (2 * 16 * 4 + 16 + 4) * 4
    assert ours.by_op()["gam_triton::final_gate"][1] == 3 * n + 2 * 16 * 4
    assert ours.launches < eager.launches and ours.bytes < eager.bytes


KERNELS_RUN_ON = ("cpu" if os.environ.get("TRITON_INTERPRET") == "1"
                  else "cuda" if torch.cuda.is_available() else None)


@pytest.mark.skipif(KERNELS_RUN_ON is None, reason="needs the kernels to run: a GPU or TRITON_INTERPRET=1")
def test_traffic_standins_match_the_kernels_as_they_run():
    for shape in (common.Shape(2, 16, 5, 6, 4, True), common.Shape(1, 32, 4, 4, 4, False)):
        meta = traffic.gam_triton_traffic(shape, torch.float32, device="meta")
        real = traffic.gam_triton_traffic(shape, torch.float32, device=KERNELS_RUN_ON)
        assert meta.by_op() == real.by_op()
        assert (meta.launches, meta.bytes_read, meta.bytes_written) == \
            (real.launches, real.bytes_read, real.bytes_written)


def test_analysis_uses_the_newest_versions_only(tmp_path):
    old, new = tmp_path / "old.csv", tmp_path / "new.csv"
    _handwritten_csv(old)
    _handwritten_csv(new)
    df_old, df_new = pd.read_csv(old), pd.read_csv(new)
    df_old["torch"], df_old["date"] = "2.10.0", "2026-01-01T00:00:00"
    df_new["ms"] = df_new["ms"] / 2  # a faster run after an upgrade
    df_new["date"] = "2026-02-01T00:00:00"
    both = tmp_path / "both.csv"
    pd.concat([df_old, df_new]).to_csv(both, index=False)
    latest = results.latest_run(results.load(str(both)))
    assert set(latest["torch"]) == {"2.11.0"}
    assert "| bf16 | forward | 3 | x2.00 | x1.50 | x1.20 |" in summary.summarize(results.load(str(both)))


# -- interleaved rounds ----------------------------------------------------------------------------------------
class FakeClock:
    """time.perf_counter stand-in: only the timed functions advance it; a "neighbour" is busy (every call
    10x slower) between ``busy[0]`` and ``busy[1]`` seconds."""

    def __init__(self, busy):
        self.t, self.busy = 0.0, busy

    def perf_counter(self):
        return self.t

    def work(self, seconds):
        def fn():
            slow = 10.0 if self.busy[0] <= self.t < self.busy[1] else 1.0
            self.t += seconds * slow
        return fn


def test_interleaved_rounds_cancel_a_busy_neighbour(monkeypatch):
    """A neighbour busy for most of the measurement (longer than a round): timed one provider after the
    other, the speedup reads x0.2 instead of x2; timed in interleaved rounds it reads x2."""
    busy = (0.03, 0.2)
    clock = FakeClock(busy)
    monkeypatch.setattr(common, "time", clock)
    eager, fast = common.bench(clock.work(0.002), False, budget_s=0.05), common.bench(clock.work(0.001), False,
                                                                                      budget_s=0.05)
    assert eager.ms / fast.ms == pytest.approx(0.2)  # the old way: the busy stretch fell on one provider

    clock = FakeClock(busy)
    monkeypatch.setattr(common, "time", clock)
    fns = {"eager": (clock.work(0.002), []), "fast": (clock.work(0.001), [])}
    res = common.bench_interleaved(fns, on_gpu=False, budget_s=0.05)
    assert len(res.rounds["eager"]) == len(res.rounds["fast"]) == common.ROUNDS
    assert max(res.rounds["eager"]) == pytest.approx(20.0)  # busy rounds: 10x slower...
    med, _, _ = common.ratio_stats(res.rounds["eager"], res.rounds["fast"])
    assert med == pytest.approx(2.0)  # ...but the per-round speedup is read right


def test_slow_calls_get_fewer_rounds_but_never_under_the_minimum(monkeypatch):
    clock = FakeClock(busy=(0, 0))
    monkeypatch.setattr(common, "time", clock)
    calls = []

    def slow():
        calls.append(1)
        clock.t += 1.0

    res = common.bench_interleaved({"a": (slow, []), "b": (slow, [])}, on_gpu=False, budget_s=0.05)
    assert len(res.rounds["a"]) == common.MIN_ROUNDS and res.timings["a"].reps == common.MIN_ROUNDS
    assert len(calls) == 2 * (1 + common.MIN_ROUNDS)  # one warm-up call each, then one call per round


def _interleaved(eager, other):
    t = common.Timing(1.0, 0.9, 1.1, 5)
    return common.Interleaved({"eager": t, "gam_triton": t}, {"eager": eager, "gam_triton": other})


def test_rows_get_per_round_ratios_and_a_noisy_flag():
    case = type("Case", (), {"bytes": 1000, "flops": 1000})()
    steady = {"kind": "gam"}
    common.fill_row(steady, "gam_triton", case, _interleaved([2, 4, 2, 6, 2], [1, 2, 1, 3, 1]), 0.0)
    assert steady["vs_eager"] == 2.0 and steady["spread"] == 1.0 and steady["noisy"] == "False"
    assert steady["rounds"] == 5
    shaky = {"kind": "gam"}
    common.fill_row(shaky, "gam_triton", case, _interleaved([2, 2, 2, 2, 2], [1, 4, 1, 4, 1]), 0.0)
    assert shaky["spread"] > common.NOISY_SPREAD and shaky["noisy"] == "True"
    ref = {"kind": "gam"}
    common.fill_row(ref, "eager", case, _interleaved([1, 1, 9, 9, 1], [1, 1, 1, 1, 1]), 0.0)
    assert "vs_eager" not in ref and ref["noisy"] == "True"  # eager's own rounds disagree


def test_old_csv_is_upgraded_and_noisy_rows_are_marked(tmp_path):
    csv_path = tmp_path / "results.csv"
    _handwritten_csv(csv_path)
    old_cols = list(pd.read_csv(csv_path).columns)
    assert "vs_eager" not in old_cols
    df = results.load(str(csv_path))
    assert df["vs_eager"].isna().all() and (df["noisy"] == "").all()
    assert summary.summarize(df).count("flagged noisy") == 0
    row = dict(pd.read_csv(csv_path).iloc[0].fillna("")) | {"batch": 99, "vs_eager": 2.0, "spread": 3.0,
                                                             "noisy": "True"}
    with results.RowWriter(str(csv_path)) as w:  # appending upgrades the header first
        w.write(row)
    assert list(pd.read_csv(csv_path).columns) == results.COLUMNS
    df = results.load(str(csv_path))
    assert len(df) == len(results.load(str(csv_path))) and (df["noisy"] == "True").sum() == 1
    assert "1 of" in summary.summarize(df) and "flagged noisy" in summary.summarize(df)
    assert len(plot.plot_csv(str(csv_path), str(tmp_path / "figs"))) == 3


def test_gpu_rounds_use_do_bench_per_round(monkeypatch):
    """The GPU branch (checked here with a stand-in for do_bench): GPU_ROUNDS rounds, rotating order, the
    medians over rounds of do_bench's median / p20 / p80."""
    import triton.testing

    order = []

    def fake_do_bench(fn, warmup, rep, grad_to_none, quantiles):
        fn()
        order.append(fn.__name__)
        ms = {"eager": 2.0, "fast": 1.0}[fn.__name__] * (1 + len(order))  # later rounds slower: cancels
        return [ms, ms * 0.9, ms * 1.1]

    def eager():
        pass

    def fast():
        pass

    monkeypatch.setattr(triton.testing, "do_bench", fake_do_bench)
    res = common.bench_interleaved({"eager": (eager, []), "fast": (fast, [])}, on_gpu=True)
    assert len(res.rounds["eager"]) == common.GPU_ROUNDS
    assert order[:4] == ["eager", "fast", "fast", "eager"]  # the order rotates
    assert res.timings["eager"].ms == common._median(res.rounds["eager"])
    assert res.timings["fast"].ms_p20 < res.timings["fast"].ms < res.timings["fast"].ms_p80


def test_resumed_shape_is_timed_with_all_its_providers_but_written_once(tmp_path, monkeypatch):
    """A shape whose eager row is already in the CSV: eager is timed again in the rounds (the reference of
    the per-round ratios) but not written a second time."""
    seen = []

    def fake_group(group, mach, copy_gbps, budget_s):
        seen.append([s.provider for s in group])
        return [dict(s.key_fields(mach), ms=1.0, note=mach.note, date=mach.date) for s in group]

    monkeypatch.setattr(sweep, "measure_group", fake_group)
    monkeypatch.setattr(common, "copy_bandwidth_gbps", lambda on_gpu: 1.0)
    monkeypatch.setattr(common, "machine", lambda: common.Machine("cpu", False, "t", "x", "3", "d", "", "CPU"))
    args = ["--quick", "--channels", "16", "--sizes", "4", "--batches", "1", "--group", "grouped", "--kinds", "gam",
            "--modes", "forward", "--out", str(tmp_path), "--no-plot"]
    sweep.run(args + ["--providers", "eager"])
    assert seen == [["eager"]]
    sweep.run(args + ["--providers", "eager,gam_triton"])
    assert seen[-1] == ["eager", "gam_triton"]
    rows = pd.read_csv(tmp_path / "results.csv")
    assert sorted(rows["provider"]) == ["eager", "gam_triton"]
