"""Deployment and the training stack: TorchScript tracing, both ONNX exporters run in onnxruntime,
torch.export, revert, DDP with gloo, SyncBatchNorm, opcheck of every custom op, copies and pickling.

Every model test runs on two paths (the ``path`` fixture): "triton", the Triton kernels running eagerly
(on a GPU, or on the CPU under TRITON_INTERPRET=1 as in CI), and "torch", the PyTorch path (CPU tensors
with gam_triton's interpreter switch turned off). Eager calls come first, so the eval-constant cache is
filled before any trace or export. Outputs are compared with the float64 reference form.
"""
from __future__ import annotations

import copy
import io
import pickle
import socket
import time
import warnings

import pytest
import torch
from torch import nn

import ddp_cases
import gam_triton
from gam_cases import FORMS, TOL, assert_close, f64, make_input, randomise
from gam_triton import GAM, convert, revert
from gam_triton.ops import _runtime
from gam_triton.deploy import plain_graph
from gam_triton.reference import PaperGAM, PlainGAM, SeedGAM, YoloGAM

TRITON_RUNS = _runtime.HAS_TRITON and (_runtime.INTERPRET or torch.cuda.is_available())


@pytest.fixture(params=["triton", "torch"])
def path(request, monkeypatch, device) -> str:
    """The device the model runs on, with the path of the parameter in force."""
    if request.param == "triton":
        if not TRITON_RUNS:
            pytest.skip("the Triton path needs a GPU or TRITON_INTERPRET=1")
        dev = device
    else:
        monkeypatch.setattr(_runtime, "INTERPRET", False)
        dev = "cpu"
    assert _runtime.use_triton(torch.empty(1, device=dev)) == (request.param == "triton")
    return dev


def make_net(form: str = "yolo_grouped", c: int = 16, seed: int = 0) -> nn.Module:
    """Stem conv, a GAM of the given public form, head conv; random weights and statistics; eval."""
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Conv2d(3, c, 3, padding=1), FORMS[form](c), nn.Conv2d(c, 4, 1))
    return randomise(net, seed).eval()


def converted(ref: nn.Module, dev: str, dtype=torch.float32) -> nn.Module:
    model = convert(copy.deepcopy(ref)).to(device=dev, dtype=dtype)
    assert any(isinstance(m, GAM) for m in model.modules())
    return model


