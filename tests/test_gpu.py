"""GPU-only checks: the kernels compiled for real at the shapes people run, in every dtype.

The rest of the suite also runs on the GPU when CUDA is present and TRITON_INTERPRET is not set (its
``device`` fixture is then "cuda"); this file adds what only a GPU can show: bf16 through the compiled
tl.dot, YOLO-sized channel counts, TF32 following PyTorch's flag, CUDA-graph capture, 64-bit offsets.
"""
import os

import pytest
import torch

from gam_cases import TOL, assert_close, make_ref
from gam_triton import GAM
from gam_triton.ops._runtime import INTERPRET
from gam_triton.ops import _autotune
from gam_triton.ops.channel_gate import channel_gate

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU to compile the kernels"),
    pytest.mark.skipif(INTERPRET, reason="TRITON_INTERPRET=1 runs kernels in the interpreter; unset it "
                                         "to compile them for the GPU"),
]


def _ref64(ref, x):
    with torch.no_grad():
        return ref.to(torch.float64)(x.to(torch.float64))


@pytest.mark.parametrize("form,c", [("yolo_grouped", 64), ("yolo_grouped", 192), ("yolo_plain", 576),
                                    ("paper", 320), ("seed", 24), ("paper", 1024)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16],
                         ids=["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_yolo_shapes_compiled(form, c, dtype, channels_last):
    ref = make_ref(form, c).cuda().eval()
    gam = GAM.from_module(ref).to(dtype=dtype).eval()
    x = torch.randn(2, c, 20, 24, device="cuda").to(dtype)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        got = gam(x)
    assert_close(got, _ref64(ref, x).cpu(), dtype, 2.0, f"{form} C={c} {dtype}")


def _gate_case(batch: int, size: int) -> tuple:
    """((x, w1, b1, w2, b2), float64 channel gate output): C256 at size x size, a 256 -> 64 -> 256 MLP, on the GPU."""
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(batch, 256, size, size, device="cuda", generator=g)
    w1 = torch.randn(64, 256, device="cuda", generator=g) / 16
    w2 = torch.randn(256, 64, device="cuda", generator=g) / 8
    b1, b2 = torch.zeros(64, device="cuda"), torch.zeros(256, device="cuda")
    xd = x.double().permute(0, 2, 3, 1)
    want = x.double() * torch.sigmoid((torch.relu(xd @ w1.double().t()) @ w2.double().t()).permute(0, 3, 1, 2))
    return (x, w1, b1, w2, b2), want


def test_fp32_dots_follow_allow_tf32():
    """ieee when torch.backends.cuda.matmul.allow_tf32 is False (tight), tf32 when True (looser)."""
    args, want = _gate_case(4, 40)
    old = torch.backends.cuda.matmul.allow_tf32
    try:
        torch.backends.cuda.matmul.allow_tf32 = False
        err_ieee = (channel_gate(*args, True).double() - want).abs().max().item()
        torch.backends.cuda.matmul.allow_tf32 = True
        err_tf32 = (channel_gate(*args, True).double() - want).abs().max().item()
    finally:
        torch.backends.cuda.matmul.allow_tf32 = old
    assert err_ieee < 1e-5 < err_tf32 < 5e-2


def test_fp32_tf32_train_step_over_128_hidden_channels(kernel_names):
    """fp32 at C/r = 144 (BLOCK_R 256) with TF32 allowed: the fused backward kernel runs from Triton 3.6 on
    (channel_gate.fused; PyTorch's GEMMs before), and a train step's gradients match float64 within TF32's error."""
    from gam_triton.ops import _runtime

    ref = make_ref("paper", 576).cuda().train()
    gam = GAM.from_module(ref).train()
    x = torch.randn(4, 576, 20, 24, device="cuda")
    old = torch.backends.cuda.matmul.allow_tf32
    try:
        torch.backends.cuda.matmul.allow_tf32 = True
        gam(x).square().mean().backward()
    finally:
        torch.backends.cuda.matmul.allow_tf32 = old
    ref.double()(x.double()).square().mean().backward()
    assert ("channel_gate_bwd_kernel" in kernel_names) == (_runtime.TRITON >= (3, 6)), kernel_names
    rtol, atol = TOL[torch.float16]  # TF32 in the channel gate's dots: about 1e-3 relative
    for (name, p), q in zip(gam.named_parameters(), ref.parameters()):
        n = max(q.grad.abs().max().item(), 1e-2)
        torch.testing.assert_close(p.grad.double() / n, q.grad / n, rtol=rtol, atol=atol, msg=name)


def test_fp32_fma_backward_is_tuned_against_pytorchs_gemms(monkeypatch, tmp_path):
    """fp32 at C/r = 128 in full precision: the backward's dots run on FMA, so the tuner times the kernel against
    PyTorch's GEMMs (channel_gate.GEMMS), each as the whole backward, on this GPU (the heuristic tile alone beside
    them: a short lease); whichever wins, the gradients match float64 and the counters are left zeroed."""
    from gam_triton.ops import channel_gate as cg

    monkeypatch.delenv("GAM_TRITON_AUTOTUNE", raising=False)  # the gpu-check's first step turns tuning off
    monkeypatch.setenv("GAM_TRITON_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(cg, "bwd_candidates", lambda *a, **k: [])
    _autotune.reset()
    g = torch.Generator().manual_seed(0)
    x, ga, gb = (torch.randn(4, 512, 20, 20, generator=g).cuda().contiguous(memory_format=torch.channels_last)
                 for _ in range(3))
    w1, b1, w2, b2 = (torch.randn(*s, generator=g).cuda() * 0.05 for s in ((128, 512), (128,), (512, 128), (512,)))
    counts = torch.zeros(cg.COUNTER_SLOTS, dtype=torch.int32, device="cuda")
    try:
        got = cg.backward(x, ga, gb, w1, b1, w2, b2, True, counts)
        tuned = [r for r in _autotune.drain_log() if r.op == "channel_gate_bwd"]
    finally:
        _autotune.reset()
    assert len(tuned) == 1 and tuned[0].source == "tuned" and tuned[0].candidates == 2, tuned
    assert tuned[0].key.endswith(",ieee") and not counts.any()
    want = cg.reference_grads(*(t.double() for t in (x, w1, b1, w2, b2)), True, (ga + gb).double())
    rtol, atol = TOL[torch.float32]
    for name, a, b in zip(("dx", "dw1", "db1", "dw2", "db2"), got, want):
        n = max(b.abs().max().item(), 1.0)
        torch.testing.assert_close(a.double() / n, b / n, rtol=rtol, atol=atol,
                                   msg=f"{name} ({_autotune.describe(tuned[0].choice)})")


def test_cuda_graph_capture_after_warmup():
    ref = make_ref("yolo_grouped", 128).cuda().eval()
    gam = GAM.from_module(ref).half().eval()
    static_x = torch.randn(8, 128, 40, 40, device="cuda", dtype=torch.half)
    with torch.no_grad():
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):
                gam(static_x)  # warm-up: compiles and tunes outside the capture
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static_out = gam(static_x)
        new_x = torch.randn_like(static_x)
        static_x.copy_(new_x)
        graph.replay()
        torch.cuda.synchronize()
        assert_close(static_out, gam(new_x), torch.float16)


def test_compiled_model_on_gpu_matches_eager():
    ref = make_ref("yolo_grouped", 64).cuda().eval()
    gam = GAM.from_module(ref).half().eval()
    x = torch.randn(4, 64, 40, 40, device="cuda", dtype=torch.half)
    compiled = torch.compile(gam, fullgraph=True)
    with torch.no_grad():
        assert_close(compiled(x), gam(x), torch.float16)


def test_train_step_bf16_autocast_matches_reference():
    ref = make_ref("yolo_grouped", 128).cuda().train()
    gam = GAM.from_module(ref).train()
    x = torch.randn(4, 128, 20, 20, device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out, want = gam(x), ref(x)
    assert out.dtype == want.dtype
    out.float().square().mean().backward()
    want.float().square().mean().backward()
    rtol, atol = TOL[torch.bfloat16]
    for (name, p), q in zip(gam.named_parameters(), ref.parameters()):
        n = max(q.grad.abs().max().item(), 1e-2)
        torch.testing.assert_close(p.grad / n, q.grad / n, rtol=4 * rtol, atol=4 * atol, msg=name)


def test_int64_offsets_beyond_2_pow_31_elements():
    """B*C*H*W > 2**31: offsets are 64-bit; the last image is still right."""
    free, _ = torch.cuda.mem_get_info()
    if free < 16 * 2**30:
        pytest.skip(f"needs 16 GiB free GPU memory, {free / 2**30:.1f} GiB free")
    b, c, h, w = 33, 64, 1024, 1040  # 2.25e9 elements, fp16
    x = torch.randn(b, c, h, w, device="cuda", dtype=torch.half)
    g = torch.Generator(device="cuda").manual_seed(0)
    w1 = (torch.randn(16, c, device="cuda", generator=g) / 8).half()
    w2 = (torch.randn(c, 16, device="cuda", generator=g) / 4).half()
    b1, b2 = torch.zeros(16, device="cuda").half(), torch.zeros(c, device="cuda").half()
    out = channel_gate(x, w1, b1, w2, b2, True)
    tail = x[-1:, :, -8:, :]
    xd = tail.double().permute(0, 2, 3, 1)
    a = torch.relu(xd @ w1.double().t()) @ w2.double().t()
    want = tail.double() * torch.sigmoid(a.permute(0, 3, 1, 2))
    assert_close(out[-1:, :, -8:, :], want.cpu(), torch.float16)


def test_fp32_dots_follow_the_new_precision_api():
    """``torch.backends.cuda.matmul.fp32_precision`` (torch >= 2.9) is read as well as ``allow_tf32``, and
    setting it does not break the launch (reading allow_tf32 raises once it is set)."""
    matmul = torch.backends.cuda.matmul
    if not hasattr(torch.backends, "fp32_precision"):
        pytest.skip(f"torch {torch.__version__} has no fp32_precision API (added in torch 2.9)")
    args, want = _gate_case(2, 20)
    old_legacy, old_new = matmul.allow_tf32, (torch.backends.fp32_precision, matmul.fp32_precision)
    try:
        matmul.fp32_precision = "ieee"
        err_ieee = (channel_gate(*args, True).double() - want).abs().max().item()
        matmul.fp32_precision = "tf32"
        err_tf32 = (channel_gate(*args, True).double() - want).abs().max().item()
    finally:
        matmul.allow_tf32 = old_legacy
        torch.backends.fp32_precision, matmul.fp32_precision = old_new
    assert err_ieee < 1e-5 < err_tf32 < 5e-2


def _check_on_device(dev: torch.device, monkeypatch) -> None:
    """GAM (eval with cuDNN and with the Triton convolutions, then a train step) on ``dev`` while cuda:0 is
    current: every kernel launches and tunes on ``dev``, the result is right, the current device is
    unchanged, the cache is named after ``dev``."""
    ref = make_ref("yolo_grouped", 64).to(dev).eval()
    gam = GAM.from_module(ref).eval()
    x = torch.randn(2, 64, 20, 24, device=dev)
    torch.cuda.set_device(0)
    _autotune.reset()
    for conv in ("cudnn", "triton", "auto"):
        monkeypatch.setenv("GAM_TRITON_CONV", conv)
        with torch.no_grad():
            got = gam(x)
        assert_close(got, _ref64(ref, x).cpu(), torch.float32, 2.0, f"GAM on {dev}, {conv} convolutions")
    gam.train()
    xg = x.clone().requires_grad_(True)
    out = gam(xg)  # train mode: channel gate, BN + ReLU, final gate (and their tuning) on dev
    out.square().mean().backward()
    torch.cuda.synchronize(dev)
    assert torch.cuda.current_device() == 0
    assert out.device == dev and xg.grad.device == dev and torch.isfinite(xg.grad).all()
    ops = {r.op for r in _autotune.drain_log()}
    assert ops >= {"channel_gate", "final_gate", "conv_bn_relu", "conv_gate", "spatial", "channel_gate_bwd"}, ops
    assert os.path.exists(_autotune.cache_file(torch.cuda.get_device_name(dev)))


def test_runs_on_the_tensors_device(monkeypatch):
    _check_on_device(torch.device("cuda", torch.cuda.device_count() - 1), monkeypatch)


def test_runs_on_cuda1_while_cuda0_is_current(monkeypatch):
    n = torch.cuda.device_count()
    if n < 2:
        pytest.skip(f"needs two CUDA devices to run a model on cuda:1 while cuda:0 is current; {n} found")
    _check_on_device(torch.device("cuda", 1), monkeypatch)
