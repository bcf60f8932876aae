"""GPU readiness without a GPU: the kernels compiled ahead of time for sm_80, sm_90 and sm_100.

``perf/compile_report.py`` runs in a subprocess WITHOUT ``TRITON_INTERPRET`` (the interpreter replaces
@triton.jit functions, which then cannot be compiled for a GPU target, and switches gam_triton's heuristics
to interpreter tiles). It compiles the heuristic config of every kernel at representative shapes, a sample
of the shipped compiled-facts table (``gam_triton/compiled_limits.json``) at the cases it records, and checks
every autotuner candidate at the sweep's shapes against that table. Compile facts only: no GPU needed.
"""
from __future__ import annotations

import csv
import json
import os
import subprocess
import sys

import pytest

triton = pytest.importorskip("triton", reason="triton is not installed (Linux only)")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LIMITS = os.path.join(REPO, "gam_triton", "compiled_limits.json")
ARCHS = {"sm_80", "sm_90", "sm_100"}
KERNELS = {"channel_gate", "final_gate", "bn_relu", "bn_stats", "bn_bwd_reduce", "bn_bwd_apply", "channel_gate_bwd",
           "conv_bn_relu", "conv_gate"}
#: Kernels with tl.dot: their fp16/bf16 and fp32 (tf32, 3xTF32) dots must compile to tensor-core instructions.
DOT_KERNELS = {"channel_gate", "channel_gate_bwd", "conv_bn_relu", "conv_gate"}


def _version(v: str) -> tuple:
    return tuple(int(p) for p in v.split("+")[0].split(".")[:2])


def _ptxas_available() -> bool:
    try:
        sys.path.insert(0, os.path.join(REPO, "perf"))
        from compile_report import ptxas_path

        return os.path.exists(ptxas_path(80))
    except Exception:  # noqa: BLE001 - any failure to locate ptxas means: cannot compile here
        return False
    finally:
        sys.path.remove(os.path.join(REPO, "perf"))


pytestmark = [
    pytest.mark.skipif(_version(triton.__version__) < (3, 4),
                       reason=f"ASTSource(signature, constexprs, attrs) needs Triton >= 3.4, "
                              f"found {triton.__version__}"),
    pytest.mark.skipif(not _ptxas_available(), reason="the triton wheel's ptxas was not found"),
]


@pytest.fixture(scope="module")
def ci_report(tmp_path_factory):
    out = tmp_path_factory.mktemp("compile")
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    cmd = [sys.executable, os.path.join(REPO, "perf", "compile_report.py"), "--subset", "ci", "--quick",
           "--dtypes", "fp32,bf16", "--out", str(out), "--verify-table", "6", "--check-candidates"]
    r = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, f"compile_report failed:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    with open(out / "report.csv") as f:
        rows = list(csv.DictReader(f))
    with open(out / "verify.json") as f:
        verify = json.load(f)
    with open(out / "candidates.json") as f:
        candidates = json.load(f)
    return rows, verify, candidates


def test_heuristics_compile_without_spills_for_every_target(ci_report):
    rows, _, _ = ci_report
    heur = [r for r in rows if r["source"] == "heuristic"]
    assert {r["kernel"] for r in heur} == KERNELS
    assert {r["arch"] for r in heur} == ARCHS
    assert {r["origin"] for r in heur} == {"sweep", "odd-map"}
    bad = [r for r in heur if r["ok"] != "1" or int(r["spill_stores"]) or int(r["spill_loads"])
           or int(r["smem"]) > int(r["smem_limit"])]
    assert not bad, "\n".join(f"{r['kernel']} {r['arch']} C{r['channels']} {r['height']}x{r['width']} {r['dtype']} "
                              f"{r['precision']} {r['layout']}: ok={r['ok']} regs={r['regs']} "
                              f"spill={r['spill_stores']} smem={r['smem']} {r['error']}" for r in bad)
    assert all(int(r["warps_per_sm"]) >= 4 for r in heur)