def _warm(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Two eager calls: the second one reads the eval-constant cache the first one filled."""
    with torch.no_grad():
        model(x)
        return model(x)


# -- TorchScript ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("form", ["yolo_grouped", "paper", "seed"])
def test_jit_trace_with_default_checks(form, path):
    ref = make_net(form)
    model = converted(ref, path)
    x = make_input(2, 3, 5, 6, torch.float32, path, False)
    _warm(model, x)
    with warnings.catch_warnings():
        warnings.simplefilter("error", torch.jit.TracerWarning)
        traced = torch.jit.trace(model, x)  # check_trace=True: traces twice and compares the graphs
    graph = str(traced.inlined_graph)
    assert "gam_triton::" not in graph and "PythonOp" not in graph and "batch_norm" not in graph
    assert graph.count("aten::_convolution") == 6  # stem, the MLP as two 1x1, two 7x7 with BN folded, head
    x2 = make_input(2, 3, 5, 6, torch.float32, path, False, seed=8)
    with torch.no_grad():
        got = traced(x2)
        assert_close(got, f64(ref)(x2.cpu().double()), torch.float32, what="traced vs reference")
        assert_close(got, model(x2), torch.float32, what="traced vs eager")


# -- ONNX ----------------------------------------------------------------------------------------------------
STANDARD_OPS = {"Conv", "Relu", "Sigmoid", "Mul", "Reshape", "Transpose", "Shape", "Gather", "Constant",
                "Unsqueeze", "Concat", "Cast", "Slice"}


def _check_onnx(proto, ref: nn.Module, dtype: torch.dtype, dev: str, eager: nn.Module) -> None:
    """Standard ops only, BN folded, one shuffle; onnxruntime on a batch of another size = reference."""
    ort = pytest.importorskip("onnxruntime", reason="onnxruntime is in the test extras")
    ops = [n.op_type for n in proto.graph.node]
    assert {n.domain for n in proto.graph.node} <= {"", "ai.onnx"}, ops
    assert set(ops) <= STANDARD_OPS, ops
    assert ops.count("Conv") == 6 and ops.count("Transpose") == 1 and ops.count("Sigmoid") == 1, ops
    sess = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    x = make_input(3, 3, 5, 6, dtype, "cpu", False, seed=9)  # batch 3: the exports saw batch 2
    got = torch.from_numpy(sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0])
    assert got.dtype == dtype and got.shape == (3, 4, 5, 6)
    scale = 1.0 if dtype == torch.float32 else 2.0  # fp16: stem and head convolutions round too
    assert_close(got, f64(ref)(x.double()), dtype, scale, "onnxruntime vs reference")
    with torch.no_grad():
        assert_close(got, eager(x.to(dev)), dtype, scale, "onnxruntime vs eager")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_onnx_torchscript_exporter(dtype, path):
    onnx = pytest.importorskip("onnx", reason="onnx is in the test extras")
    ref = make_net()
    model = converted(ref, path, dtype)
    x = make_input(2, 3, 5, 6, dtype, path, False)
    _warm(model, x)
    buf = io.BytesIO()
    axes = {0: "batch", 2: "height", 3: "width"}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # the TorchScript exporter is deprecated
        torch.onnx.export(model, (x,), buf, dynamo=False, opset_version=17, input_names=["images"],
                          output_names=["out"], dynamic_axes={"images": axes, "out": axes})
    proto = onnx.load_from_string(buf.getvalue())
    onnx.checker.check_model(proto)
    assert proto.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"
    _check_onnx(proto, ref, dtype, path, model)


@pytest.mark.parametrize("path,dtype", [("triton", torch.float32), ("triton", torch.float16),
                                        ("torch", torch.float32)], ids=["triton-fp32", "triton-fp16", "torch-fp32"],
                         indirect=["path"])
def test_onnx_dynamo_exporter(dtype, path, monkeypatch):
    """fp32 and fp16 on the Triton path, fp32 on the torch path (each export takes seconds). Triton fp32:
    with the exporter detected as torch 2.6 / 2.7 must do it (their flag hidden): from the call stack."""
    pytest.importorskip("onnxscript", reason="onnxscript is in the test extras")
    ref = make_net()
    model = converted(ref, path, dtype)
    x = make_input(2, 3, 5, 6, dtype, path, False)
    _warm(model, x)
    if _runtime.use_triton(x) and dtype == torch.float32:  # simulate torch 2.6 / 2.7
        monkeypatch.setattr(gam_triton.deploy, "_FLAG_COVERS_DYNAMO_ONNX", False)
        monkeypatch.setattr(torch.onnx, "is_in_onnx_export", lambda: False)
    batch = torch.export.Dim("batch", min=1, max=64)
    program = torch.onnx.export(model, (x,), dynamo=True, dynamic_shapes=({0: batch},), verbose=False)
    proto = program.model_proto
    assert proto.graph.input[0].type.tensor_type.shape.dim[0].dim_param != ""
    _check_onnx(proto, ref, dtype, path, model)


# -- torch.export --------------------------------------------------------------------------------------------
def test_torch_export_keeps_triton_ops_where_they_run(path):
    ref = make_net()
    model = converted(ref, path)
    x = make_input(2, 3, 5, 6, torch.float32, path, False)
    _warm(model, x)
    triton = _runtime.use_triton(x)
    ep = torch.export.export(model, (x,))
    targets = {str(n.target) for n in ep.graph.nodes if n.op == "call_function"}
    ours = {t for t in targets if "gam_triton" in t}
    assert bool(ours) == triton, targets
    if triton:
        assert any("channel_gate" in t for t in ours) and any("final_gate" in t for t in ours), ours
    x2 = make_input(2, 3, 5, 6, torch.float32, path, False, seed=3)
    with torch.no_grad():
        want = f64(ref)(x2.cpu().double())
        assert_close(ep.module()(x2), want, torch.float32, what="exported module vs reference")
    with plain_graph():  # asked for explicitly: standard ops even where the kernels run
        ep_plain = torch.export.export(model, (x,))
    assert not any("gam_triton" in str(n.target) for n in ep_plain.graph.nodes)
    with torch.no_grad():
        assert_close(ep_plain.module()(x2), want, torch.float32, what="plain exported module vs reference")


# -- revert --------------------------------------------------------------------------------------------------
REVERTED = {"yolo_grouped": YoloGAM, "yolo_plain": YoloGAM, "paper": PaperGAM, "seed": SeedGAM}


@pytest.mark.parametrize("form", list(FORMS))
def test_revert_gives_the_original_form(form, path):
    ref = make_net(form).to(path)
    model = converted(ref, path)
    gam = model[1]
    gam.f, gam.i = -1, 1  # what a YOLO parser puts on its layers
    calls = []
    gam.register_forward_hook(lambda m, inp, out: calls.append(type(m).__name__))
    params = [p for p in gam.parameters()]
    x = make_input(2, 3, 5, 6, torch.float32, path, False)
    with torch.no_grad():
        model(x)
    assert revert(model) is model
    back = model[1]
    assert type(back) is REVERTED[form] and not any(isinstance(m, GAM) for m in model.modules())
    assert all(p is q for p, q in zip(back.parameters(), params)), "revert shares the layers"
    assert back.f == -1 and back.i == 1 and back.training is False
    assert list(back.state_dict()) == list(ref[1].state_dict())
    with torch.no_grad():
        got = model(x)
    assert calls[-1] == REVERTED[form].__name__, "forward hooks are carried over"
    assert_close(got, f64(ref)(x.cpu().double()), torch.float32, what="reverted vs reference")
    again = convert(model)  # and forth again
    assert isinstance(again[1], GAM)
    with torch.no_grad():
        assert_close(again(x), got, torch.float32, what="converted again")


def test_revert_mirrors_convert_in_detector_code(path):
    """A YOLO-yaml-style model (layers routed by ``m.f``): convert, then revert; the original class comes
    back with the parser's attributes, the user's hooks (their handles still work) and the same outputs;
    nothing of GAM's own (configuration, eval cache, seed-name renamer) is left on it."""
    from test_convert_attributes import YamlModel

    torch.manual_seed(0)
    model = randomise(YamlModel(), 4).to(path).eval()
    want = f64(model)
    fired = []
    handle = model.model[1].register_forward_hook(lambda m, a, o: fired.append(type(m).__name__))
    x = make_input(2, 3, 6, 5, torch.float32, path, False)
    with torch.no_grad():
        convert(model)(x)
        back = revert(model).model[1]
        got = model(x)
    assert type(back) is YoloGAM and (back.f, back.i, back.type) == (-1, 1, "gam_triton.reference.YoloGAM")
    assert fired == ["GAM", "YoloGAM"]
    handle.remove()
    with torch.no_grad():
        model(x)
    assert fired == ["GAM", "YoloGAM"], "the user's handle removes the hook from the reverted block"
    assert not {"in_channels", "rate", "_eval_cache"} & set(vars(back))
    assert not back._load_state_dict_pre_hooks
    assert_close(got, want(x.cpu().double()), torch.float32, what="reverted model vs original")


@pytest.mark.parametrize("kwargs", [dict(kernel_size=5, shuffle_groups=2), dict(group=True, rate=2)],
                         ids=["k5_shuffle2", "grouped_sigmoid"])
def test_revert_of_a_configuration_no_form_has(kwargs, path):
    gam = randomise(GAM(16, **kwargs)).to(path).eval()
    x = make_input(2, 16, 5, 6, torch.float32, path, False)
    want = _warm(gam, x)
    plain = gam.to_reference()
    assert type(plain) is PlainGAM and revert(gam).__class__ is PlainGAM
    assert list(plain.state_dict()) == list(gam.state_dict())
    with torch.no_grad():
        assert_close(plain(x), want, torch.float32, what="PlainGAM vs GAM")
        assert_close(plain(x), f64(plain)(x.cpu().double()), torch.float32, what="fp32 vs fp64")


def test_revert_rejects_non_modules():
    with pytest.raises(TypeError, match="nn.Module"):
        revert("model")


# -- copies, pickling, state dicts, dtype and device moves ---------------------------------------------------
def test_copies_pickles_and_moves(path):
    ref = make_net("paper")
    model = converted(ref, path)
    x = make_input(2, 3, 5, 6, torch.float32, path, False)
    want64 = f64(ref)(x.cpu().double())
    assert_close(_warm(model, x), want64, torch.float32, what="eager")
    buf = io.BytesIO()
    torch.save(model, buf)
    copies = {
        "deepcopy": copy.deepcopy(model),
        "pickle": pickle.loads(pickle.dumps(model)),
        "torch.save": torch.load(io.BytesIO(buf.getvalue()), weights_only=False),
    }
    for name, other in copies.items():
        assert isinstance(other[1], GAM) and other[1]._eval_cache == {}, name
        with torch.no_grad():
            assert_close(other(x), want64, torch.float32, what=name)
            other[1].spatial_attention[1].running_mean.add_(1.0)  # copies are independent of the original
            assert_close(model(x), want64, torch.float32, what=f"original after changing its {name}")
    fresh = converted(make_net("paper", seed=7), path)
    fresh.load_state_dict(model.state_dict(), strict=True)
    plain = make_net("paper", seed=7)
    plain.load_state_dict(model.state_dict(), strict=True)
    with torch.no_grad():
        assert_close(fresh(x), want64, torch.float32, what="state_dict into a converted model")
        assert_close(plain(x.cpu()), want64, torch.float32, what="state_dict into the reference")
    for dtype in (torch.float64, torch.float32):  # there and back: the cache follows the dtype
        model.to(dtype)
        assert_close(_warm(model, x.to(dtype)), want64, dtype, what=f"to({dtype})")
    model.half()
    assert_close(_warm(model, x.half()), want64, torch.float16, 2.0, "half()")
    meta = copy.deepcopy(model).to("meta")
    assert meta(x.half().to("meta")).shape == (2, 4, 5, 6)


# -- SyncBatchNorm -------------------------------------------------------------------------------------------
def test_sync_batchnorm_conversion_works(path):
    """Outside a process group SyncBatchNorm normalises like BatchNorm; the converted model keeps up
    (train: outputs, gradients, running statistics; eval: outputs), through the SyncBatchNorm modules."""
    ref = make_net("yolo_grouped").train()
    model = nn.SyncBatchNorm.convert_sync_batchnorm(converted(ref, path)).train()
    want_mod = nn.SyncBatchNorm.convert_sync_batchnorm(f64(ref)).train()
    assert isinstance(model[1], GAM) and type(model[1].spatial_attention[1]) is nn.SyncBatchNorm
    x = make_input(2, 3, 5, 6, torch.float32, path, False)
    xr = x.detach().cpu().double().requires_grad_(True)
    x = x.detach().requires_grad_(True)
    model(x).square().sum().backward()
    want_mod(xr).square().sum().backward()
    assert_close(x.grad, xr.grad, torch.float32, 5, "grad x")
    for (name, p), q in zip(model.named_parameters(), want_mod.parameters()):
        n = max(q.grad.abs().max().item(), 1.0)
        assert_close(p.grad / n, q.grad / n, torch.float32, 5, f"grad {name}")
    for (name, b), c in zip(model.named_buffers(), want_mod.buffers()):
        assert_close(b.float(), c, torch.float32, what=name)
    model.eval()
    want_mod.eval()
    x2 = make_input(1, 3, 4, 7, torch.float32, path, False, seed=2)
    assert_close(_warm(model, x2), want_mod(x2.cpu().double()), torch.float32, what="eval")


# -- DistributedDataParallel ---------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _spawn_ddp(out_dir: str, timeout_s: float = 240.0) -> None:
    import torch.multiprocessing as mp

    ctx = mp.start_processes(ddp_cases.worker, args=(_free_port(), out_dir), nprocs=ddp_cases.WORLD,
                             join=False, start_method="spawn")
    deadline = time.monotonic() + timeout_s
    try:
        while not ctx.join(timeout=1.0):
            if time.monotonic() > deadline:
                raise TimeoutError(f"DDP workers still running after {timeout_s} s")
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.terminate()


def _assert_states(got: dict, want: dict, dtype: torch.dtype, what: str, params_only: bool = False) -> None:
    for k, v in want.items():
        if params_only and ("running" in k or "num_batches" in k):
            continue
        if v.is_floating_point():
            rtol, atol = TOL[dtype]
            torch.testing.assert_close(got[k].double(), v.double(), rtol=10 * rtol, atol=10 * atol,
                                       msg=lambda m, k=k: f"{what} {k}: {m}")
        else:
            assert torch.equal(got[k], v), f"{what} {k}"


@pytest.mark.slow
def test_ddp_two_processes_match_the_reference(tmp_path):
    """Two gloo processes: the converted model in DDP ends where the reference in DDP ends (parameters
    and per-process BatchNorm statistics), and, when both processes see the same shard, where one
    process training on the whole batch ends. SyncBatchNorm: ours fails or runs exactly as the
    reference does (on CPU tensors torch refuses SyncBatchNorm in a process group)."""
    _spawn_ddp(str(tmp_path))
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(ddp_cases.WORLD)]
    for dtype in ddp_cases.DTYPES:
        dt = str(dtype)
        for scenario in ddp_cases.SCENARIOS:
            states = [r["states"] for r in ranks]
            for r, st in enumerate(states):
                _assert_states(st[("ours", scenario, dt)], st[("ref", scenario, dt)], dtype,
                               f"rank {r} {scenario} {dt}: ours vs reference")
            _assert_states(states[1][("ours", scenario, dt)], states[0][("ours", scenario, dt)], dtype,
                           f"{scenario} {dt}: rank 1 vs rank 0", params_only=True)
        single = ddp_cases.train(converted(ddp_cases.make_net(dtype), "cpu", dtype).train(), "same", dtype, None)
        _assert_states(single.state_dict(), ranks[0]["states"][("ours", "same", dt)], dtype,
                       f"{dt}: one process on the whole batch vs DDP", params_only=True)
        ours, want = (ranks[0]["sync_bn"][(name, dt)] for name in ("ours", "ref"))
        assert ours == want, f"SyncBatchNorm in DDP: ours {ours!r}, reference {want!r}"


