"""The tuner (gam_triton/ops/_autotune.py) and its cache file: the policy, the file's survival of corruption,
concurrent writers and unwritable directories, choices and keys, rejections and failures while tuning, the
capture and tracing guards, per-device naming, the real ops under the interpreter, the pre-tuning CLI.

Every test gets its own GAM_TRITON_CACHE_DIR and a fresh tuner (``_autotune.reset()``). The fake op and its
writers in other processes are in ``autotune_cases.py``. A test that needs timing pretends to be on a GPU
(``gpu_mode``: ``_runtime.has_cuda`` true) and times with a fake: the fake op's ``Bench``, or for the
real ops a counting ``_autotune.do_bench`` (``fake_timer``), with which ``_autotune.timed`` still launches
every candidate once (through the interpreter on the CPU).
"""
import json
import multiprocessing
import os
import shutil
import stat
import subprocess
import sys
import types
import warnings

import pytest
import torch
import triton

import autotune_cases
from autotune_cases import CANDS, TIMES, H, Bench, bp, cfg, sel
from gam_triton.ops import _autotune, _runtime, channel_gate, conv, elementwise
from gam_triton.ops._runtime import INTERPRET, next_pow2

KERNELS_RUN = INTERPRET or torch.cuda.is_available()  # the Triton path runs (else ops take the torch path)
needs_kernels = pytest.mark.skipif(not KERNELS_RUN, reason="needs TRITON_INTERPRET=1 or a CUDA device")


@pytest.fixture(autouse=True)
def cache_dir(tmp_path, monkeypatch):
    d = tmp_path / "cache"
    monkeypatch.setenv("GAM_TRITON_CACHE_DIR", str(d))
    monkeypatch.delenv("GAM_TRITON_AUTOTUNE", raising=False)
    _autotune.reset()
    yield d
    _autotune.reset()


DEVICE_NAME = _runtime.device_name  # the real one, for the tests of device naming


def pretend_gpu(monkeypatch, on: bool = True) -> None:
    """Kernels can be timed here (``_runtime.has_cuda``), on a GPU named like the CPU (same cache file)."""
    monkeypatch.setattr(_runtime, "has_cuda", lambda: on)
    monkeypatch.setattr(_runtime, "device_name", lambda index=None: _runtime.CPU_DEVICE)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a, **k: None)


@pytest.fixture
def gpu_mode(monkeypatch):
    pretend_gpu(monkeypatch)


@pytest.fixture
def cpu_mode(monkeypatch):
    pretend_gpu(monkeypatch, False)


@pytest.fixture
def fake_timer(monkeypatch):
    """``do_bench`` counting its calls, each later one faster (by more than the 2 % tie): a candidate wins."""
    calls = []

    def fake(fn, **kw):
        calls.append(1)
        return 10.0 / (1 + len(calls))

    monkeypatch.setattr(_autotune, "do_bench", fake)
    return calls


@pytest.fixture
def tf32():
    """``tf32("matmul" | "cudnn", on)`` flips PyTorch's legacy TF32 switch; every setting is restored after."""
    m, cudnn = torch.backends.cuda.matmul, torch.backends.cudnn
    new = [(m, "fp32_precision"), (cudnn.conv, "fp32_precision"), (cudnn.rnn, "fp32_precision")] \
        if hasattr(torch.backends, "fp32_precision") else []
    legacy, saved = (m.allow_tf32, cudnn.allow_tf32), [getattr(o, n) for o, n in new]
    yield lambda which, on: setattr(m if which == "matmul" else cudnn, "allow_tf32", on)
    m.allow_tf32, cudnn.allow_tf32 = legacy
    for (o, n), v in zip(new, saved):
        setattr(o, n, v)
    assert (m.allow_tf32, cudnn.allow_tf32) == legacy


def cache_json() -> dict:
    with open(_autotune.cache_file()) as f:
        return json.load(f)


def write_cache(text) -> str:
    path = _autotune.cache_file()
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb" if isinstance(text, bytes) else "w") as f:
        f.write(text)
    return path


def of_kind(record, kind) -> list:
    return [w for w in record if issubclass(w.category, kind)]


def entry(block_p, **meta) -> dict:
    return dict(_autotune.encode(cfg(block_p)), **{"source": "tuned", **meta})


# -- the policy -------------------------------------------------------------------------------------------
def test_a_key_is_tuned_once_then_served_from_memory(gpu_mode):
    b = Bench()
    assert bp(sel(bench=b)) == 32 and b.calls == [64, 16, 32, 128]  # the heuristic is timed first
    assert bp(sel(bench=b)) == 32 and len(b.calls) == 4
    e = cache_json()["entries"]["fake_op"]["1,2,k"]
    assert e["config"] == {"BLOCK_P": 32, "num_warps": 4, "num_stages": 2}
    assert e["source"] == "tuned" and e["ms"] == 1.0 and e["heuristic_ms"] == 2.0 and e["candidates"] == 4
    rec, = _autotune.drain_log()
    assert rec.source == "tuned" and rec.speedup == 2.0 and rec.key == "1,2,k"


def test_the_hot_path_touches_neither_the_disk_nor_the_heuristic(gpu_mode, monkeypatch, cache_dir):
    first = sel()
    _autotune.drain_log()
    shutil.rmtree(cache_dir)

    def boom(*a, **k):
        raise AssertionError("touched on the hot path")

    for name in ("read", "store"):
        monkeypatch.setattr(_autotune._Cache, name, boom)
    monkeypatch.setattr(_runtime, "capturing", boom)
    assert _autotune.select("fake_op", (1, 2, "k"), boom, boom, boom) is first
    assert not cache_dir.exists() and _autotune.drain_log() == []


def test_failing_candidates_are_skipped(gpu_mode):
    from triton.runtime.errors import OutOfResources

    b = Bench(fail={32: OutOfResources(232448, 101376, "shared memory")})
    assert bp(sel(bench=b)) == 64 and len(b.calls) == 4  # 64 (2 ms) beats 16 and 128; 32 did not compile
    assert cache_json()["entries"]["fake_op"]["1,2,k"]["source"] == "tuned"
    assert _autotune.drain_log()[0].failed == 1


def test_when_every_choice_fails_the_heuristic_is_used_and_nothing_is_stored(gpu_mode):
    from triton.runtime.errors import OutOfResources

    b = Bench(times={64: float("nan"), 128: 0.0}, fail={p: OutOfResources(1, 0, "smem") for p in (16, 32)})
    assert bp(sel(bench=b)) == 64 and len(b.calls) == 4
    assert not os.path.exists(_autotune.cache_file())
    rec, = _autotune.drain_log()
    assert rec.source == "failed" and rec.failed == 4
    assert bp(sel(bench=b)) == 64 and len(b.calls) == 4  # remembered for this process


def test_ties_within_two_percent_go_to_the_heuristic(gpu_mode):
    assert bp(sel(bench=Bench(times={16: 3.0, 32: 1.97, 64: 2.0, 128: 4.0}))) == 64  # 1.5 % faster: a tie
    assert bp(sel((2,), bench=Bench(times={16: 3.0, 32: 1.9, 64: 2.0, 128: 4.0}))) == 32  # 5 %: a win


