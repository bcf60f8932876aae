"""gam_triton without Triton (macOS, Windows, CPU-only installs): the package imports and its PyTorch path runs.

Each check runs in a fresh interpreter with Triton blocked (``sys.modules["triton"] = None``, so ``import triton``
raises ImportError as where it is not installed) and ``fcntl`` blocked (as on Windows), with
``TRITON_INTERPRET=1`` set (asking for the interpreter without Triton must not matter). The checks are the
``_in_subprocess_*`` functions below: they import gam_triton themselves, after the block, so this file imports
no part of the package at module level.
"""
from __future__ import annotations

import copy
import os
import subprocess
import sys
import tempfile

import pytest
import torch
from torch import nn

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
BLOCK = "import sys; sys.modules['triton'] = None; sys.modules['fcntl'] = None; "


def _run(check: str, *args: str) -> str:
    """Run ``check(*args)`` of this file in a fresh interpreter with Triton and fcntl blocked; its stdout."""
    code = (BLOCK + f"sys.path.insert(0, {HERE!r}); import test_no_triton as t; "
            f"t.{check}(*{list(args)!r}); print('OK')")
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0 and proc.stdout.rstrip().endswith("OK"), (
        f"{check} failed without Triton (exit {proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-6000:]}")
    return proc.stdout


def _forms() -> dict:
    from gam_triton.reference import PaperGAM, SeedGAM, YoloGAM

    return {"yolo_grouped": (16, lambda: YoloGAM(16, 16, group=True)),
            "yolo_plain": (12, lambda: YoloGAM(12, 12, group=False)),
            "paper": (20, lambda: PaperGAM(20)), "seed": (8, lambda: SeedGAM(8, 8))}