# -- opcheck -------------------------------------------------------------------------------------------------
def _t(*shape, seed=0, cl=False, grad=True):
    g = torch.Generator().manual_seed(seed)
    t = torch.randn(*shape, generator=g)
    if cl:
        t = t.contiguous(memory_format=torch.channels_last)
    return t.requires_grad_(grad)


def _vec(n, seed, offset=0.0):
    return (torch.randn(n, generator=torch.Generator().manual_seed(seed)) * 0.3 + offset).requires_grad_(True)


# One entry per custom op (name -> sample argument tuples); a new op fails test_every_op_has_samples
# until it gets samples here.
# Each sample mixes layouts (every opcheck test runs the op several times: one sample per op keeps it short).
OP_SAMPLES = {
    "channel_gate": lambda: [
        (_t(2, 20, 3, 5, cl=True), _t(5, 20, seed=1), _vec(5, 2), _t(20, 5, seed=3), _vec(20, 4), True, False),
    ],
    "final_gate": lambda: [
        (_t(2, 8, 3, 5, cl=True), _t(2, 8, 3, 5, seed=1), _vec(8, 2, 1.0), _vec(8, 3), 4, True),
    ],
    "bn_relu": lambda: [
        (_t(2, 6, 3, 5, cl=True), _vec(6, 1, 1.0), _vec(6, 2)),
    ],
    # eval-only ops (their autograd formula raises): samples without requires_grad
    "conv_bn_relu": lambda: [
        (_t(2, 8, 3, 5, cl=True, grad=False), _packed(2, 4, 3, seed=1), _vec(2, 2).detach()),
    ],
    "conv_gate": lambda: [
        (_t(2, 2, 3, 5, cl=True, grad=False), _packed(8, 1, 3, seed=1), _vec(8, 2).detach(),
         _vec(8, 3, 1.0).detach(), _vec(8, 4).detach(), _t(2, 8, 3, 5, seed=5, grad=False), 4, True),
    ],
    "train_block_fwd": lambda: [_train_block_args()["train_block_fwd"]],
    "train_block_bwd": lambda: [_train_block_args()["train_block_bwd"]],
}