def test_without_a_gpu_the_heuristic_is_stored_untimed_and_on_a_gpu_it_is_tuned_again(cpu_mode, monkeypatch):
    b = Bench()
    assert bp(sel(bench=b)) == 64 and b.calls == []
    e = cache_json()["entries"]["fake_op"]["1,2,k"]
    assert e["source"] == "heuristic" and bp(_autotune.decode(e)) == 64 and "ms" not in e
    _autotune.reset()
    assert bp(sel(bench=b)) == 64 and [r.source for r in _autotune.drain_log()] == ["cache"] and b.calls == []
    pretend_gpu(monkeypatch)
    _autotune.reset()
    assert bp(sel(bench=b)) == 32 and len(b.calls) == 4  # an untimed entry is a miss where kernels are timed
    assert cache_json()["entries"]["fake_op"]["1,2,k"]["source"] == "tuned"


def test_stale_entries_are_tuned_again(gpu_mode, monkeypatch):
    sel()  # 32 stored; the candidates change, 32 is no longer one of them
    _autotune.reset()
    b = Bench()
    assert bp(sel(bench=b, cands=[cfg(16), cfg(128)])) == 64 and b.calls == [64, 16, 128]
    assert bp(_autotune.decode(cache_json()["entries"]["fake_op"]["1,2,k"])) == 64
    write_cache(json.dumps({"format": 2, "entries": {"fake_op": {"3": entry(48, source="heuristic")}}}))
    pretend_gpu(monkeypatch, False)
    _autotune.reset()  # an untimed entry of another heuristic is replaced by the current one
    assert bp(sel((3,))) == 64 and bp(_autotune.decode(cache_json()["entries"]["fake_op"]["3"])) == 64


@pytest.mark.parametrize("value", ["0", "off", "False"])
def test_the_off_switch_uses_the_heuristic_and_neither_reads_nor_writes_the_cache(gpu_mode, monkeypatch, value):
    sel()  # 32 is on disk
    with open(_autotune.cache_file()) as f:
        before = f.read()
    monkeypatch.setenv("GAM_TRITON_AUTOTUNE", value)
    _autotune.reset()

    def boom(*a, **k):
        raise AssertionError("the cache was used")

    monkeypatch.setattr(_autotune._Cache, "read", boom)
    monkeypatch.setattr(_autotune._Cache, "store", boom)
    b = Bench()
    assert not _autotune.enabled()
    assert bp(sel(bench=b)) == 64 and bp(sel((3, 3), bench=b)) == 64 and b.calls == []
    with open(_autotune.cache_file()) as f:
        assert f.read() == before
    assert _autotune.drain_log() == []


