"""``perf/gpu_check.py``: its own correctness cases (marked ``gpu_check``), the rehearsal run in CI, a phase
made to fail, and the pieces that parse what it runs.

* ``test_block_*``: the whole block, eval forward and one train step (output, input and parameter gradients,
  running statistics), in fp32 / fp16 / bf16 and both layouts, at a YOLO shape (GPU only: too slow for the
  interpreter) and at odd shapes, against float64: gam_triton must be as close to float64 as eager PyTorch in
  the same dtype (within a factor, plus a floor). Part of the check's correctness selection.
* ``test_rehearsal_*``: ``python perf/gpu_check.py --rehearse`` in a subprocess (CPU, interpreter, 60 s): every
  file written and labelled, the budget kept; then a short run with one phase made to fail.
"""
from __future__ import annotations

import contextlib
import copy
import json
import os
import subprocess
import sys
import time
from types import SimpleNamespace

import pytest
import torch

from gam_cases import make_input, make_ref
from gam_triton import GAM

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "perf"))

import gpu_check  # noqa: E402

# --- the check's own correctness cases -------------------------------------------------------------------------
#: (form, C, (B, H, W), YOLO shape): C128 at 40x40 is a YOLOv8s P4 map; C48 (C/r = 12) and C20 (C/r = 5, padded to
#: 16 in the kernels) at odd maps.
BLOCK_CASES = [
    ("yolo_grouped", 128, (2, 40, 40), True),
    ("yolo_grouped", 48, (3, 5, 7), False),
    ("paper", 20, (2, 7, 5), False),
]
#: Relative L2 error floors (the "as close as eager" rule: ours <= FACTOR * eager's + floor).
FLOOR = {torch.float32: 2e-5, torch.float16: 4e-3, torch.bfloat16: 3e-2}
FACTOR = 4.0


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    return (a - b).norm().item() / max(b.norm().item(), 1e-30)


def _check(what: str, ours: torch.Tensor, eager: torch.Tensor, want: torch.Tensor, dtype, scale: float = 1.0):
    e_ours, e_eager = _rel(ours, want), _rel(eager, want)
    assert torch.isfinite(ours).all(), f"{what}: not finite"
    bound = FACTOR * e_eager + scale * FLOOR[dtype]
    assert e_ours <= bound, f"{what}: relative error {e_ours:.2e} > {bound:.2e} (eager, same dtype: {e_eager:.2e})"


def _step(module, x, gout):
    module.zero_grad(set_to_none=True)
    x = x.detach().clone().requires_grad_(True)
    out = module(x)
    out.backward(gout)
    return out, x.grad, [p.grad for p in module.parameters()]


@pytest.mark.gpu_check
@pytest.mark.parametrize("case", BLOCK_CASES, ids=[f"{f}-C{c}-{b}x{h}x{w}" for f, c, (b, h, w), _ in BLOCK_CASES])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_block_eval_and_train_step_against_float64(case, dtype, channels_last, device):
    form, c, (b, h, w), yolo_shape = case
    if yolo_shape and device == "cpu":
        pytest.skip("YOLO-sized shape: checked on a GPU (minutes under the interpreter)")
    ref = make_ref(form, c)
    ref64 = copy.deepcopy(ref).double()
    eager = copy.deepcopy(ref).to(device=device, dtype=dtype)
    gam = GAM.from_module(copy.deepcopy(ref)).to(device=device, dtype=dtype)
    x = make_input(b, c, h, w, dtype, device, channels_last)
    gout = make_input(b, c, h, w, dtype, device, channels_last, seed=5)
    with torch.no_grad():
        for m in (ref64, eager, gam):
            m.eval()
        want = ref64(x.cpu().double())
        _check("eval output", gam(x), eager(x), want, dtype)
    for m in (ref64, eager, gam):
        m.train()
    w_out, w_gx, w_gp = _step(ref64, x.cpu().double(), gout.cpu().double())
    e_out, e_gx, e_gp = _step(eager, x, gout)
    o_out, o_gx, o_gp = _step(gam, x, gout)
    assert o_out.dtype == dtype and o_gx.dtype == dtype
    _check("train output", o_out, e_out, w_out, dtype)
    _check("grad x", o_gx, e_gx, w_gx, dtype, 3)
    for i, (o, e, want_g) in enumerate(zip(o_gp, e_gp, w_gp)):
        _check(f"grad of parameter {i}", o, e, want_g, dtype, 3)
    for (name, o), e, want_b in zip(gam.named_buffers(), eager.buffers(), ref64.buffers()):
        if o.dtype.is_floating_point:
            _check(f"buffer {name}", o.float(), e.float(), want_b, dtype)