def _packed(cout, cin_g, k, seed):
    """A convolution weight [cout, cin_g, k, k] in the Triton convolutions' packed layout."""
    from gam_triton.ops.conv import pack_weight

    return pack_weight(_t(cout, cin_g, k, k, seed=seed, grad=False) * 0.3)


def _train_block_args() -> dict:
    """The arguments the train-mode block passes to its two ops in one real step (YOLO form, channels_last).

    The ops run inside an autograd.Function (no autograd formula of their own), so the samples are detached.
    """
    from gam_triton.ops import train_block

    seen = {}

    def recording(name, op):
        def call(*args):
            seen[name] = tuple(a.detach().clone() if isinstance(a, torch.Tensor) else a for a in args)
            return op(*args)
        return call

    gam = randomise(GAM(16, group=True, channel_sigmoid=False, shuffle_groups=4), 3).train()
    ops = (train_block._fwd_op, train_block._bwd_op)
    train_block._fwd_op = recording("train_block_fwd", ops[0])
    train_block._bwd_op = recording("train_block_bwd", ops[1])
    try:
        x = _t(2, 16, 3, 5, cl=True)
        gam(x).sum().backward()
    finally:
        train_block._fwd_op, train_block._bwd_op = ops
    assert set(seen) == {"train_block_fwd", "train_block_bwd"}, "the train step did not reach both ops"
    return seen


