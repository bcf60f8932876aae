"""The heuristic launch choices compile for sm_80, sm_90 and sm_100 without register spills, within shared memory,
with tensor-core instructions where a dot runs in fp16/bf16, over the module's whole space, with the Triton in use
(perf/compile_check.py: compile facts from ptxas, no GPU, not timings).

CI runs this file on Triton 3.9 (the default environment), 3.6 and 3.4 (``make test-triton-versions``). The
whole space (every distinct compile of every launch the module makes at the sweep's shapes, the odd maps, every
dtype, layout, precision and variant, batches 1 to 32) is looked up in the committed facts of that Triton; what
is missing (a changed heuristic) is compiled here, up to a bound; a few entries found are compiled again to check
that they are what a compile gives.
"""
import os
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "perf", "compile_check.py")
triton = pytest.importorskip("triton", reason="the compile check compiles Triton kernels")
FACTS = os.path.join(ROOT, "perf", "compile", "facts", f"triton-{triton.__version__}.json")


def _run(*args, timeout=1500) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # compiled for real, not interpreted
    return subprocess.run([sys.executable, SCRIPT, *args], capture_output=True, text=True, timeout=timeout, env=env,
                          cwd=ROOT)


def test_keys_space_and_specialisation_self_test():
    r = _run("--self-test", timeout=600)
    assert r.returncode == 0 and "self-test: ok" in r.stdout, r.stdout[-3000:] + r.stderr[-3000:]


@pytest.mark.skipif(not os.path.exists(FACTS), reason=f"no committed compile facts for Triton {triton.__version__} "
                    f"({os.path.relpath(FACTS, ROOT)}): run `make compile-check` with it (about half an hour)")
def test_the_whole_space_of_heuristics_compiles_without_spills(tmp_path):
    facts = tmp_path / "facts.json"
    shutil.copy(FACTS, facts)  # the committed file stays as it is
    r = _run("--check", "--facts", str(facts), "--max-compiles", "200", "--verify", "3", "--out", str(tmp_path))
    out = r.stdout[-4000:] + r.stderr[-2000:]
    assert r.returncode == 0, out
    assert "0 heuristic problem(s)" in r.stdout and "0 of 3 verified entries differ" in r.stdout, out
    report = (tmp_path / "report.md").read_text()
    assert "**Heuristic problems: 0** (none)" in report
