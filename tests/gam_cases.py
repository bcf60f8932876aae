"""Shared test helpers: the GAM forms as test cases, random weights, float64 references, tolerances."""
from __future__ import annotations

import copy
import io
import warnings

import pytest
import torch
from torch import nn

from gam_triton.reference import PaperGAM, SeedGAM, YoloGAM

# name -> (factory(C), channel count constraint)
FORMS = {
    "yolo_grouped": lambda c: YoloGAM(c, c, group=True),
    "yolo_plain": lambda c: YoloGAM(c, c, group=False),
    "paper": lambda c: PaperGAM(c),
    "seed": lambda c: SeedGAM(c, c),
}

TOL = {  # (rtol, atol) against a float64 reference
    torch.float32: (1e-4, 1e-4),
    torch.float16: (2e-2, 2e-2),
    torch.bfloat16: (6e-2, 6e-2),
    torch.float64: (1e-9, 1e-9),
}


def channels_ok(form: str, c: int) -> bool:
    """Grouped convolutions need C and C/4 divisible by 4; the YOLO shuffle needs C % 4 == 0."""
    if form == "yolo_grouped":
        return c % 16 == 0
    if form.startswith("yolo"):
        return c % 4 == 0
    return True


def randomise(module: nn.Module, seed: int = 0) -> nn.Module:
    """Random weights (scaled to keep activations O(1)) and random BatchNorm affine and statistics."""
    gen = torch.Generator().manual_seed(seed)

    def rnd(t: torch.Tensor, scale: float, offset: float = 0.0) -> None:
        t.copy_(torch.randn(t.shape, generator=gen) * scale + offset)

    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, (nn.Linear, nn.Conv2d)):
                rnd(m.weight, 1.5 / m.weight[0].numel() ** 0.5)
                if m.bias is not None:
                    rnd(m.bias, 0.3)
            elif isinstance(m, nn.BatchNorm2d):
                rnd(m.weight, 0.3, 1.0)
                rnd(m.bias, 0.3)
                rnd(m.running_mean, 0.2)
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=gen) + 0.5)
    return module


def make_ref(form: str, c: int, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return randomise(FORMS[form](c), seed)


def make_input(b: int, c: int, h: int, w: int, dtype, device, channels_last: bool, seed: int = 1):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(b, c, h, w, generator=gen).to(device=device, dtype=dtype)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    return x


def f64(module: nn.Module) -> nn.Module:
    """A float64 CPU copy of a module (the reference every result is compared with)."""
    return copy.deepcopy(module).to(device="cpu", dtype=torch.float64)


def assert_close(got: torch.Tensor, want: torch.Tensor, dtype: torch.dtype, scale: float = 1.0,
                 what: str = "") -> None:
    rtol, atol = TOL[dtype]
    torch.testing.assert_close(got.detach().to("cpu", torch.float64), want.detach().to(torch.float64),
                               rtol=rtol * scale, atol=atol * scale, msg=lambda m: f"{what}: {m}")


def onnx_in_onnxruntime(model: nn.Module, x: torch.Tensor) -> tuple:
    """(the checked ONNX graph, onnxruntime's CPU output for ``x``) of ``model`` exported by the TorchScript
    exporter at opset 17; skips without onnx or onnxruntime (the test extras)."""
    onnx = pytest.importorskip("onnx", reason="onnx is in the test extras")
    ort = pytest.importorskip("onnxruntime", reason="onnxruntime is in the test extras")
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # the TorchScript exporter is deprecated
        torch.onnx.export(model, (x,), buf, dynamo=False, opset_version=17, input_names=["x"], output_names=["out"])
    proto = onnx.load_from_string(buf.getvalue())
    onnx.checker.check_model(proto)
    sess = ort.InferenceSession(buf.getvalue(), providers=["CPUExecutionProvider"])
    return proto, torch.from_numpy(sess.run(None, {"x": x.detach().cpu().numpy()})[0])