def _registered_ops() -> set:
    return {n.split("::", 1)[1] for n in torch._C._dispatch_get_all_op_names() if n.startswith("gam_triton::")}


@pytest.mark.skipif(not _runtime.HAS_TRITON, reason="without triton no custom op is registered")
def test_every_op_has_samples():
    assert _registered_ops() == set(OP_SAMPLES), "add samples to OP_SAMPLES for every gam_triton op"


@pytest.mark.skipif(not TRITON_RUNS, reason="the ops run their Triton kernels: a GPU or TRITON_INTERPRET=1 is needed")
@pytest.mark.parametrize("name", sorted(OP_SAMPLES))
def test_opcheck(name, device):
    op = getattr(torch.ops.gam_triton, name).default
    for args in OP_SAMPLES[name]():
        args = tuple(a.detach().to(device).requires_grad_(a.requires_grad) if isinstance(a, torch.Tensor) else a
                     for a in args)
        torch.library.opcheck(op, args)


def test_plain_forward_only_when_asked():
    """Eager calls do not take the deployment path; plain_graph() forces it and nests."""
    assert not gam_triton.deploy.deploying()
    with plain_graph():
        with plain_graph():
            assert gam_triton.deploy.deploying()
        assert gam_triton.deploy.deploying()
    assert not gam_triton.deploy.deploying()
