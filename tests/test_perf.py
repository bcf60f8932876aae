"""The perf tooling: bench.py writes its CSV and resumes, report.py summarises, traffic.py counts, and the gpu-check
rehearsal runs every step and labels every file. Runs for real (tiny shapes): under TRITON_INTERPRET=1 gam_triton's
rows are interpreter times, never performance."""
import os
import subprocess
import sys

import pandas as pd
import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "perf"))

import bench  # noqa: E402
import report  # noqa: E402
import traffic  # noqa: E402

TINY = ["--channels", "16", "--sizes", "4", "--batches", "1", "--group", "grouped", "--budget-s", "0.05"]
COLUMNS = ["device", "torch", "triton", "dtype", "mode", "kind", "batch", "channels", "height", "width", "rate",
           "group", "provider", "ms", "ms_p20", "ms_p80", "gbps", "tflops", "peak_mem_mb", "roofline_frac",
           "copy_gbps", "compile_s", "reps", "error", "note", "date", "rounds", "vs_eager", "vs_eager_p20",
           "vs_eager_p80", "vs_compile", "spread", "noisy"]
KERNELS_RUN_ON = "cpu" if os.environ.get("TRITON_INTERPRET") == "1" else "cuda" if torch.cuda.is_available() else None
needs_kernels = pytest.mark.skipif(KERNELS_RUN_ON is None, reason="the kernels run on CUDA or with TRITON_INTERPRET=1")


def _run(cmd, **kw):
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900, cwd=ROOT, **kw)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU sweep")
def test_quick_sweep_writes_csv_pngs_summary_and_resumes(tmp_path):
    out = _run([sys.executable, "perf/bench.py", *TINY, "--out", str(tmp_path)])
    assert "CPU figures" in out and "per-round" in out
    df = pd.read_csv(tmp_path / "results.csv", dtype={"error": str, "group": str}, keep_default_na=False)
    assert list(df.columns) == COLUMNS
    assert set(df["kind"]) == {"gam", "channel_gate", "final_gate"}
    for _, group in df.groupby(["kind", "mode"]):
        assert set(group["provider"]) == {"eager", "compile", "gam_triton"}
    assert set(df[df["kind"] == "gam"]["mode"]) == {"forward", "train"}
    assert (df["error"] == "").all(), df[["kind", "provider", "error"]]
    assert (pd.to_numeric(df["ms"]) > 0).all() and (pd.to_numeric(df["rounds"]) >= bench.MIN_ROUNDS).all()
    others = df[df["provider"] != "eager"]
    vs = pd.to_numeric(others["vs_eager"])
    assert ((pd.to_numeric(others["vs_eager_p20"]) <= vs) & (vs <= pd.to_numeric(others["vs_eager_p80"]))).all()
    assert (pd.to_numeric(df[df["provider"] == "gam_triton"]["vs_compile"]) > 0).all()
    assert (pd.to_numeric(df["spread"]) >= 1).all() and set(df["noisy"].astype(str)) <= {"True", "False"}
    assert df["device"].eq("cpu").all() and df["note"].str.contains("CPU figures").all()
    assert (pd.to_numeric(df[df["kind"] != "gam"]["roofline_frac"]) > 0).all()
    assert {p.name for p in tmp_path.glob("*.png")} == {"speedup_fp32.png", "floors_fp32.png"}
    assert (tmp_path / "summary.md").read_text().startswith("# Sweep summary") and (tmp_path / "env.json").exists()
    again = _run([sys.executable, "perf/bench.py", *TINY, "--out", str(tmp_path), "--no-plot"])
    assert "0 to measure" in again and len(pd.read_csv(tmp_path / "results.csv")) == len(df)


@needs_kernels
@pytest.mark.parametrize("kind", bench.KERNELS)
def test_each_kernel_alone_runs_and_its_bytes_are_counted_at_the_seam(kind):
    shape = bench.Shape(1, 16, 2, 2, 4, True)
    case = bench.kernel_case(kind, shape, torch.float32, "forward", "gam_triton", KERNELS_RUN_ON)
    with torch.no_grad():
        case.step()
    ch = shape.hidden if kind.startswith("bn1") or kind == "conv1" else shape.channels
    assert case.bytes >= 4 * shape.batch * shape.pixels * ch
    assert (case.flops > 0) == kind.startswith("conv")