# -- the file ---------------------------------------------------------------------------------------------
def test_another_process_reads_what_this_one_tuned_and_this_one_rereads_on_a_miss(gpu_mode):
    b = Bench()
    assert bp(sel((1, "a"), bench=b)) == 32 and len(b.calls) == 4
    p = subprocess.run([sys.executable, autotune_cases.__file__, '[[1, "a"], [2, "b"]]'], capture_output=True,
                       text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    assert json.loads(p.stdout.splitlines()[-1]) == {"calls": 4, "chosen": [32, 32]}  # (1, a) read, (2, b) tuned
    assert bp(sel((2, "b"), bench=b)) == 32 and len(b.calls) == 4  # a miss re-reads the file: no tuning
    assert [r.source for r in _autotune.drain_log()] == ["tuned", "cache"]


def test_concurrent_writers_keep_every_entry(tmp_path, cache_dir):
    (tmp_path / "barrier").mkdir()
    n, per, ctx = 3, 20, multiprocessing.get_context("fork")  # forked: no second import of torch
    procs = [ctx.Process(target=autotune_cases.write, args=([[w, i] for i in range(per)], str(tmp_path / "barrier"),
                                                            n, str(tmp_path / f"out{w}"))) for w in range(n)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    assert all(json.loads((tmp_path / f"out{w}").read_text())["calls"] == 4 * per for w in range(n))
    with open(_autotune.cache_file("Writer GPU")) as f:
        assert len(json.load(f)["entries"]["fake_op"]) == n * per
    assert not [f for f in os.listdir(cache_dir) if f.endswith(".tmp")]


OLD_LAYOUT = {"BLOCK_P": 128, "BLOCK_C": 32, "BLOCK_R": 16, "num_warps": 4, "num_stages": 2, "source": "tuned"}


@pytest.mark.parametrize("text", [
    "{not json", "", b"\x00\xff\xfe not utf-8", "[1, 2, 3]", '{"format": 99, "entries": {}}',
    '{"format": 2, "entries": []}', json.dumps({"format": 1, "entries": {"fake_op": {"1,2,k": OLD_LAYOUT}}}),
    "oversized"], ids=["not-json", "empty", "not-utf8", "a-list", "format-99", "entries-a-list",
                       "format-1-the-old-layout", "oversized"])
def test_a_corrupt_old_or_oversized_file_warns_once_and_is_rewritten(gpu_mode, monkeypatch, text):
    if text == "oversized":  # a valid file whose entry would be a hit (128), but too big to be read
        monkeypatch.setattr(_autotune, "MAX_FILE_BYTES", 1000)
        text = json.dumps({"format": 2, "entries": {"fake_op": {"1,2,k": entry(128)}}}) + " " * 1000
    write_cache(text)
    b = Bench()
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        assert bp(sel(bench=b)) == 32 and len(b.calls) == 4
        sel((9, 9), bench=b)
    assert len(of_kind(rec, _autotune.CacheWarning)) == 1
    data = cache_json()
    assert data["format"] == _autotune.FORMAT == 2 and set(data["entries"]["fake_op"]) == {"1,2,k", "9,9"}


def test_bad_entries_are_dropped_and_good_ones_kept(gpu_mode):
    good = entry(128, ms=0.5)
    c = good["config"]
    bad = [
        dict(good, __reduce__="os.system"), dict(good, path="cudnn"), {"config": c, "extra": 1},
        dict(good, config=dict(c, BLOCK_P="128")), dict(good, config=dict(c, BLOCK_P=True)),
        dict(good, config=dict(c, BLOCK_P=128.0)), dict(good, config=dict(c, BLOCK_P=-1)),
        dict(good, config=dict(c, BLOCK_P=1 << 20)), dict(good, config={"BLOCK_P": 128, "num_warps": 4}),
        dict(good, config=dict(c, **{"BLOCK P": 1})), dict(good, config=[128, 4, 2]),
        dict(good, ms=-1.0), dict(good, ms=float("nan")), dict(good, ms="fast"), dict(good, source="pickle"),
        dict(good, candidates=1.5), {"path": "rm -rf /"}, {"path": 3}, "BLOCK_P=128", None, [],
    ]
    table = {"1,2,k": good, "x" * 600: good, **{f"bad{i}": e for i, e in enumerate(bad)}}
    write_cache(json.dumps({"format": 2, "entries": {
        "fake_op": table, "path_op": {"3,3": {"path": "triton", "source": "tuned"}},
        "bad op!": {"1,2,k": good}, "../../etc": {"1,2,k": good}, "list_op": [good]}}))
    b = Bench()
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        assert bp(sel(bench=b)) == 128 and b.calls == []  # the valid entry, matched to a candidate
        assert _autotune.select("path_op", (3, 3), lambda: "cudnn", lambda: ["triton"], b) == "triton"
        sel((5, 5), bench=b)  # a store rewrites the file without the bad entries
    assert len(of_kind(rec, _autotune.CacheWarning)) == 1
    entries = cache_json()["entries"]
    assert set(entries) == {"fake_op", "path_op"} and set(entries["fake_op"]) == {"1,2,k", "5,5"}


def test_nothing_in_the_file_is_executed(gpu_mode, tmp_path):
    mark = tmp_path / "PWNED"
    hostile = f"__import__('os').system('touch {mark}')"
    write_cache('{"format": 2, "entries": ' + hostile + "}")  # not JSON: would run under eval
    with pytest.warns(_autotune.CacheWarning):
        assert bp(sel()) == 32
    for e in ({"path": hostile}, {"config": {"BLOCK_P": hostile, "num_warps": 4, "num_stages": 2}},
              {"config": {hostile: 1, "num_warps": 4, "num_stages": 2}}, {"py/object": "os.system"},
              {"config": {"BLOCK_P": {"py/reduce": "os.system"}, "num_warps": 4, "num_stages": 2}},
              {"path": "!!python/object/apply:os.system"}, hostile, None, []):
        assert _autotune.decode(e) is None
    assert not mark.exists()


def _deny(*a, **k):
    raise PermissionError(13, "Permission denied")


@pytest.mark.parametrize("block", ["dir-under-a-file", "rename-denied"])
def test_an_unusable_cache_directory_means_tuning_in_memory_with_one_warning(gpu_mode, monkeypatch, tmp_path,
                                                                            cache_dir, block):
    if block == "rename-denied":
        monkeypatch.setattr(_autotune.os, "replace", _deny)
    else:  # mkdir fails (NotADirectoryError): how a directory is unwritable for root too
        (tmp_path / "a_file").write_text("not a directory")
        monkeypatch.setenv("GAM_TRITON_CACHE_DIR", str(tmp_path / "a_file" / "cache"))
        _autotune.reset()
    b = Bench()
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        assert bp(sel(bench=b)) == 32 and bp(sel(bench=b)) == 32 and bp(sel((7, 7), bench=b)) == 32
    assert len(b.calls) == 8  # two keys tuned once each, kept in memory
    assert len(of_kind(rec, _autotune.CacheWarning)) == 1
    assert not os.path.exists(_autotune.cache_file())
    assert not (cache_dir.exists() and [f for f in os.listdir(cache_dir) if f.endswith(".tmp")])


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() == 0,
                    reason="root ignores directory permissions (the two cases above block the directory otherwise)")
def test_a_read_only_cache_directory_means_tuning_in_memory_with_one_warning(gpu_mode, cache_dir):
    cache_dir.mkdir()
    cache_dir.chmod(stat.S_IRUSR | stat.S_IXUSR)
    try:
        with warnings.catch_warnings(record=True) as rec:
            warnings.simplefilter("always")
            assert bp(sel()) == 32 and bp(sel((7, 7))) == 32
        assert len(of_kind(rec, _autotune.CacheWarning)) == 1 and os.listdir(cache_dir) == []
    finally:
        cache_dir.chmod(stat.S_IRWXU)


def test_the_file_name_has_the_gpu_name_the_triton_version_and_the_kernels_hash(cache_dir):
    h = _autotune.kernels_hash()
    assert len(h) == 12 and int(h, 16) >= 0 and _autotune.kernels_hash() == h
    path = _autotune.cache_file("NVIDIA H100 80GB HBM3")
    assert os.path.dirname(path) == str(cache_dir)
    assert os.path.basename(path) == f"NVIDIA_H100_80GB_HBM3__triton-{triton.__version__}__kernels-{h}.json"
    assert os.path.basename(_autotune.cache_file("../../etc/passwd")).startswith("etc_passwd__triton-")
    if not _runtime.has_cuda():
        assert os.path.basename(_autotune.cache_file()).startswith("cpu-interpreter__triton-")


def test_a_kernel_edit_gets_a_new_file_and_old_files_stay(gpu_mode, monkeypatch, tmp_path):
    sel()
    old_file, real_hash = _autotune.cache_file(), _autotune.kernels_hash
    with open(old_file) as f:
        old_text = f.read()
    monkeypatch.setattr(_autotune, "kernels_hash", lambda: "0123456789ab")
    _autotune.reset()
    b = Bench()
    assert bp(sel(bench=b)) == 32 and len(b.calls) == 4  # tuned again
    assert _autotune.cache_file() != old_file and _autotune.cache_file().endswith("__kernels-0123456789ab.json")
    with open(old_file) as f:
        assert f.read() == old_text
    monkeypatch.setattr(_autotune, "kernels_hash", real_hash)  # the hash follows the kernels' source:
    before, copy = real_hash(), tmp_path / "kernels"              # a copy has it, one byte changed does not
    shutil.copytree(os.path.dirname(_autotune.kernels.__file__), copy, ignore=shutil.ignore_patterns("__pycache__"))
    monkeypatch.setattr(_autotune, "kernels", types.SimpleNamespace(__file__=str(copy / "__init__.py")))
    assert real_hash() == before
    (copy / "conv.py").write_text((copy / "conv.py").read_text() + "\n# an edit\n")
    assert real_hash() != before


# -- choices and keys -------------------------------------------------------------------------------------
@pytest.mark.parametrize("choice", [
    H, triton.Config({"BLOCK_P": 16, "BLOCK_C": 32, "BLOCK_R": 256}, num_warps=8, num_stages=3),
    triton.Config({}, num_warps=2, num_stages=1), "cudnn", "cudnn_relu", "triton"])
def test_a_choice_survives_encode_json_and_decode(choice):
    back = _autotune.decode(json.loads(json.dumps(dict(_autotune.encode(choice), source="tuned", ms=1.5))))
    assert _autotune.ident(back) == _autotune.ident(choice) and _autotune.describe(back) == _autotune.describe(choice)
    if isinstance(choice, str):
        assert back == choice
    else:
        assert (back.kwargs, back.num_warps, back.num_stages) == (choice.kwargs, choice.num_warps, choice.num_stages)


def test_equal_configs_built_separately_have_one_ident_and_are_timed_once(gpu_mode):
    a = triton.Config({"BLOCK_P": 64, "BLOCK_C": 32}, num_warps=4, num_stages=2)
    b = triton.Config({"BLOCK_C": 32, "BLOCK_P": 64}, num_warps=4, num_stages=2)
    assert a is not b and _autotune.ident(a) == _autotune.ident(b) and hash(_autotune.ident(a))
    others = [triton.Config({"BLOCK_P": 64, "BLOCK_C": 32}, num_warps=8, num_stages=2),
              triton.Config({"BLOCK_P": 64, "BLOCK_C": 32}, num_warps=4, num_stages=3), "cudnn"]
    assert all(_autotune.ident(o) != _autotune.ident(a) for o in others)
    bench = Bench()
    sel(bench=bench, cands=[cfg(64), *CANDS])  # a copy of the heuristic among the candidates
    assert sorted(bench.calls) == [16, 32, 64, 128]


def test_pixels_buckets_the_map_and_the_batch():
    assert [_autotune.pixels(b, 400) for b in (1, 2, 3, 4, 5, 16, 17)] == \
        [(512, 1), (512, 2), (512, 4), (512, 4), (512, 8), (512, 16), (512, 32)]
    assert _autotune.pixels(3, 49) == _autotune.pixels(4, 64) == (64, 4)
    # 80 x 80 (6400 -> 8192 pixels): from 16 images the GPU is full, bigger batches share the key
    assert {_autotune.pixels(b, 6400) for b in (16, 17, 32, 256)} == {(8192, 16)}
    assert _autotune.pixels(7, 1 << 20) == (1 << 20, 1)


def test_key_requires_the_precision_and_carries_dtypes_and_layouts():
    x = torch.zeros(2, 16, 4, 4)
    w1 = torch.zeros(4, 16)
    with pytest.raises(TypeError):
        _autotune.key((1,), x)  # precision is keyword-only and has no default
    with pytest.raises(TypeError):
        channel_gate.key(x, w1, False)
    assert _autotune.key((1, 2), x, precision=None) == (1, 2, "float32", False, "-")
    cl = x.half().contiguous(memory_format=torch.channels_last)
    assert _autotune.key((1,), cl, precision="tf32") == (1, "float16", True, "tf32")
    assert channel_gate.key(x, w1, False, "ieee") != channel_gate.key(x, w1, False, "tf32")


def gate_inputs(device, b=2, c=16, h=4, w=4, cr=4):
    g = torch.Generator().manual_seed(0)
    return [(torch.randn(*s, generator=g) * 0.5).to(device) for s in ((b, c, h, w), (cr, c), (cr,), (c, cr), (c,))]


def conv_inputs(device, c=16, cr=4):
    g = torch.Generator().manual_seed(1)
    r = lambda *s: (torch.randn(*s, generator=g) * 0.3).to(device)
    return r(1, c, 4, 4), r(cr, c, 3, 3), r(cr), r(c, cr, 3, 3), r(c).abs() + 0.5, r(c)


@needs_kernels
def test_real_ops_tune_once_per_bucket(gpu_mode, fake_timer, monkeypatch, device):
    _, w1, b1, w2, b2 = gate_inputs(device)
    launches, launch = [], _runtime.launch
    monkeypatch.setattr(_runtime, "launch", lambda *a: launches.append(1) or launch(*a))

    def run(b, h, w):
        x = torch.randn(b, 16, h, w).to(device)
        x0 = x.clone()
        out = channel_gate.channel_gate(x, w1, b1, w2, b2, True)
        torch.testing.assert_close(out, channel_gate.torch_forward(x, w1, b1, w2, b2, True), rtol=1e-4, atol=1e-5)
        assert torch.equal(x, x0)  # timing the candidates did not touch the input
        return len(fake_timer)

    n1 = run(3, 3, 3)
    assert n1 > 1 and len(launches) == n1 + 1  # each choice launched once before it is timed, then the winner
    assert run(4, 4, 4) == n1  # batch 3 -> 4 and 9 -> 16 pixels: the same bucket, no tuning
    n2 = run(4, 2, 3)          # 6 -> 8 pixels: a new bucket
    assert n2 > n1 and run(5, 4, 4) > n2  # batch 5 -> 8: another
    tuned = [r for r in _autotune.drain_log() if r.source == "tuned"]
    assert len(tuned) == 3 and all(r.op == "channel_gate" and r.speedup for r in tuned)


def _gate(d):
    x, w1, b1, w2, b2 = gate_inputs(d)
    channel_gate.channel_gate(x, w1, b1, w2, b2)


def _gate_bwd(d):
    x, w1, b1, w2, b2 = gate_inputs(d)
    channel_gate.backward(x, x * 0.5, x * 0.25, w1, b1, w2, b2, True, torch.zeros(1, dtype=torch.int32, device=d))


def _conv1(d):
    x, w1, b1, *_ = conv_inputs(d)
    conv.conv_bn_relu(x, w1, b1)


def _conv2(d):
    x, w1, _, w2, scale, shift = conv_inputs(d)
    conv.conv_gate(x[:, :4].contiguous(memory_format=torch.channels_last), w2, None, scale, shift, x)


DOT_OPS = {"channel_gate": ("matmul", _gate, {"ieee", "tf32"}), "channel_gate_bwd": ("matmul", _gate_bwd,
           {"ieee", "tf32"}), "conv_bn_relu": ("cudnn", _conv1, {"tf32x3", "tf32"}),
           "conv_gate": ("cudnn", _conv2, {"tf32x3", "tf32"})}


def keys_of(op) -> list:
    return [r.key for r in _autotune.drain_log() if r.op == op]


@needs_kernels
@pytest.mark.parametrize("op", DOT_OPS)
def test_fp32_keys_of_a_dot_kernel_differ_between_full_precision_and_tf32(op, tf32, device):
    switch, run, precisions = DOT_OPS[op]
    keys = []
    for on in (False, True):
        tf32(switch, on)
        run(device)
        keys += keys_of(op)
    assert len(keys) == 2 and len(set(keys)) == 2 and {k.rsplit(",", 1)[1] for k in keys} == precisions
    tf32("cudnn" if switch == "matmul" else "matmul", False)  # the other switch does not change this key
    run(device)
    assert keys_of(op) == []


@needs_kernels
def test_fp32_keys_of_the_spatial_path_choice_differ_between_full_precision_and_tf32(gpu_mode, fake_timer, tf32,
                                                                                    monkeypatch, device):
    monkeypatch.setenv("GAM_TRITON_CONV", "auto")
    x, w1, b1, w2, scale, shift = conv_inputs(device)
    keys = []
    for on in (False, True):
        tf32("cudnn", on)
        conv.spatial_eval(x, w1, b1, w2, None, scale, shift)
        keys += keys_of("spatial")
    assert len(set(keys)) == 2 and {k.rsplit(",", 1)[1] for k in keys} == {"tf32x3", "tf32"}
    tf32("matmul", True)
    conv.spatial_eval(x, w1, b1, w2, None, scale, shift)
    assert keys_of("spatial") == []


@needs_kernels
@pytest.mark.skipif(not hasattr(torch.backends, "fp32_precision"), reason="torch < 2.9 has no fp32_precision API")
def test_the_conv_precision_follows_the_new_cudnn_fp32_precision_api(tf32, device):
    torch.backends.cudnn.conv.fp32_precision = "ieee"  # what PyTorch recommends instead of allow_tf32
    _conv1(device)
    assert keys_of("conv_bn_relu")[0].endswith(",tf32x3")


class _Stop(Exception):
    pass


def _backward_candidates(monkeypatch, c: int, cr: int, dtype: torch.dtype) -> list:
    """The candidates the channel-gate backward hands the tuner for fp32 x (B1, 8x8) and weights in
    ``dtype``, the tuner stopped before it runs anything."""
    seen = []

    def spy(op, k, heuristic, candidates, bench):
        seen.extend(candidates())
        raise _Stop

    monkeypatch.setattr(_autotune, "select", spy)
    x, *lin = gate_inputs("cpu", 1, c, 8, 8, cr)
    with pytest.raises(_Stop):
        channel_gate.backward(x, x, x, *(t.to(dtype) for t in lin), True, torch.zeros(1, dtype=torch.int32))
    return seen


def test_the_channel_gate_backward_tiles_follow_the_dots_dtype_as_the_forwards_do(monkeypatch):
    seen = [_autotune.ident(c) for c in _backward_candidates(monkeypatch, 64, 16, torch.bfloat16)]
    # x fp32, weights bf16 (autocast): the tiles of bf16 dots
    assert seen == [_autotune.ident(c) for c in channel_gate.bwd_candidates(64, 16, 64, torch.bfloat16, torch.float32)]
    assert seen != [_autotune.ident(c) for c in channel_gate.bwd_candidates(64, 16, 64, torch.float32)]


@pytest.mark.parametrize("cr,dtype,allow_tf32,gemms", [(72, torch.float32, False, True),
                                                        (72, torch.float32, True, False),
                                                        (64, torch.float32, False, False),
                                                        (72, torch.bfloat16, False, False)])
def test_pytorchs_gemms_are_a_backward_candidate_only_where_the_kernels_dots_run_on_fma(monkeypatch, tf32, cr, dtype,
                                                                                        allow_tf32, gemms):
    """FMA dots: fp32 "ieee" above BWD_TF32X3_MAX_R (C/r 72: BLOCK_R 128). TF32, 3xTF32 (BLOCK_R 64) and half
    precision run on tensor cores: their candidates are tiles only."""
    tf32("matmul", allow_tf32)
    seen = _backward_candidates(monkeypatch, 16, cr, dtype)
    paths = [c for c in seen if isinstance(c, str)]
    assert paths == ([channel_gate.GEMMS] if gemms else []) and len(seen) > 1 and not isinstance(seen[-2], str)


@needs_kernels
def test_the_tuner_can_choose_pytorchs_gemms_for_the_fma_backward(gpu_mode, fake_timer, tf32, kernel_names, device):
    """Each choice is timed as the whole backward (the kernel's tiles with their weight GEMMs); when GEMMS wins
    (the fake timer: the last choice timed), reference_grads runs from then on, with the float64 gradients, and the
    cache file holds the path."""
    tf32("matmul", False)
    x, w1, b1, w2, b2 = gate_inputs(device, 2, 16, 2, 3, 72)
    ga, gb = x * 0.5, x * 0.25

    def run():
        counts = torch.zeros(channel_gate.COUNTER_SLOTS, dtype=torch.int32, device=device)
        out = channel_gate.backward(x, ga, gb, w1, b1, w2, b2, True, counts)
        assert not counts.any()
        return out

    got = run()
    assert "channel_gate_bwd_kernel" in kernel_names and len(fake_timer) > 2  # the tiles were timed too
    tuned = _autotune.drain_log()[-1]
    assert tuned.op == "channel_gate_bwd" and tuned.source == "tuned" and tuned.choice == channel_gate.GEMMS
    want = channel_gate.reference_grads(*(t.double() for t in (x, w1, b1, w2, b2)), True, (ga + gb).double())
    for g, r in zip(got, want):
        assert g.dtype == torch.float32
        torch.testing.assert_close(g.double(), r, rtol=1e-5, atol=1e-6)
    kernel_names.clear()
    again = run()
    assert kernel_names == [] and all(torch.equal(a, b) for a, b in zip(again, got))
    assert [e["path"] for e in cache_json()["entries"]["channel_gate_bwd"].values()] == [channel_gate.GEMMS]


def test_every_backward_tile_gets_the_full_register_budget():
    for cr in (8, 16, 24, 64, 128, 256):
        for dt, xdt in ((torch.bfloat16, torch.float32), (torch.bfloat16, torch.bfloat16),
                        (torch.float32, torch.float32)):
            heur = channel_gate.bwd_heuristic(4 * cr, cr, 400, dt, "gpu", xdt)
            cands = channel_gate.bwd_candidates(4 * cr, cr, 400, dt, xdt)
            assert heur.maxnreg == channel_gate.FULL_MAXNREG and {c.maxnreg for c in cands} == {heur.maxnreg}, cr


def test_forward_register_caps():
    """fp32 forward tiles take the full budget; half-precision ones keep ptxas's choice except the tiles that
    spilled under it (8 warps at BLOCK_R 128; before Triton 3.9, 4-warp tiles up to BLOCK_R 64 at the full budget), and
    before Triton 3.6 the autocast 8-warp 16 x 64 tiles up to BLOCK_R 64, held to four CTAs per SM."""
    for cr in (16, 64, 128, 256):
        for batch in (None, 1, 16):
            assert channel_gate.heuristic(4 * cr, cr, 400, torch.float32, "gpu", batch=batch).maxnreg == \
                channel_gate.FULL_MAXNREG
            for x_dtype in (None, torch.float32):
                cfg = channel_gate.heuristic(4 * cr, cr, 400, torch.bfloat16, "gpu", x_dtype=x_dtype, batch=batch)
                w, r = cfg.num_warps, cfg.kwargs["BLOCK_R"]
                p, c, version = cfg.kwargs["BLOCK_P"], cfg.kwargs["BLOCK_C"], channel_gate._runtime.TRITON
                small = x_dtype is not None and version < (3, 6) and (w, p, c) == (8, 16, 64) and r <= 64
                want = channel_gate.FWD_MAXNREG if (w, r) == (8, 128) else channel_gate.SMALL_TILE_MAXNREG if small \
                    else channel_gate.FULL_MAXNREG if version < (3, 9) and w == 4 and r <= 64 else None
                assert cfg.maxnreg == want, (cr, batch, x_dtype)


def test_fp32_over_128_hidden_channels_fuses_where_compile_facts_allow():
    """BLOCK_R 256 in fp32 (C/r 129-256): the forward fuses in TF32, and from Triton 3.6 in "ieee" (3xTF32) too; the
    backward in TF32 from Triton 3.6 only (FMA "ieee" had no spill-free tile). Elsewhere PyTorch's GEMMs run them.
    Half precision, BLOCK_R up to 128 and the interpreter always fuse."""
    new = channel_gate._runtime.TRITON >= (3, 6)
    for prec in ("ieee", "tf32"):
        assert channel_gate.fused(torch.float32, 144, False, prec, "gpu") == (new or prec == "tf32")
        assert channel_gate.fused(torch.float32, 256, True, prec, "gpu") == (new and prec == "tf32")
        assert channel_gate.fused(torch.float32, 144, True, prec, "interpreter")
        assert channel_gate.fused(torch.float32, 128, True, prec, "gpu")
        assert channel_gate.fused(torch.bfloat16, 256, True, prec, "gpu")
    assert channel_gate.bwd_heuristic(576, 144, 400, torch.float32, "gpu", batch=16).num_stages == 2


def test_a_config_with_maxnreg_round_trips_through_the_cache_entry():
    cfg = triton.Config(dict(BLOCK_P=16, BLOCK_C=16, BLOCK_R=128), num_warps=4, num_stages=2, maxnreg=255)
    back = _autotune.decode(_autotune.encode(cfg))
    assert _autotune.ident(back) == _autotune.ident(cfg) and back.maxnreg == 255 and "maxnreg" not in back.kwargs
    plain = _autotune.decode({"config": {"BLOCK_P": 16, "num_warps": 4, "num_stages": 2}})
    assert plain.maxnreg is None and _autotune.ident(plain) != _autotune.ident(
        triton.Config(dict(BLOCK_P=16), num_warps=4, num_stages=2, maxnreg=255))


# -- rejections and failures while tuning ---------------------------------------------------------------------
def test_a_candidate_whose_kernel_spills_registers_is_rejected_and_skipped(gpu_mode, monkeypatch):
    ran = []

    def run(choice):
        ran.append(bp(choice))
        return types.SimpleNamespace(n_spills=24 if bp(choice) == 32 else None)

    monkeypatch.setattr(_autotune, "do_bench", lambda fn, **kw: (fn(), TIMES[ran[-1]])[1])
    bench = _autotune.timed(run)
    with pytest.raises(_autotune.Rejected, match="spills 24 bytes"):
        bench(cfg(32))
    assert ran == [32]  # rejected after its one compiling run, never timed
    assert bp(sel(bench=bench)) == 64  # 32 (1 ms) spills: the heuristic (2 ms) wins
    assert _autotune.drain_log()[0].failed == 1


def test_checked_drops_a_wrong_candidate_with_a_warning_and_times_the_right_ones(gpu_mode):
    want, refs = torch.arange(8.0), []

    def reference():
        refs.append(1)
        return want

    def run(choice):  # 32: wrong values, 16: wrong shape
        return want[:4] if bp(choice) == 16 else want + (bp(choice) == 32)

    b = Bench()
    with pytest.warns(conv.CandidateMismatchWarning) as rec:
        assert bp(sel(bench=conv.checked("fake_op", b, run, reference, (1e-3, 1e-3)))) == 64
    msgs = [str(w.message) for w in of_kind(rec, conv.CandidateMismatchWarning)]
    assert len(msgs) == 2 and "BLOCK_P=16 w4 s2 disagrees" in msgs[0] and "BLOCK_P=32 w4 s2 disagrees" in msgs[1]
    assert b.calls == [64, 128] and refs == [1]  # the reference is computed once


@needs_kernels
def test_a_conv_candidate_that_writes_nothing_is_not_chosen(gpu_mode, fake_timer, monkeypatch, device):
    x, w1, b1, *_ = conv_inputs(device)
    heur = conv.heuristic(16, 4, 16, torch.float32)
    monkeypatch.setattr(conv, "candidates", lambda *a: [triton.Config(heur.kwargs, num_warps=4, num_stages=3)])
    launch = _runtime.launch  # the 3-stage candidate's kernel writes nothing (a miscompiled mask, say)
    monkeypatch.setattr(_runtime, "launch", lambda k, g, a, kw: None if kw["num_stages"] == 3 else launch(k, g, a, kw))
    monkeypatch.setattr(_runtime, "POISON", True)  # fresh outputs are NaN
    want = torch.relu(torch.nn.functional.conv2d(x, w1, b1, padding=1))
    with pytest.warns(conv.CandidateMismatchWarning, match="w4 s3"):  # each checked run starts from NaN
        torch.testing.assert_close(conv.conv_bn_relu(x, w1, b1), want)
    assert _autotune.drain_log()[-1].choice.num_stages != 3  # the kernel that writes nothing lost
    torch.testing.assert_close(conv.conv_bn_relu(x, w1, b1), want)


def _compile_failures():
    from triton.compiler.errors import CompilationError
    from triton.runtime.errors import OutOfResources, PTXASError

    return [OutOfResources(232448, 101376, "shared memory"), PTXASError("ptxas fatal: too many registers"),
            CompilationError("src", None, "bad block shape"),
            RuntimeError("Triton Error [CUDA]: too many resources requested for launch")]


@pytest.mark.parametrize("i", range(4), ids=["OutOfResources", "PTXASError", "CompilationError", "launch-resources"])
def test_compile_and_resource_failures_skip_the_candidate(gpu_mode, i):
    exc = _compile_failures()[i]
    assert _autotune.failure_kind(exc) == "skip"
    b = Bench(fail={32: exc})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert bp(sel(bench=b)) == 64 and len(b.calls) == 4
    assert cache_json()["entries"]["fake_op"]["1,2,k"]["source"] == "tuned"


@pytest.mark.parametrize("exc", [torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 256.00 MiB"),
                                 RuntimeError("Triton Error [CUDA]: out of memory"),
                                 RuntimeError("CUDA error: out of memory")], ids=["torch", "triton", "cuda-error"])
def test_out_of_memory_falls_back_to_the_heuristic_with_a_warning_and_is_not_stored(gpu_mode, exc):
    b = Bench(fail={16: exc})
    with pytest.warns(_autotune.TuningWarning, match="out of GPU memory"):
        assert bp(sel(bench=b)) == 64
    assert b.calls == [64, 16]  # tuning stopped at the failure
    assert not os.path.exists(_autotune.cache_file())
    assert [r.source for r in _autotune.drain_log()] == ["failed"]
    assert bp(sel(bench=b)) == 64 and len(b.calls) == 2  # remembered for this process: no retry per call


@pytest.mark.parametrize("exc", [RuntimeError("CUDA error: an illegal memory access was encountered"),
                                 RuntimeError("Triton Error [CUDA]: an illegal memory access was encountered"),
                                 torch.AcceleratorError("CUDA error: unspecified launch failure")],
                         ids=["torch", "triton", "AcceleratorError"])
def test_a_sticky_cuda_error_propagates(gpu_mode, exc):
    assert _autotune.failure_kind(exc) == "fatal"
    with pytest.raises(type(exc), match="illegal memory access|launch failure"):
        sel(bench=Bench(fail={16: exc}))
    assert not os.path.exists(_autotune.cache_file())
    b = Bench()
    assert bp(sel(bench=b)) == 32 and len(b.calls) == 4  # nothing was kept: tuned afresh


def test_an_unexpected_error_skips_the_candidate_unless_the_device_then_reports_one(gpu_mode, monkeypatch):
    assert _autotune.failure_kind(ValueError("num_warps must be a power of 2")) == "skip"
    assert bp(sel(bench=Bench(fail={32: ValueError("odd")}))) == 64

    def sticky(*a):
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    monkeypatch.setattr(_runtime, "has_cuda", lambda: True)  # a GPU whose synchronize shows a sticky error
    monkeypatch.setattr(_runtime, "device_name", lambda: "Fake GPU")
    monkeypatch.setattr(torch.cuda, "synchronize", sticky)
    with pytest.raises(RuntimeError, match="illegal memory access"):
        sel((2, 2), bench=Bench(fail={16: ValueError("odd")}))


# -- guards -----------------------------------------------------------------------------------------------
def test_capture_uses_the_heuristic_warns_once_stores_nothing_and_the_next_eager_call_tunes(gpu_mode, monkeypatch):
    monkeypatch.setattr(_runtime, "capturing", lambda: True)
    b = Bench()
    with pytest.warns(_autotune.CaptureWarning) as rec:
        assert bp(sel(bench=b)) == 64 and bp(sel(bench=b)) == 64 and bp(sel((2, 2), bench=b)) == 64
    assert len(of_kind(rec, _autotune.CaptureWarning)) == 1
    assert b.calls == [] and not os.path.exists(_autotune.cache_file())
    assert {r.source for r in _autotune.drain_log()} == {"fallback"}
    monkeypatch.setattr(_runtime, "capturing", lambda: False)
    assert bp(sel(bench=b)) == 32 and len(b.calls) == 4


def test_a_cached_choice_is_used_during_capture(gpu_mode, monkeypatch):
    sel()
    _autotune.reset()
    monkeypatch.setattr(_runtime, "capturing", lambda: True)
    b = Bench()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert bp(sel(bench=b)) == 32 and b.calls == []
    assert [r.source for r in _autotune.drain_log()] == ["cache"]


def test_an_untimed_entry_met_during_capture_is_still_tuned_by_the_next_eager_call(cpu_mode, monkeypatch):
    sel()  # stored untimed
    pretend_gpu(monkeypatch)
    _autotune.reset()
    monkeypatch.setattr(_runtime, "capturing", lambda: True)
    assert bp(sel()) == 64
    monkeypatch.setattr(_runtime, "capturing", lambda: False)
    b = Bench()
    assert bp(sel(bench=b)) == 32 and len(b.calls) == 4


def test_fake_tensor_tracing_does_not_benchmark(gpu_mode):
    from torch._subclasses.fake_tensor import FakeTensorMode

    b = Bench()
    with FakeTensorMode():
        assert _runtime.tracing() and bp(sel(bench=b)) == 64
    assert b.calls == [] and not os.path.exists(_autotune.cache_file()) and not _runtime.tracing()
    assert bp(sel(bench=b)) == 32
    _autotune.reset()
    with FakeTensorMode():
        assert bp(sel(bench=b)) == 32 and len(b.calls) == 4  # a cached choice is used while tracing


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or INTERPRET,
                    reason="CUDA-graph capture needs a CUDA GPU and compiled kernels (TRITON_INTERPRET unset)")