#: The Triton convolutions (GAM_TRITON_CONV=triton) against the cuDNN path, eval: (form, C, (B, H, W), GPU only).
CONV_CASES = [
    ("yolo_grouped", 128, (2, 40, 40), True),
    ("paper", 256, (2, 20, 20), True),
    ("paper", 20, (1, 3, 5), False),
]


@pytest.mark.gpu_check
@pytest.mark.parametrize("case", CONV_CASES, ids=[f"{f}-C{c}-{b}x{h}x{w}" for f, c, (b, h, w), _ in CONV_CASES])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["fp32", "fp16", "bf16"])
def test_block_triton_convs_against_cudnn(case, dtype, device, monkeypatch):
    form, c, (b, h, w), gpu_only = case
    if device == "cpu" and (gpu_only or dtype != torch.float32):
        pytest.skip("checked on a GPU (the interpreted 7x7 convolutions take seconds per call)")
    ref = make_ref(form, c)
    gam = GAM.from_module(copy.deepcopy(ref)).to(device=device, dtype=dtype).eval()
    x = make_input(b, c, h, w, dtype, device, True)
    with torch.no_grad():
        want = copy.deepcopy(ref).double().eval()(x.cpu().double())
        monkeypatch.setenv("GAM_TRITON_CONV", "cudnn")
        cudnn = gam(x)
        monkeypatch.setenv("GAM_TRITON_CONV", "triton")
        triton_out = gam(x)
    assert triton_out.dtype == cudnn.dtype == dtype
    _check("Triton convolutions against float64, cuDNN's error as the yardstick", triton_out, cudnn, want, dtype)
    assert _rel(triton_out, cudnn) <= 2 * FLOOR[dtype] + 2 * _rel(cudnn, want), "Triton vs cuDNN"


# --- parsing ---------------------------------------------------------------------------------------------------------
def test_parse_pytest_closing_line_and_cut_short_output():
    text = ("tests/test_a.py::test_x[1] PASSED [ 10%]\n[gw1] [ 20%] FAILED tests/test_a.py::test_y\n"
            "===== 1 failed, 1 passed, 2 skipped, 1 error in 3.20s =====\n")
    res = gpu_check.parse_pytest(text)
    assert (res["passed"], res["failed"], res["skipped"], res["errors"]) == (1, 1, 2, 1)
    assert res["failures"] == ["tests/test_a.py::test_y"]
    cut = gpu_check.parse_pytest("tests/t.py::a PASSED [ 1%]\ntests/t.py::b SKIPPED (why) [ 2%]\n")
    assert (cut["passed"], cut["skipped"]) == (1, 1) and "cut short" in cut["from"]


def test_parse_tune_table_and_gains_per_kernel():
    text = ("[1/1] C=128 ...\n| kernel | key | tuned config | heuristic ms | tuned ms | gain | tuning s | configs |\n"
            "|---|---|---|---|---|---|---|---|\n"
            "| channel_gate | `k1` | P64 C128 w4 s3 | 0.0200 | 0.0100 | 2.00x | 1.50 | 12 (1 failed) |\n"
            "| channel_gate | `k2` | P64 C128 w4 s3 | 0.0200 | 0.0250 | - | 1.00 | 12 (0 failed) |\n"
            "| final_gate | `k3` | P32 C64 w4 s2 | 0.0300 | 0.0200 | 1.50x | 0.50 | 8 (0 failed) |\n"
            "done\n")
    rows = gpu_check.parse_tune_table(text)
    assert [r["kernel"] for r in rows] == ["channel_gate", "channel_gate", "final_gate"]
    gains = {g["kernel"]: g for g in gpu_check.kernel_gains(rows)}
    assert gains["channel_gate"]["keys"] == 2 and gains["channel_gate"]["geomean"] == pytest.approx(2.0)
    assert gains["final_gate"]["max"] == pytest.approx(1.5) and gains["channel_gate"]["tune_s"] == pytest.approx(2.5)