def test_tensor_cores_in_channel_gate(ci_report):
    """bf16 and fp32 (tf32 and 3xTF32) dots run on tensor cores on every target."""
    rows, _, _ = ci_report
    want = {"sm_80": "mma", "sm_90": "wgmma", "sm_100": "tcgen05"}
    cg = [r for r in rows if r["kernel"] == "channel_gate" and r["source"] == "heuristic"]
    assert cg and {r["precision"] for r in cg if r["dtype"] == "fp32"} == {"ieee", "tf32"}
    assert [r for r in cg if r["tc"] == "none"] == []
    assert {r["tc"] for r in cg if r["arch"] == "sm_80"} == {want["sm_80"]}


def test_tensor_cores_in_training_and_conv_kernels(ci_report):
    """The channel-gate backward (bf16, fp32 at 3xTF32 up to BLOCK_R 64) and the 7x7 convolutions (bf16, fp32
    tf32x3) use tensor cores on every target: mma.sync at least (wgmma / tcgen05 need 64-row tiles). The
    backward's wider fp32 hidden blocks run FMA "ieee" dots (3xTF32 spilled there, configs.py)."""
    rows, _, _ = ci_report
    dots = [r for r in rows if r["kernel"] in DOT_KERNELS - {"channel_gate"} and r["source"] == "heuristic"]
    assert {r["kernel"] for r in dots} == DOT_KERNELS - {"channel_gate"}
    fp32 = {(r["kernel"], r["BLOCK_R"], r["input_precision"]) for r in dots if r["dtype"] == "fp32"}
    assert all(p == "tf32x3" or (k == "channel_gate_bwd" and p == "ieee" and int(br) > 64) for k, br, p in fp32), fp32
    assert ("channel_gate_bwd", "16", "tf32x3") in fp32
    assert [(r["kernel"], r["arch"], r["dtype"], r["channels"]) for r in dots
            if r["tc"] in ("", "none") and r["input_precision"] != "ieee"] == []


def test_shipped_table_matches_fresh_compiles(ci_report):
    """The committed table cannot go stale silently: a sample compiled again gives the same facts."""
    _, verify, _ = ci_report
    with open(LIMITS) as f:
        table = json.load(f)
    if table["triton"] != triton.__version__:
        pytest.skip(f"table generated with Triton {table['triton']}, running {triton.__version__}: "
                    "ptxas and codegen differ; regenerate with make compile-report COMPILE_ARGS=--write-limits")
    assert len(verify) == 6
    assert any(e["spill"] for e in table["entries"].values()), "the sample should hold spilling entries"
    mismatch = [v for v in verify if not v["match"]]
    assert not mismatch, json.dumps(mismatch, indent=1)


def test_candidates_all_compiled_ahead_and_clean(ci_report):
    """Every autotuner candidate at the sweep's shapes is in the table and does not spill or overflow."""
    _, _, cands = ci_report
    assert cands["total"] > 100
    assert cands["flagged"] == []
    assert cands["missing"] == [], f"{len(cands['missing'])} candidates never compiled ahead of time, e.g. " \
                                   f"{cands['missing'][:5]}"


def test_specialisation_mirrors_triton_jit():
    """Ints equal to 1 become constexprs, multiples of 16 get the divisibility hint, as Triton's JIT does."""
    code = ("import sys; sys.path.insert(0, 'perf'); import compile_report as cr; "
            "from gam_triton.configs import Config; "
            "case = cr.Case('final_gate', 64, 7, 7, 'fp16', 'nchw'); "
            "k, g, a, kw = cr.KERNELS['final_gate'].launch(case, Config(64, 16, 0, 4, 1)); "
            "s = cr.specialise(k, a, kw); import json; print(json.dumps(s))")
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    r = subprocess.run([sys.executable, "-c", code], env=env, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    spec = json.loads(r.stdout.strip().splitlines()[-1])
    sig, const, div = spec["signature"], spec["constexprs"], set(spec["divisible"])
    assert sig["x1_ptr"] == "*fp16" and sig["scale_ptr"] == "*fp32"
    assert sig["stride_xp"] == "constexpr" and const["stride_xp"] == 1   # NCHW pixel stride 1
    assert sig["HW"] == "i32" and "HW" not in div                       # 49: no hint
    assert "C" in div and "stride_xc" not in div                       # stride_c = 49
    assert const["BLOCK_P"] == 64 and spec["options"] == {"num_warps": 4, "num_stages": 1}
