"""``python -m gam_triton.bench MODEL``: the user-facing benchmark, on the CPU at tiny sizes.

The command runs in a subprocess without ``TRITON_INTERPRET`` (the PyTorch path: quick; CPU figures) for a
module-path factory and an ultralytics-style ``.pt``; loading (every MODEL form, the error messages) is tested
in-process. Timings here are CPU figures on a shared machine: only their presence and the rows' structure are
checked, never their values.
"""
from __future__ import annotations

import copy
import csv
import importlib.util
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from torch import nn

import gam_triton
from gam_triton import bench
from gam_triton.reference import PaperGAM, YoloGAM

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

FACTORY = textwrap.dedent("""
    from torch import nn
    from gam_triton.reference import PaperGAM, YoloGAM

    def make_model():
        return nn.Sequential(nn.Conv2d(3, 16, 3, 2, 1), nn.ReLU(), YoloGAM(16, 16, group=True),
                             nn.Conv2d(16, 20, 3, 2, 1), PaperGAM(20), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                             nn.Linear(20, 4))

    MODEL = make_model()
""")

GAM_YAML = textwrap.dedent("""
    nc: 3
    scales:
      n: [0.33, 0.25, 1024]
    backbone:
      - [-1, 1, Conv, [64, 3, 2]]
      - [-1, 1, Conv, [128, 3, 2]]
      - [-1, 1, C2f, [128, True]]
      - [-1, 1, SPPF, [128, 5]]
      - [-1, 1, GAM_Attention, [{c}, {c}]]
    head:
      - [-1, 1, Classify, [nc]]
""")


def _factory(folder) -> str:
    path = os.path.join(folder, "tiny_gam_net.py")
    with open(path, "w") as f:
        f.write(FACTORY)
    return path