def test_the_plan_fixes_shares_up_front_and_holds_eight_files_at_most():
    assert len(gpu_check.FILES) <= 8
    assert abs(sum(p.share for p in gpu_check.PHASES) - 1) < 1e-9
    states = gpu_check.plan_states(480, {p.name for p in gpu_check.PHASES})
    assert [s.name for s in states][-1] == "summary" and states[-1].deadline_s <= 480 - gpu_check.FINAL_END_S + 1e-6
    assert all(a.deadline_s <= b.deadline_s for a, b in zip(states, states[1:]))
    assert {f for p in gpu_check.PHASES for f in p.files} <= set(gpu_check.FILES)
    groups = gpu_check.block_groups(gpu_check.GPU_PLAN)
    assert groups[0]["dtype"] == "bf16" and groups[0]["cl"] and groups[0]["providers"][0] == "eager"
    assert {g["c"] for g in groups} == {128, 256, 512} and {g["form"] for g in groups} == {"yolo", "paper"}


@pytest.fixture
def no_onednn():
    """PyTorch's own CPU convolutions, as in the rehearsal (oneDNN's first calls of a shape took seconds here)."""
    old = torch.backends.mkldnn.enabled
    torch.backends.mkldnn.enabled = False
    yield
    torch.backends.mkldnn.enabled = old


def test_every_provider_of_the_block_and_the_detector_steps_and_probes(no_onednn):
    """What the timing phases build, run once here whatever the rehearsal had time for (on a loaded CPU it skips
    items): each provider's timed step and its probe (output in eval, input gradient or loss in train). The
    detector's train step once (its code is the same for every provider; the CPU makes it slow)."""
    with gpu_check._compile_context(SimpleNamespace(rehearse=True)):   # torch.compile with backend="eager"
        for provider, mode in (("eager", "forward"), ("eager", "train"), ("gam_triton", "forward"),
                               ("gam_triton", "train"), ("gam_triton-tconv", "forward"), ("compile", "forward"),
                               ("compile-max-autotune", "forward")):
            case, probe = gpu_check.block_case("paper", 16, 3, 2, "fp32", mode == "forward", mode, provider, "cpu")
            with torch.no_grad() if mode == "forward" else contextlib.nullcontext():
                case.step()
                out = probe()
            assert torch.isfinite(out).all() and case.bytes > 0 and case.flops > 0, (provider, mode)
            assert (len(case.grads) > 2) == (mode == "train")
    plan = gpu_check.REHEARSAL_PLAN
    outs = {}
    for provider, mode in (("eager", "forward"), ("gam_triton", "forward"), ("no_gam", "forward"),
                           ("no_gam", "train")):
        case, probe, params = gpu_check.model_case(provider, mode, plan, "cpu")
        with torch.no_grad() if mode == "forward" else contextlib.nullcontext():
            case.step()
            outs[mode, provider] = probe()
        assert params > (2_500_000 if provider == "no_gam" else 3_000_000)
    assert gpu_check.rel_err(outs["forward", "gam_triton"], outs["forward", "eager"]) < 1e-4
    assert outs["train", "no_gam"].numel() == 1 and torch.isfinite(outs["train", "no_gam"]).all()