def test_real_cuda_graph_capture_works_after_a_warm_up(monkeypatch):
    x, w1, b1, w2, b2 = gate_inputs("cuda", 2, 32, 8, 8, 8)
    want = channel_gate.torch_forward(x, w1, b1, w2, b2, True)
    monkeypatch.setenv("GAM_TRITON_AUTOTUNE", "0")
    _autotune.reset()
    channel_gate.channel_gate(x, w1, b1, w2, b2)  # the warm-up compiles the heuristic's kernel, tunes nothing
    torch.cuda.synchronize()
    monkeypatch.delenv("GAM_TRITON_AUTOTUNE")
    _autotune.reset()
    graph = torch.cuda.CUDAGraph()
    with pytest.warns(_autotune.CaptureWarning):
        with torch.cuda.graph(graph):
            out = channel_gate.channel_gate(x, w1, b1, w2, b2)
    graph.replay()
    torch.cuda.synchronize()
    torch.testing.assert_close(out, want, rtol=1e-3, atol=1e-3)
    assert not os.path.exists(_autotune.cache_file())  # nothing tuned or stored during the capture
    channel_gate.channel_gate(x, w1, b1, w2, b2)  # eager again: tunes and stores
    assert _autotune.drain_log()[-1].source == "tuned" and "channel_gate" in cache_json()["entries"]
    graph = torch.cuda.CUDAGraph()
    with warnings.catch_warnings():
        warnings.simplefilter("error", _autotune.CaptureWarning)  # tuned now: no warning
        with torch.cuda.graph(graph):
            out = channel_gate.channel_gate(x, w1, b1, w2, b2)
    graph.replay()
    torch.cuda.synchronize()
    torch.testing.assert_close(out, want, rtol=1e-3, atol=1e-3)