def _cli(args: list, cwd) -> tuple[int, str, str]:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(PYTHONPATH=os.pathsep.join([str(cwd), ROOT, env.get("PYTHONPATH", "")]), YOLO_OFFLINE="1")
    proc = subprocess.run([sys.executable, "-m", "gam_triton.bench", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=600)
    return proc.returncode, proc.stdout, proc.stderr


def _rows(path: str) -> list:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _check_output(out_dir, stem: str, blocks: dict, batch: int, imgsz: int) -> list:
    """The CSV and PNG exist; one row per block and mode with the captured input, then the whole model."""
    base = os.path.join(out_dir, f"{stem}_cpu_b{batch}_{imgsz}")
    with open(base + ".png", "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    rows = _rows(base + ".csv")
    assert tuple(rows[0]) == bench.COLUMNS
    assert [(r["scope"], r["name"], r["mode"]) for r in rows] == [
        *(("block", n, m) for n in blocks for m in ("eval", "train")),
        ("model", "(whole model)", "eval"), ("model", "(whole model)", "train")]
    for r in rows:
        assert r["figures"].startswith("CPU figures") and "not GPU performance" in r["figures"], r["figures"]
        assert r["timer"] == "perf_counter median" and r["device"] == "cpu"
        assert r["eager_peak_mb"] == r["gam_triton_peak_mb"] == ""  # n/a on the CPU
        for c in ("eager_ms", "gam_triton_ms", "speedup", "eager_share_pct", "gam_triton_share_pct"):
            assert float(r[c]) > 0 or c.endswith("share_pct") and r["scope"] == "model", (c, r)
        if r["scope"] == "block":
            assert r["input"] == blocks[r["name"]], r
    model_eval = rows[-2]
    assert float(model_eval["no_gam_ms"]) > 0 and float(model_eval["max_abs_diff"]) < 1e-4
    assert float(model_eval["eager_img_per_s"]) == pytest.approx(1e3 * batch / float(model_eval["eager_ms"]),
                                                                 rel=1e-3)
    return rows


# --- the command -------------------------------------------------------------------------------------------
def test_cli_on_a_module_path_factory(tmp_path):
    _factory(tmp_path)
    rc, out, err = _cli(["tiny_gam_net:make_model", "--imgsz", "32", "--batch", "2", "--rep-ms", "1", "--out",
                         str(tmp_path / "out")], tmp_path)
    assert rc == 0, err
    _check_output(tmp_path / "out", "make_model", {"2": "2x16x16x16 float32", "4": "2x20x8x8 float32"}, 2, 32)
    assert "CPU figures" in out and "images/s at eval" in out


def test_cli_on_an_ultralytics_style_checkpoint_of_a_converted_half_model(tmp_path):
    """A dict with "ema" None and "model" holding a converted fp16 model with frozen parameters (as ultralytics
    saves one): loaded in fp32, trained whole, gam_triton blocks reverted for the eager figures."""
    sys.path.insert(0, str(tmp_path))
    try:
        _factory(tmp_path)
        import tiny_gam_net  # noqa: F401  (pickled by reference: the subprocess imports it from PYTHONPATH)
        model = gam_triton.convert(tiny_gam_net.make_model()).half().requires_grad_(False)  # as ultralytics saves
    finally:
        sys.path.remove(str(tmp_path))
    torch.save({"epoch": 3, "ema": None, "model": model}, tmp_path / "last.pt")
    rc, out, err = _cli(["last.pt", "--imgsz", "16", "--rep-ms", "1", "--out", str(tmp_path / "out")], tmp_path)
    assert rc == 0, err
    _check_output(tmp_path / "out", "last", {"2": "1x16x8x8 float32", "4": "1x20x4x4 float32"}, 1, 16)


def test_cli_says_what_is_missing(tmp_path, monkeypatch, capsys):
    torch.save(nn.Linear(2, 2).state_dict(), tmp_path / "weights.pt")
    rc, _, err = _cli(["weights.pt", "--imgsz", "8"], tmp_path)  # as a user runs it
    assert rc == 2 and "no pickled module" in err and "module:factory" in err, err
    monkeypatch.chdir(tmp_path)
    assert bench.main(["model.onnx"]) == 2
    assert "neither" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        bench.main(["x:y", "--imgsz", "0"])
    if not torch.cuda.is_available():
        with pytest.raises(SystemExit):
            bench.main(["x:y", "--device", "cuda"])
        assert "CUDA is not available" in capsys.readouterr().err


# --- loading, in-process -----------------------------------------------------------------------------------
def test_every_model_form_loads(tmp_path, monkeypatch):
    path = _factory(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    for spec in (f"{path}:make_model", "tiny_gam_net:make_model", "tiny_gam_net:MODEL"):
        m = bench.load_model(spec)
        assert [type(b) for b in (m[2], m[4])] == [YoloGAM, PaperGAM], spec
        assert bench.gam_paths(gam_triton.convert(m)) == ["2", "4"]
    half = bench.load_model("tiny_gam_net:make_model").half()
    torch.save(half, tmp_path / "plain.pt")
    torch.save({"ema": half, "model": None}, tmp_path / "ema.pt")
    for name in ("plain.pt", "ema.pt"):
        m = bench.load_model(str(tmp_path / name))
        assert isinstance(m, nn.Sequential) and all(p.dtype == torch.float32 for p in m.parameters())


@pytest.mark.parametrize("spec, message", [
    ("no_such_module_xyz:make", "cannot import 'no_such_module_xyz'"),
    ("tiny_gam_net:nothing", "has no attribute 'nothing'"),
    ("missing.pt", "no such checkpoint"),
    ("model.onnx", "neither"),
    ("missing_file.py:make", "no such file"),
])
def test_bad_model_spec_raises_a_clear_error(tmp_path, monkeypatch, spec, message):
    _factory(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(bench.BenchError, match=message):
        bench.load_model(spec)


def test_files_that_are_not_models_say_so(tmp_path):
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(bench.BenchError, match="cannot be read by torch.load"):
        bench.load_model(str(tmp_path / "junk.pt"))
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    missing = importlib.util.find_spec("ultralytics") is None
    with pytest.raises(bench.BenchError, match="needs ultralytics, which is not installed: pip install" if missing
                       else "not an ultralytics model yaml"):
        bench.load_model(str(tmp_path / "list.yaml"))


def test_checkpoint_whose_classes_are_missing_names_them(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(tmp_path))
    (tmp_path / "gone_pkg_xyz.py").write_text("from torch import nn\nclass Net(nn.Linear):\n    pass\n")
    import gone_pkg_xyz

    torch.save(gone_pkg_xyz.Net(2, 2), tmp_path / "net.pt")
    monkeypatch.delitem(sys.modules, "gone_pkg_xyz")
    (tmp_path / "gone_pkg_xyz.py").unlink()
    with pytest.raises(bench.BenchError, match="gone_pkg_xyz"):
        bench.load_model(str(tmp_path / "net.pt"))


def test_timer_and_labels_on_the_cpu():
    cpu = torch.device("cpu")
    calls = []
    ms = bench.time_ms(lambda: calls.append(1), cpu, rep_ms=1)
    assert ms >= 0 and len(calls) >= bench.WARMUP_CALLS + bench.MIN_REPS
    assert bench.peak_mb(lambda: None, cpu) is None
    assert bench.timer_name(cpu) == "perf_counter median"
    assert bench.figures_label(cpu).startswith("CPU figures")


def test_a_measurement_that_raises_is_recorded_and_the_others_go_on():
    def broken():
        raise ValueError("Expected more than 1 value per channel when training")

    failures = []
    assert bench.measure(broken, torch.device("cpu"), 1, "whole model, eager, train", failures) == (None, None)
    assert failures == ["whole model, eager, train: ValueError: Expected more than 1 value per channel when training"]
    with pytest.raises(ValueError):
        bench.measure(broken, torch.device("cpu"), 1)


def test_train_step_reaches_every_parameter_and_leaves_no_gradient_behind_between_calls():
    m = nn.Sequential(nn.Conv2d(3, 16, 1), YoloGAM(16, 16, group=True))
    step = bench.train_step(m, torch.randn(1, 3, 5, 5), None)
    step()
    assert all(p.grad is not None for p in m.parameters())
    assert bench.train_step(m.requires_grad_(False), torch.randn(1, 3, 5, 5), None) is None


# --- ultralytics yaml ----------------------------------------------------------------------------------------
def test_yaml_with_a_forks_own_gam_class(tmp_path, monkeypatch):
    """A fork defines GAM_Attention in ultralytics.nn.tasks itself: the yaml builds with it, nothing registered."""
    pytest.importorskip("ultralytics", reason="the yaml route needs ultralytics (the [ultralytics] extra)")
    tasks = pytest.importorskip("ultralytics.nn.tasks", reason="ultralytics.nn.tasks does not import here")
    monkeypatch.setenv("YOLO_OFFLINE", "1")
    monkeypatch.setattr(tasks, "GAM_Attention", YoloGAM, raising=False)
    monkeypatch.setitem(sys.modules, "gam_triton.ultralytics", None)  # must not be needed
    (tmp_path / "fork.yaml").write_text(GAM_YAML.format(c=32))  # a fork's literal args: 128 * 0.25 at scale n
    model = bench.load_model(str(tmp_path / "fork.yaml"))
    paths = bench.gam_paths(gam_triton.convert(gam_triton.revert(model)))
    assert paths == ["model.4"]
    seen = bench.capture_inputs(model, paths, torch.randn(1, 3, 32, 32), None)
    assert seen["model.4"].shape == (1, 32, 8, 8)


def test_yaml_with_gam_names_and_no_registration_says_what_is_missing(tmp_path, monkeypatch):
    pytest.importorskip("ultralytics", reason="the yaml route needs ultralytics (the [ultralytics] extra)")
    tasks = pytest.importorskip("ultralytics.nn.tasks", reason="ultralytics.nn.tasks does not import here")
    for name in bench.YAML_GAM_NAMES:
        monkeypatch.delattr(tasks, name, raising=False)
    monkeypatch.setitem(sys.modules, "gam_triton.ultralytics", None)  # as if it could not be imported
    (tmp_path / "gam.yaml").write_text(GAM_YAML.format(c=1024))
    with pytest.raises(bench.BenchError, match="GAM_Attention.*gam_triton.ultralytics"):
        bench.load_model(str(tmp_path / "gam.yaml"))


def test_yaml_with_gam_names_registered_by_gam_triton_ultralytics(tmp_path, monkeypatch):
    pytest.importorskip("ultralytics", reason="the yaml route needs ultralytics (the [ultralytics] extra)")
    pytest.importorskip("gam_triton.ultralytics", reason="gam_triton.ultralytics (issue 23's registration "
                        "module, written on another branch) is not present or cannot import here")
    monkeypatch.setenv("YOLO_OFFLINE", "1")
    (tmp_path / "gam.yaml").write_text(GAM_YAML.format(c=1024))  # the channel count comes from the input
    model = bench.load_model(str(tmp_path / "gam.yaml"))
    eager = gam_triton.revert(model)
    paths = bench.gam_paths(gam_triton.convert(copy.deepcopy(eager)))
    assert paths == ["model.4"]
    assert bench.capture_inputs(eager, paths, torch.randn(1, 3, 32, 32), None)["model.4"].shape == (1, 32, 8, 8)