# --- the rehearsal ---------------------------------------------------------------------------------------------------
def _run_check(tmp_path, *args, timeout=150):
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "GAM_TRITON_CACHE_DIR")}
    t = time.monotonic()
    proc = subprocess.run([sys.executable, os.path.join(REPO, "perf", "gpu_check.py"), "--rehearse", "--out",
                           str(tmp_path), *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    return proc, time.monotonic() - t


def _status(tmp_path) -> dict:
    with open(tmp_path / "status.json") as f:
        return json.load(f)


def _why(proc, tmp_path) -> str:
    """What to read when a run did not end as expected: its phases and the end of its output."""
    try:
        phases = [(p["name"], p["state"], p["error"] or p["note"]) for p in _status(tmp_path)["phases"]]
    except (OSError, ValueError, KeyError) as e:
        phases = [repr(e)]
    return f"rc {proc.returncode}; phases {phases}\n{proc.stdout[-2500:]}\n{proc.stderr[-1500:]}"


def test_rehearsal_writes_every_file_labelled_and_keeps_the_budget(tmp_path):
    proc, wall = _run_check(tmp_path)
    assert proc.returncode == 0, _why(proc, tmp_path)
    files = sorted(os.listdir(tmp_path))
    assert files == sorted(gpu_check.FILES), files
    st = _status(tmp_path)
    assert st["finished"] and st["rehearsal"] and st["elapsed_s"] <= 60
    assert wall <= 60 + 5, f"the rehearsal took {wall:.1f} s of its 60 s budget"
    states = {p["name"]: p for p in st["phases"]}
    assert set(states) == {p.name for p in gpu_check.PHASES}
    assert all(p["state"] in ("done", "done (items skipped for time)", "cut short") for p in st["phases"]), st
    for p in st["phases"][:-1]:
        assert p["ended_s"] <= p["deadline_s"] + gpu_check.ALARM_GRACE_S + 1.0, p
    assert st["phases"][-1]["ended_s"] <= 60 - gpu_check.WATCHDOG_S
    for name in gpu_check.FILES:
        with open(tmp_path / name) as f:
            head = f.read(4000)
        assert "REHEARSAL" in head.split("\n", 3)[0] or '"label": "REHEARSAL' in head, (name, head[:200])
        assert "NOT performance figures" in head, name
    with open(tmp_path / "summary.md") as f:
        summary = f.read()
    assert "Provisional" not in summary and "not judged (rehearsal)" in summary
    assert states["correctness"]["done"], states["correctness"]   # at least one pytest run finished or was cut
    assert states["headline"]["done"], states["headline"]         # at least one group measured
    rows = gpu_check.read_csv_rows(str(tmp_path / "timings.csv"))
    assert rows and all(r["note"].startswith("REHEARSAL") for r in rows)
    assert {r["provider"] for r in rows} >= {"eager", "gam_triton"}


def test_rehearsal_records_a_failing_phase_and_runs_the_others(tmp_path):
    proc, wall = _run_check(tmp_path, "--budget", "25", "--phases", "env,tune,components,summary", "--fail-phase",
                            "tune", timeout=90)
    assert proc.returncode == 1, _why(proc, tmp_path)
    st = _status(tmp_path)
    states = {p["name"]: p for p in st["phases"]}
    assert states["tune"]["state"] == "failed" and "InjectedFailure" in states["tune"]["error"]
    assert states["env"]["state"] in ("done", "cut short") and states["summary"]["state"] == "done"
    assert states["components"]["state"] in ("done", "done (items skipped for time)", "cut short")
    assert states["headline"]["state"] == "not selected"
    for name in ("env.json", "tune.md", "timings.csv", "summary.md", "status.json", "run.log"):
        assert (tmp_path / name).exists(), name
    with open(tmp_path / "summary.md") as f:
        summary = f.read()
    assert "| tune |" in summary and "failed" in summary and "InjectedFailure" in summary
    assert st["elapsed_s"] <= 25 and wall <= 25 + 5


def test_a_folder_holding_a_run_is_refused(tmp_path):
    (tmp_path / "status.json").write_text("{}")
    proc, _ = _run_check(tmp_path, timeout=60)
    assert proc.returncode == 2 and "already holds a run" in proc.stderr