# -- per-device naming --------------------------------------------------------------------------------------
def test_memory_and_cache_follow_the_current_devices_name_and_peek_reads_memory(gpu_mode, monkeypatch):
    current = [0]
    monkeypatch.setattr(_runtime, "has_cuda", lambda: True)
    monkeypatch.setattr(_runtime, "device_name", DEVICE_NAME)
    monkeypatch.setattr(_runtime, "DEVICE_NAMES", {0: "Fake GPU 0", 1: "Fake GPU 1"})
    monkeypatch.setattr(torch.cuda, "current_device", lambda: current[0])
    b0, b1 = Bench(), Bench(times={16: 1.0, 32: 3.0, 64: 2.0, 128: 4.0})  # device 1 prefers 16
    assert bp(sel(bench=b0)) == 32
    assert _autotune.peek("fake_op", (1, 2, "k"), torch.device("cuda", 1)) is None  # resolves nothing
    current[0] = 1
    assert bp(sel(bench=b1)) == 16 and len(b0.calls) == len(b1.calls) == 4  # one tuning per device
    assert bp(_autotune.peek("fake_op", (1, 2, "k"), torch.device("cuda", 0))) == 32
    assert bp(_autotune.peek("fake_op", (1, 2, "k"), torch.device("cuda", 1))) == 16
    assert _autotune.peek("fake_op", (1, 2, "k"), torch.device("cpu")) is None
    assert _autotune.peek("fake_op", (9,), torch.device("cuda", 1)) is None and len(_autotune.drain_log()) == 2
    for i in (0, 1):
        path = _autotune.cache_file(f"Fake GPU {i}")
        assert os.path.basename(path).startswith(f"Fake_GPU_{i}__") and os.path.exists(path)
    assert _autotune.cache_file() == _autotune.cache_file("Fake GPU 1")
    _autotune.reset()
    assert _autotune.enabled()  # a fresh state: peek reads no file
    assert _autotune.peek("fake_op", (1, 2, "k"), torch.device("cuda", 1)) is None