@pytest.mark.parametrize("argv", [["--dtypes", "fp64"], ["--batches", "-1"], ["--batches", "x"], ["--kinds", "fc"],
                                  ["--providers", "tvm"], ["--modes", "backward"], ["--budget", "0"]])
def test_bench_rejects_bad_arguments(argv, capsys):
    with pytest.raises(SystemExit) as e:
        bench.parser().parse_args(argv)
    assert e.value.code == 2 and "error" in capsys.readouterr().err


def test_plans_put_the_kernels_first_on_a_gpu_and_the_notes_shapes_in_the_full_sweep():
    parse = bench.parser().parse_args
    full = bench.plan(parse([]), on_gpu=True)
    assert {s.dtype for s in full} == {"bf16", "fp16", "fp32"} and {s.shape.batch for s in full} == {1, 16, 32}
    assert {(s.shape.channels, s.shape.height) for s in full} == set(bench.yolo_pairs())
    assert {s.provider for s in full if s.kind == "gam" and s.mode == "forward"} == set(bench.BLOCK)
    assert all(s.provider not in ("gam_triton-tconv", "compile-max-autotune") for s in full if s.mode == "train")
    quick = bench.plan(parse(["--quick"]), on_gpu=True)
    kinds = list(dict.fromkeys(s.kind for s in quick))
    assert kinds[:len(bench.KERNELS)] == list(bench.KERNELS) and "model" in kinds
    assert {(s.shape.channels, s.shape.height) for s in quick if s.kind == "gam"} == set(bench.HEADLINE_PAIRS)
    cpu = bench.plan(parse([]), on_gpu=False)
    assert {s.provider for s in cpu} == {"eager", "compile", "gam_triton"} and {s.dtype for s in cpu} == {"fp32"}
    with pytest.raises(SystemExit, match="divisible"):
        bench.plan(parse(["--channels", "20", "--sizes", "4"]), on_gpu=False)
    with pytest.raises(SystemExit, match="go together"):
        bench.plan(parse(["--channels", "16"]), on_gpu=False)


class FakeClock:
    """time.perf_counter stand-in: only the timed functions advance it; calls are 10x slower in ``busy``."""

    def __init__(self, busy):
        self.t, self.busy = 0.0, busy
        self.perf_counter = lambda: self.t

    def work(self, seconds):
        def fn():
            self.t += seconds * (10.0 if self.busy[0] <= self.t < self.busy[1] else 1.0)
        return fn


def test_interleaved_rounds_cancel_a_busy_neighbour(monkeypatch):
    clock = FakeClock(busy=(0.03, 0.2))  # busy for most of the measurement, longer than a round
    monkeypatch.setattr(bench, "time", clock)
    res = bench.bench_interleaved({"eager": (clock.work(0.002), []), "fast": (clock.work(0.001), [])}, False, 0.05)
    assert len(res.rounds["eager"]) == bench.ROUNDS and max(res.rounds["eager"]) == pytest.approx(20.0)
    assert bench.ratio_stats(res.rounds["eager"], res.rounds["fast"])[0] == pytest.approx(2.0)
    slow = FakeClock(busy=(0, 0))
    monkeypatch.setattr(bench, "time", slow)
    res = bench.bench_interleaved({"a": (slow.work(1.0), []), "b": (slow.work(1.0), [])}, False, 0.05)
    assert len(res.rounds["a"]) == bench.MIN_ROUNDS and res.timings["a"].reps == bench.MIN_ROUNDS


def test_gpu_rounds_use_do_bench_per_round(monkeypatch):
    import triton.testing

    order = []

    def fake_do_bench(fn, warmup, rep, grad_to_none, quantiles):
        order.append(fn())
        ms = {"eager": 2.0, "fast": 1.0}[order[-1]] * len(order)  # later rounds slower: cancels in the ratios
        return [ms, ms * 0.9, ms * 1.1]

    monkeypatch.setattr(triton.testing, "do_bench", fake_do_bench)
    res = bench.bench_interleaved({"eager": (lambda: "eager", []), "fast": (lambda: "fast", [])}, on_gpu=True)
    assert order[:4] == ["eager", "fast", "fast", "eager"] and len(res.rounds["eager"]) == bench.GPU_ROUNDS
    assert res.timings["fast"].ms_p20 < res.timings["fast"].ms < res.timings["fast"].ms_p80