def _randomise(module: nn.Module, seed: int) -> nn.Module:
    """Random weights and BatchNorm affine and statistics (activations O(1))."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, (nn.Linear, nn.Conv2d)):
                m.weight.copy_(torch.randn(m.weight.shape, generator=gen) * 1.5 / m.weight[0].numel() ** 0.5)
                if m.bias is not None:
                    m.bias.copy_(torch.randn(m.bias.shape, generator=gen) * 0.3)
            elif isinstance(m, nn.BatchNorm2d):
                m.weight.copy_(torch.randn(m.weight.shape, generator=gen) * 0.3 + 1)
                m.bias.copy_(torch.randn(m.bias.shape, generator=gen) * 0.3)
                m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=gen) * 0.2)
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=gen) + 0.5)
    return module


def _close(got: torch.Tensor, want: torch.Tensor, what: str, tol: float = 1e-4) -> None:
    torch.testing.assert_close(got.double(), want.double(), rtol=tol, atol=tol, msg=lambda m: f"{what}: {m}")


def _model(seed: int = 0) -> nn.Module:
    """A small network with GAM blocks of two forms between convolutions (what convert and torch.save see)."""
    torch.manual_seed(seed)
    forms = _forms()
    return _randomise(nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), forms["yolo_grouped"][1](), nn.Conv2d(16, 20, 1),
                                    forms["paper"][1]()), seed)


# --- run in the subprocess -------------------------------------------------------------------------------
def _in_subprocess_imports() -> None:
    """Every module of the package imports (the jit kernels apart: they are Triton code; optional integrations
    apart when their own dependency is missing), and the boundary says no Triton."""
    import importlib
    import pkgutil

    import gam_triton
    from gam_triton.ops import _runtime

    assert sys.modules["triton"] is None and not _runtime.HAS_TRITON and _runtime.TRITON == (0, 0)
    assert not _runtime.use_triton(torch.randn(1, 4, 2, 2)), "Triton chosen without Triton"
    names = [m.name for m in pkgutil.walk_packages(gam_triton.__path__, "gam_triton.")]
    assert {"gam_triton.module", "gam_triton.ops._autotune", "gam_triton.tune", "gam_triton.bench"} <= set(names)
    for name in names:
        if name.startswith("gam_triton.kernels"):
            continue
        try:
            importlib.import_module(name)
        except ImportError as e:  # an optional integration's own dependency (ultralytics) may be missing
            assert e.name and not e.name.startswith("triton") and not e.name.startswith("gam_triton"), (
                f"{name} needs Triton or fails: {e!r}")
            print(f"{name}: skipped, {e.name} is not installed")
    from gam_triton import tune
    from gam_triton.ops import _autotune

    assert tune.main(["--channels", "16", "--sizes", "8"]) == 2  # refuses, saying Triton is missing
    with tempfile.TemporaryDirectory() as d:  # the cache file without fcntl (Windows): written unlocked, read back
        cache = _autotune._Cache(os.path.join(d, "c.json"), "cpu")
        cache.store("spatial", "k", {"path": "cudnn", "source": "heuristic"})
        assert cache.read() == {"spatial": {"k": {"path": "cudnn", "source": "heuristic"}}}
        assert _autotune.decode({"path": "cudnn"}) == "cudnn" and _autotune.TRITON_VERSION == "none"


def _in_subprocess_pytorch_path() -> None:
    """Every form, eval and train, forward and backward, against its float64 reference; running statistics; fp32
    and bf16; channels_last; GAM.from_module, state dicts both ways, convert / revert, deploy (TorchScript, ONNX,
    torch.export), save / load."""
    import io

    import gam_triton
    from gam_triton.deploy import plain_graph

    for i, (form, (c, make)) in enumerate(_forms().items()):
        ref = _randomise(make(), i)
        gam = gam_triton.GAM.from_module(ref)
        ref64 = copy.deepcopy(ref).double()
        x = torch.randn(3, c, 7, 5, generator=torch.Generator().manual_seed(i))
        for cl in (False, True):
            xi = x.contiguous(memory_format=torch.channels_last) if cl else x
            gam.eval(), ref64.eval()
            with torch.no_grad():
                _close(gam(xi), ref64(x.double()), f"{form} eval channels_last={cl}")
                _close(copy.deepcopy(gam).bfloat16()(xi.bfloat16()), ref64(x.double()), f"{form} eval bf16", 8e-2)
        g, r = copy.deepcopy(gam).train(), copy.deepcopy(ref64).train()
        xa, xb = x.clone().requires_grad_(), x.double().requires_grad_()
        ya, yb = g(xa), r(xb)
        dy = torch.randn(ya.shape, generator=torch.Generator().manual_seed(9))
        ya.backward(dy)
        yb.backward(dy.double())
        _close(ya, yb, f"{form} train forward")
        _close(xa.grad, xb.grad, f"{form} input gradient")
        for (n, p), q in zip(g.named_parameters(), r.parameters()):
            _close(p.grad, q.grad, f"{form} gradient of {n}")
        for (n, b), q in zip(g.named_buffers(), r.buffers()):
            _close(b, q, f"{form} buffer {n} after a train step")
        if form != "seed":  # a GAM's keys are the nn.Sequential forms' (the seed form's keys load into a GAM)
            copy.deepcopy(ref).load_state_dict(gam.state_dict(), strict=True)
        fresh = gam_triton.GAM.from_module(make())
        fresh.load_state_dict(ref.state_dict(), strict=True)
        with torch.no_grad():
            _close(fresh.eval()(x), ref64.eval()(x.double()), f"{form} state dict loaded")

    model = _model()
    model64 = copy.deepcopy(model).double().eval()
    conv = gam_triton.convert(copy.deepcopy(model), strict=True).eval()
    assert sum(isinstance(m, gam_triton.GAM) for m in conv.modules()) == 2
    x = torch.randn(2, 3, 9, 11)
    want = model64(x.double())
    with torch.no_grad():
        _close(conv(x), want, "converted model")
        _close(torch.jit.trace(conv, x)(x), want, "TorchScript trace")
        _close(torch.export.export(conv, (x,)).module()(x), want, "torch.export")
        with plain_graph():
            _close(torch.export.export(conv, (x,)).module()(x), want, "torch.export under plain_graph")
        buf = io.BytesIO()
        torch.onnx.export(conv, (x,), buf, dynamo=False, opset_version=17, input_names=["input"])
        try:
            import onnxruntime
        except ImportError:
            print("onnxruntime not installed: the ONNX graph is exported, not run")
        else:
            sess = onnxruntime.InferenceSession(buf.getvalue(), providers=["CPUExecutionProvider"])
            _close(torch.from_numpy(sess.run(None, {"input": x.numpy()})[0]), want, "ONNX in onnxruntime")
        buf = io.BytesIO()
        torch.save(conv, buf)
        buf.seek(0)
        _close(torch.load(buf, weights_only=False)(x), want, "torch.save / torch.load round trip")
        _close(gam_triton.revert(copy.deepcopy(conv))(x), want, "reverted model")


def _in_subprocess_load(path: str) -> None:
    """A checkpoint written where Triton runs (a converted model, its state dict, input and expected output)
    loads and gives the expected outputs here; ``python -m gam_triton.bench`` runs here too."""
    import gam_triton

    ck = torch.load(path, weights_only=False)
    model = ck["model"]
    assert sum(isinstance(m, gam_triton.GAM) for m in model.modules()) == 2
    with torch.no_grad():
        _close(model.eval()(ck["x"]), ck["want"], "loaded converted model, eval")
    fresh = gam_triton.convert(_model(seed=5))
    fresh.load_state_dict(ck["state_dict"], strict=True)
    with torch.no_grad():
        _close(fresh.eval()(ck["x"]), ck["want"], "state dict loaded into a fresh converted model")
    model.train()
    model(ck["x"].requires_grad_()).sum().backward()  # trains here too

    import csv

    from gam_triton import bench

    out = os.path.join(os.path.dirname(path), "bench")  # the benchmark CLI runs too, with the CPU timer
    assert bench.main(["test_no_triton:_model", "--imgsz", "8", "--rep-ms", "1", "--device", "cpu", "--out", out]) == 0
    with open(os.path.join(out, "_model_cpu_b1_8.csv"), newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 6 and {(r["triton"], r["timer"]) for r in rows} == {("not installed", "perf_counter median")}


# --- the tests -------------------------------------------------------------------------------------------
def test_every_module_imports_without_triton():
    _run("_in_subprocess_imports")


@pytest.mark.slow
def test_pytorch_path_without_triton_matches_float64():
    _run("_in_subprocess_pytorch_path")


def test_checkpoint_of_a_converted_model_loads_without_triton(tmp_path):
    import gam_triton

    model = gam_triton.convert(_model(seed=1), strict=True)
    x = torch.randn(2, 3, 6, 7)
    model.train()
    model(x).sum().backward()  # the train path ran (kernels under the interpreter, where present)
    model.eval()
    with torch.no_grad():
        model(x)  # the eval caches are filled before saving
        want = gam_triton.revert(copy.deepcopy(model)).double()(x.double())
    path = tmp_path / "converted.pt"
    torch.save({"model": model, "state_dict": model.state_dict(), "x": x, "want": want}, path)
    _run("_in_subprocess_load", str(path))