# -- the module, the candidates, the CLI ----------------------------------------------------------------------
@needs_kernels
def test_the_gam_module_fills_the_cache_then_reads_it(cpu_mode, device):
    from gam_triton import GAM

    gam = GAM(16).to(device).eval()
    x = torch.randn(2, 16, 6, 5, device=device)
    with torch.no_grad():
        y = gam(x)
    entries = cache_json()["entries"]
    assert set(entries) == {"channel_gate", "final_gate"}
    assert all(e["source"] == "heuristic" for t in entries.values() for e in t.values())
    assert {r.source for r in _autotune.drain_log()} == {"heuristic"}
    _autotune.reset()  # a new process, in effect
    with torch.no_grad():
        torch.testing.assert_close(gam(x), y)
    assert [r.source for r in _autotune.drain_log()] == ["cache", "cache"]


def _distance(c, ref) -> float:
    lg = lambda v: int(v).bit_length()
    return (sum(abs(lg(c.kwargs[k]) - lg(ref.kwargs[k])) for k in ref.kwargs)
            + 0.5 * abs(lg(c.num_warps) - lg(ref.num_warps)) + 0.25 * abs(c.num_stages - ref.num_stages))


def _check_pruned(cands, ref, bounds) -> None:
    assert 1 <= len(cands) <= _runtime.MAX_CANDIDATES
    assert len({_autotune.ident(c) for c in cands}) == len(cands)
    assert all(_autotune.ident(_autotune.decode(_autotune.encode(c))) == _autotune.ident(c) for c in cands)
    assert all(16 <= c.kwargs[k] <= max(16, next_pow2(n)) for c in cands for k, n in bounds.items())
    d = [_distance(c, ref) for c in cands]
    assert d == sorted(d), "not nearest the heuristic first"