def test_rows_get_per_round_ratios_and_a_noisy_flag():
    case = bench.Case(lambda: None, 1000, 1000)
    t = bench.Timing(1.0, 0.9, 1.1, 5)

    def row(provider, eager, other):
        r = {"kind": "gam"}
        bench.fill_row(r, provider, case, bench.Interleaved({"eager": t, "gam_triton": t},
                                                            {"eager": eager, "gam_triton": other}), 0.0, 0.0)
        return r
    steady = row("gam_triton", [2, 4, 2, 6, 2], [1, 2, 1, 3, 1])
    assert (steady["vs_eager"], steady["spread"], steady["noisy"], steady["rounds"]) == (2.0, 1.0, "False", 5)
    assert row("gam_triton", [2] * 5, [1, 4, 1, 4, 1])["noisy"] == "True"
    ref = row("eager", [1, 1, 9, 9, 1], [1] * 5)
    assert "vs_eager" not in ref and ref["noisy"] == "True"  # eager's own rounds disagree


def _handwritten_csv(path, device="NVIDIA H100 80GB HBM3", note="", gate_ms=0.1, torch_v="2.11.0"):
    rows = []
    for b, c, h, g in [(1, 128, 80, "True"), (16, 256, 40, "True"), (16, 256, 40, "False")]:
        for mode in ("forward", "train"):
            for prov, ms in [("eager", 2.0), ("compile", 1.5), ("compile-max-autotune", 1.2), ("gam_triton", 1.0)]:
                rows.append(dict(kind="gam", mode=mode, batch=b, channels=c, height=h, group=g, provider=prov, ms=ms))
    for kind in ("channel_gate", "final_gate", "bn2_stats"):
        for c in (64, 256):
            for prov, ms in [("eager", 0.3), ("gam_triton", gate_ms)]:
                rows.append(dict(kind=kind, mode="forward", batch=16, channels=c, height=40, group="", provider=prov,
                                 ms=ms, gbps=270 / ms, roofline_frac=0.09 / ms))
    for prov, ms in [("eager", 10.0), ("gam_triton", 8.0), ("no_gam", 6.0)]:
        rows.append(dict(kind="model", mode="forward", batch=16, channels=3, height=640, provider=prov, ms=ms))
    df = pd.DataFrame(rows).assign(device=device, torch=torch_v, triton="3.6.0", dtype="bf16", rate=4, note=note,
                                   error="", date="2026-11-25T10:00:00+00:00", width=lambda d: d["height"])
    df.loc[len(df)] = dict(df.iloc[0], provider="gam_triton", ms=None, error="RuntimeError: boom")  # skipped
    df.to_csv(path, index=False)
    return str(path)


def test_summary_and_figures_of_a_handwritten_csv(tmp_path):
    text = report.summary(report.load(_handwritten_csv(tmp_path / "gpu.csv")))
    assert "| bf16 | forward | 3 | x2.00 | x1.50 | x1.20 |" in text and "PASS" in text and "FAIL" not in text
    assert "| bn2_stats | bf16 | 2 | 90% |" in text and "| forward | bf16 | gam_triton | 8.000 |" in text
    assert "| 25% |" in text  # GAM share of the converted detector: 1 - 6 / 8
    text = report.summary(report.load(_handwritten_csv(tmp_path / "gpu.csv", gate_ms=0.2)))
    assert "| channel gate bf16, C >= 128: >= 85% of copy bandwidth (every shape) | min 45% | FAIL |" in text
    cpu = _handwritten_csv(tmp_path / "cpu.csv", device="cpu", note=bench.CPU_NOTE)
    assert "Not judged" in report.summary(report.load(cpu)) and "PASS" not in report.summary(report.load(cpu))
    old = pd.read_csv(_handwritten_csv(tmp_path / "old.csv", torch_v="2.10.0")).assign(date="2026-01-01", ms=9.0)
    pd.concat([old, pd.read_csv(tmp_path / "gpu.csv")]).to_csv(tmp_path / "both.csv", index=False)
    assert set(report.latest_run(report.load(str(tmp_path / "both.csv")))["torch"]) == {"2.11.0"}
    (tmp_path / "figs").mkdir()
    (tmp_path / "figs" / "results.csv").write_text((tmp_path / "gpu.csv").read_text())
    assert report.main([str(tmp_path / "figs")]) == 0
    assert {p.name for p in (tmp_path / "figs").glob("*.png")} == {"speedup_bf16.png", "floors_bf16.png"}