@pytest.mark.parametrize("c,cr,hw", [(16, 4, 64), (24, 6, 400), (128, 32, 6400), (576, 144, 400), (3, 1, 5)])
def test_candidates_are_pruned_by_shape_and_nearest_the_heuristic_first(monkeypatch, c, cr, hw):
    for dt in (torch.float32, torch.bfloat16):
        fwd = channel_gate.candidates(c, cr, hw, dt)
        _check_pruned(fwd, channel_gate.heuristic(c, cr, hw, dt, "gpu"), {"BLOCK_P": hw, "BLOCK_C": c})
        assert all(k.kwargs["BLOCK_R"] == max(16, next_pow2(cr)) for k in fwd)
        bwd = channel_gate.bwd_candidates(c, cr, hw, dt)
        _check_pruned(bwd, channel_gate.bwd_heuristic(c, cr, hw, dt, "gpu"), {"BLOCK_P": hw, "BLOCK_C": c})
        assert all(3 * k.kwargs["BLOCK_P"] * k.kwargs["BLOCK_R"] <= 4096 * k.num_warps for k in bwd)
    for cl in (False, True):
        _check_pruned(elementwise.candidates(c, hw, cl), elementwise.heuristic(c, hw, cl, "gpu"),
                      {"BLOCK_P": hw, "BLOCK_C": c})
    if conv.TARGET == "interpreter":  # timings mean nothing there: the heuristic only
        assert [_autotune.ident(k) for k in conv.candidates(c, cr, hw, torch.float32)] == \
            [_autotune.ident(conv.heuristic(c, cr, hw, torch.float32))]
    gpu_heuristic = conv.heuristic
    monkeypatch.setattr(conv, "TARGET", "gpu")
    monkeypatch.setattr(conv, "heuristic", lambda *a: gpu_heuristic(*a, target="gpu"))
    for cin, cout in ((c, cr), (cr, c)):
        _check_pruned(conv.candidates(cin, cout, hw, torch.float16), conv.heuristic(cin, cout, hw, torch.float16),
                      {"BLOCK_N": cout, "BLOCK_K": cin})