def test_traffic_counts_a_known_op_sequence():
    x, y, bias = torch.randn(3, 5), torch.randn(3, 5), torch.randn(5)

    def fn():
        z = torch.relu(x + y)           # 2 launches: reads 120 + 60 B, writes 60 + 60 B
        z = z.view(15).view(3, 5)       # views: free
        z.add_(bias.expand(3, 5))       # in place, stride-0 bias: reads 60 + 20 B, writes 60 B

    t = traffic.count(fn)
    assert (t.launches, t.bytes_read, t.bytes_written) == (3, 120 + 60 + 80, 180)
    assert [o.name for o in t.ops if o.launches] == ["aten::add", "aten::relu", "aten::add_"]


def test_traffic_of_gam_eager_against_gam_triton_counts_every_op_body():
    assert set(traffic.op_bodies()) >= {"gam_triton::channel_gate", "gam_triton::final_gate", "gam_triton::bn_relu",
                                        "gam_triton::train_block_fwd", "gam_triton::train_block_bwd"}
    shape = bench.Shape(2, 16, 5, 6, 4, True)
    eager, ours = traffic.eager_traffic(shape, torch.float32), traffic.gam_triton_traffic(shape, torch.float32)
    n = 2 * 16 * 5 * 6 * 4
    assert ours.by_op()["gam_triton::channel_gate"][1] == 2 * n + (2 * 16 * 4 + 16 + 4) * 4
    assert ours.by_op()["gam_triton::final_gate"][1] == 3 * n + 2 * 16 * 4
    assert ours.launches < eager.launches and ours.bytes < eager.bytes
    train = traffic.gam_triton_traffic(shape, torch.float32, "train").by_op()
    assert train["gam_triton::bn_stats"][0] == 2 and train["gam_triton::channel_gate_bwd"][0] == 1


@needs_kernels
def test_traffic_standins_match_the_kernels_as_they_run():
    for shape in (bench.Shape(2, 16, 5, 6, 4, True), bench.Shape(1, 32, 4, 4, 4, False)):
        meta = traffic.gam_triton_traffic(shape, torch.float32, device="meta")
        real = traffic.gam_triton_traffic(shape, torch.float32, device=KERNELS_RUN_ON)
        assert meta.by_op() == real.by_op() and meta.bytes == real.bytes


@pytest.mark.skipif(torch.cuda.is_available(), reason="the rehearsal is the CPU's stand-in for the GPU run")
def test_gpu_check_rehearsal_runs_every_step_and_labels_every_file(tmp_path):
    out = tmp_path / "run"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    _run(["make", "-s", "gpu-check", f"GPU_PY={sys.executable}", f"GPU_CHECK_ARGS=--rehearse --out {out}"], env=env)
    assert (tmp_path / "run.tar.gz").exists()
    steps = (out / "steps.txt").read_text()
    for step in ("tests", "tune", "bench", "report"):
        assert f"{step}: exit 0" in steps, steps + (out / f"{step}.txt").read_text()[-3000:]
        assert (out / f"{step}.txt").read_text().startswith("# REHEARSAL")
    assert " passed" in (out / "tests.txt").read_text()
    df = pd.read_csv(out / "results.csv", keep_default_na=False)
    assert df["note"].str.startswith("REHEARSAL").all() and (df["error"] == "").all(), df[["kind", "error"]]
    assert {"gam", "channel_gate", "final_gate", "bn2_stats", "channel_gate_bwd", "model"} <= set(df["kind"])
    assert (out / "summary.md").read_text().count("REHEARSAL") >= 2
    assert list((out / "tuning").glob("*.json")) and list(out.glob("*.png"))