def test_conv_candidates_have_no_pixel_block_beyond_a_small_map(monkeypatch):
    monkeypatch.setattr(conv, "TARGET", "gpu")
    assert all(c.kwargs["BLOCK_P"] <= 16 for c in conv.candidates(16, 16, 16, torch.float16))


@pytest.mark.parametrize("argv", [
    [], ["--channels", "32"], ["--channels", "0", "--sizes", "8"], ["--channels", "32", "--sizes", "8x"],
    ["--channels", "32", "--sizes", "8", "--dtype", "int8"], ["--channels", "30", "--sizes", "8", "--shuffle", "4"],
    ["--channels", "3", "--sizes", "8", "--rate", "4"], ["--channels", "32", "--sizes", "8", "--amp"],
    ["--channels", "32", "--sizes", "8", "--shuffle", "-1"], ["--channels", "32", "--sizes", "8", "--batch", "0"]])
def test_the_tune_cli_rejects_bad_arguments(argv, capsys):
    from gam_triton import tune

    with pytest.raises(SystemExit) as e:
        tune.parse_args(argv)
    assert e.value.code == 2 and "error:" in capsys.readouterr().err


def test_the_tune_cli_fills_the_cache(cpu_mode, capsys, tmp_path):
    from gam_triton import tune

    status = tune.main(["--channels", "16", "--sizes", "4", "--batch", "2", "--train",
                        "--cache-dir", str(tmp_path / "cli")])
    out = capsys.readouterr().out
    if not KERNELS_RUN:  # no GPU and no interpreter: it refuses
        assert status == 2
        return
    assert status == 0 and "[1/1] C=16 r=4 4x4 B=2 fp32 nchw" in out and "(heuristic)" in out
    assert os.path.dirname(_autotune.cache_file()) == str(tmp_path / "cli")
    assert set(cache_json()["entries"]) == {"channel_gate", "final_gate", "bn_relu", "channel_gate_bwd"}


@needs_kernels
def test_the_tune_cli_reports_tuning_in_a_markdown_table(gpu_mode, fake_timer, capsys):
    from gam_triton import tune

    assert tune.main(["--channels", "16", "--sizes", "4", "--batch", "1", "--layout", "channels_last"]) == 0
    out = capsys.readouterr().out
    assert "(tuned, " in out and "| kernel | key | tuned config |" in out and "| channel_gate |" in out
    assert fake_timer and all(e["source"] == "tuned" for e in cache_json()["entries"]["channel_gate"].values())


def test_the_tune_cli_off_switch_exits_2(monkeypatch, capsys):
    from gam_triton import tune

    monkeypatch.setenv("GAM_TRITON_AUTOTUNE", "0")
    assert tune.main(["--channels", "16", "--sizes", "4"]) == 2
    assert "off" in capsys.readouterr().err


@pytest.mark.parametrize("c,size", [(64, 80), (128, 80), (256, 80), (128, 40), (256, 40), (512, 40), (256, 20),
                                    (512, 20), (1024, 20)])
def test_fp32_forward_tiles_are_fitted_to_whole_waves(c, size):
    """At the sweep's shapes (B16, rate 4) the fp32 forward's grid runs in whole waves at every CTAs-per-SM count
    its registers may give at the full budget (``_fwd_ctas``): C128 40x40 and C512 20x20 ran 1.01 waves at 3 CTAs
    per SM with the unfitted tiles (Triton 3.9, sm_90). fp32 tiles never grow past FP32_TILES'."""
    cfg = channel_gate.heuristic(c, c // 4, size * size, torch.float32, "gpu", batch=16)
    p, r, w = cfg.kwargs["BLOCK_P"], cfg.kwargs["BLOCK_R"], cfg.num_warps
    assert p <= channel_gate.FP32_TILES[r][0] and w in (4, 8) and cfg.maxnreg == channel_gate.FULL_MAXNREG
    ks = channel_gate._fwd_ctas(p, cfg.kwargs["BLOCK_C"], r, w, 4)
    assert ks[0] == max(1, 65536 // (32 * w * 255)), ks
    assert all(channel_gate.waves_ok(16 * -(-size * size // p), 132 * k) for k in ks), (p, w, ks)


def test_a_forward_grid_no_tile_fits_takes_the_tile_that_fits_most():
    """The fork form at C256 20x20 B16 (C/r = 32: 6,400 pixels) has no forward tile whose grid runs in whole waves at
    every CTAs-per-SM count it may get; the fit then takes the one that does at the most counts (400 CTAs of 16
    pixels at 8 warps), not the tile as given (100 CTAs of 64: 32 SMs idle). Batch 1 at C64 80x80 likewise."""
    for c, cr, hw, batch in ((256, 32, 400, 16), (64, 16, 6400, 1)):
        cfg = channel_gate.heuristic(c, cr, hw, torch.bfloat16, "gpu", batch=batch)
        p, w = cfg.kwargs["BLOCK_P"], cfg.num_warps
        ks = channel_gate._fwd_ctas(p, cfg.kwargs["BLOCK_C"], cfg.kwargs["BLOCK_R"], w, 2)
        assert (p, w) == (16, 8) and any(channel_gate.waves_ok(batch * hw // 16, 132 * k) for k in ks), (p, w, ks)
