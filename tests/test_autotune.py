"""Autotuner and its persistent cache (issue 3): miss then hit across processes, corruption, concurrent
writers, read-only directories, the off switch, key bucketing, the graph-capture and tracing guards, the CLI.

Every test gets its own GAM_TRITON_CACHE_DIR and a fresh autotuner state. Benchmarking is forced where a
test needs it by monkeypatching ``autotune.can_benchmark`` (the GPU check) and timing with a counting fake
(``bench`` for :func:`autotune.select`, ``autotune.bench_ms`` for the real ops, which then still launch
every candidate once through the interpreter).
"""
import json
import os
import stat
import subprocess
import sys
import textwrap
import warnings

import pytest
import torch

from gam_triton import autotune, tune_cache
from gam_triton._runtime import INTERPRET
from gam_triton.configs import (MAX_CANDIDATES, Config, channel_gate_candidates, channel_gate_heuristic,
                                elementwise_candidates, elementwise_heuristic, next_pow2)

KERNELS_RUN = INTERPRET or torch.cuda.is_available()  # the Triton path runs (else ops take the torch path)
needs_kernels = pytest.mark.skipif(not KERNELS_RUN, reason="needs TRITON_INTERPRET=1 or a CUDA device")

H = Config(64, 32, 16, 4, 2)                      # the fake op's heuristic
CANDS = [Config(p, 32, 16, 4, 2) for p in (16, 32, 128)]
TIMES = {16: 3.0, 32: 1.0, 64: 2.0, 128: 4.0}     # ms by BLOCK_P: BLOCK_P=32 wins


class Bench:
    """A fake bench(cfg) -> ms that counts its calls."""

    def __init__(self, times=TIMES, fail=()):
        self.times, self.fail, self.calls = times, set(fail), []

    def __call__(self, cfg: Config) -> float:
        self.calls.append(cfg)
        if cfg.BLOCK_P in self.fail:
            from triton.runtime.errors import OutOfResources

            raise OutOfResources(232448, 101376, "shared memory")
        return self.times[cfg.BLOCK_P]


def sel(key=(1, 2, "k"), bench=None, op="fake_op", heuristic=H):
    return autotune.select(op, key, heuristic, lambda: CANDS, bench if bench is not None else Bench())


def cache_json() -> dict:
    with open(autotune.cache_file()) as f:
        return json.load(f)


def cache_warnings(record) -> list:
    return [w for w in record if issubclass(w.category, tune_cache.CacheWarning)]


@pytest.fixture(autouse=True)
def cache_dir(tmp_path, monkeypatch):
    d = tmp_path / "cache"
    monkeypatch.setenv("GAM_TRITON_CACHE_DIR", str(d))
    monkeypatch.delenv("GAM_TRITON_AUTOTUNE", raising=False)
    autotune.reset()
    yield d
    autotune.reset()


@pytest.fixture
def gpu_mode(monkeypatch):
    """Pretend kernels can be timed here (the decision a real GPU would make)."""
    monkeypatch.setattr(autotune, "can_benchmark", lambda: True)


@pytest.fixture
def cpu_mode(monkeypatch):
    monkeypatch.setattr(autotune, "can_benchmark", lambda: False)


# -- tuning and the in-process table -------------------------------------------------------------------
def test_tunes_once_then_hits_memory(gpu_mode, cache_dir):
    b = Bench()
    assert sel(bench=b) == Config(32, 32, 16, 4, 2)
    assert len(b.calls) == 4 and b.calls[0] == H  # the heuristic is timed first, then the candidates
    assert sel(bench=b) == Config(32, 32, 16, 4, 2) and len(b.calls) == 4
    entry = cache_json()["entries"]["fake_op"]["1,2,k"]
    assert entry["source"] == "tuned" and entry["ms"] == 1.0 and entry["heuristic_ms"] == 2.0
    assert entry["candidates"] == 4 and entry["tune_s"] >= 0
    rec, = autotune.drain_log()
    assert rec.source == "tuned" and rec.speedup == 2.0


def test_hot_path_does_not_touch_disk(gpu_mode, cache_dir):
    first = sel()
    for f in cache_dir.iterdir():
        f.unlink()
    cache_dir.rmdir()
    assert sel(bench=Bench()) == first
    assert not cache_dir.exists()


def test_failing_candidates_are_skipped(gpu_mode):
    b = Bench(fail={32})
    assert sel(bench=b) == H  # 64 (2 ms) beats 16 (3 ms) and 128 (4 ms); 32 did not compile
    assert cache_json()["entries"]["fake_op"]["1,2,k"]["source"] == "tuned"


def test_all_failing_uses_heuristic_and_persists_nothing(gpu_mode, cache_dir):
    assert sel(bench=Bench(fail={16, 32, 64, 128})) == H
    assert not os.path.exists(autotune.cache_file())


def test_ties_go_to_the_heuristic(gpu_mode):
    assert sel(bench=Bench(times={16: 3.0, 32: 1.99, 64: 2.0, 128: 4.0})) == H


def test_cpu_mode_stores_the_heuristic_without_timing(cpu_mode):
    b = Bench()
    assert sel(bench=b) == H and b.calls == []
    entry = cache_json()["entries"]["fake_op"]["1,2,k"]
    assert entry["source"] == "heuristic" and Config(**{k: entry[k] for k in tune_cache.CONFIG_FIELDS}) == H
    autotune.reset()
    assert sel(bench=b) == H and autotune.drain_log()[0].source == "cache"


def test_gpu_retunes_a_heuristic_entry(cpu_mode, monkeypatch):
    sel()
    monkeypatch.setattr(autotune, "can_benchmark", lambda: True)
    autotune.reset()
    b = Bench()
    assert sel(bench=b) == Config(32, 32, 16, 4, 2) and len(b.calls) == 4


def test_stale_entries_are_replaced(gpu_mode):
    sel()
    autotune.reset()
    new_cands = [Config(p, 32, 16, 4, 2) for p in (16, 128)]  # the cached winner (32) is no longer offered
    b = Bench()
    assert autotune.select("fake_op", (1, 2, "k"), H, lambda: new_cands, b) == H and len(b.calls) == 3


# -- persistence across processes ----------------------------------------------------------------------
CHILD = textwrap.dedent(r"""
    import json, os, sys, time
    from gam_triton import autotune
    from gam_triton.configs import Config
    autotune.can_benchmark = lambda: True
    H = Config(64, 32, 16, 4, 2)
    C = [Config(p, 32, 16, 4, 2) for p in (16, 32, 128)]
    calls = []
    def bench(cfg):
        calls.append(cfg)
        return {16: 3.0, 32: 1.0, 64: 2.0, 128: 4.0}[cfg.BLOCK_P]
    keys, ready, n_ready = json.loads(sys.argv[1]), sys.argv[2], int(sys.argv[3])
    if ready:  # barrier: start writing only when every writer has imported everything
        open(os.path.join(ready, str(os.getpid())), "w").close()
        t0 = time.time()
        while len(os.listdir(ready)) < n_ready and time.time() - t0 < 60:
            time.sleep(0.005)
    chosen = [autotune.select("fake_op", tuple(k), H, lambda: C, bench).BLOCK_P for k in keys]
    print(json.dumps({"calls": len(calls), "chosen": chosen}))
""")


def run_children(keysets, cache_dir, barrier_dir=None):
    env = dict(os.environ, GAM_TRITON_CACHE_DIR=str(cache_dir))
    procs = [subprocess.Popen([sys.executable, "-c", CHILD, json.dumps(keys), str(barrier_dir or ""),
                               str(len(keysets))], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for keys in keysets]
    results = []
    for p in procs:
        out, err = p.communicate(timeout=120)
        assert p.returncode == 0, err
        results.append(json.loads(out.strip().splitlines()[-1]))
    return results


def test_miss_then_hit_across_processes(cache_dir):
    keys = [[1, 2, "a"], [1, 4, "b"]]
    first, = run_children([keys], cache_dir)
    assert first == {"calls": 8, "chosen": [32, 32]}
    second, = run_children([keys], cache_dir)
    assert second == {"calls": 0, "chosen": [32, 32]}  # the second process does not benchmark


def test_concurrent_writers_keep_every_entry(cache_dir, tmp_path):
    barrier = tmp_path / "barrier"
    barrier.mkdir()
    n, per = 3, 40
    keysets = [[[w, i, "k"] for i in range(per)] for w in range(n)]
    results = run_children(keysets, cache_dir, barrier)
    assert all(r["calls"] == 4 * per for r in results)
    entries = cache_json()["entries"]["fake_op"]
    assert len(entries) == n * per
    assert not [f for f in os.listdir(cache_dir) if f.endswith(".tmp")]  # no temporary file left over


# -- corruption -------------------------------------------------------------------------------------------
def write_cache(text) -> str:
    path = autotune.cache_file()
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb" if isinstance(text, bytes) else "w") as f:
        f.write(text)
    return path


@pytest.mark.parametrize("text", ["{not json", "", b"\x00\xff\xfe not utf-8", "[1, 2, 3]",
                                  '{"format": 99, "entries": {}}', '{"format": 1, "entries": []}'])
def test_corrupt_file_warns_once_and_is_rewritten(gpu_mode, text):
    write_cache(text)
    b = Bench()
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        assert sel(bench=b) == Config(32, 32, 16, 4, 2)
        sel(key=(9, 9, "other"), bench=b)
    assert len(cache_warnings(rec)) == 1
    data = cache_json()
    assert data["format"] == tune_cache.FORMAT and set(data["entries"]["fake_op"]) == {"1,2,k", "9,9,other"}


def test_bad_entries_are_dropped_good_ones_kept(gpu_mode):
    good = dict(Config(128, 32, 16, 4, 2).as_dict(), source="tuned", ms=0.5)
    bad = [
        dict(good, BLOCK_P="128"),               # a string
        dict(good, BLOCK_P=48),                  # not a power of two
        dict(good, num_warps=True),              # a bool
        dict(good, num_stages=99),               # out of range
        dict(good, ms=-1.0),                     # negative time
        dict(good, source="pickle"),             # unknown source
        dict(good, __reduce__="os.system"),      # unknown field
        {k: v for k, v in good.items() if k != "BLOCK_R"},  # missing field
        "BLOCK_P=128",                           # not an object
    ]
    table = {"1,2,k": good, **{f"bad{i}": e for i, e in enumerate(bad)}}
    write_cache(json.dumps({"format": 1, "entries": {"fake_op": table, "bad op!": {"x": good}}}))
    b = Bench()
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        assert sel(bench=b) == Config(128, 32, 16, 4, 2) and b.calls == []  # the valid entry is used
        sel(key=(5, 5, "new"), bench=b)  # a store rewrites the file without the bad entries
    assert len(cache_warnings(rec)) == 1
    assert set(cache_json()["entries"]) == {"fake_op"}
    assert set(cache_json()["entries"]["fake_op"]) == {"1,2,k", "5,5,new"}


# -- directories that cannot be written ------------------------------------------------------------------
# Tests run as root in CI, where chmod does not stop writes: the directory is made unusable by putting it
# under a regular file (mkdir fails with NotADirectoryError), or the final rename is made to fail.
def test_cache_dir_under_a_file_tunes_in_memory(gpu_mode, monkeypatch, tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    monkeypatch.setenv("GAM_TRITON_CACHE_DIR", str(blocker / "cache"))
    autotune.reset()
    b = Bench()
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        assert sel(bench=b) == Config(32, 32, 16, 4, 2)
        assert sel(bench=b) == Config(32, 32, 16, 4, 2)
        sel(key=(7, 7, "x"), bench=b)
    assert len(b.calls) == 8  # two keys tuned once each, kept in memory
    assert len(cache_warnings(rec)) == 1


def test_rename_permission_error_tunes_in_memory(gpu_mode, monkeypatch, cache_dir):
    def deny(*a, **k):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(tune_cache.os, "replace", deny)
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        assert sel() == Config(32, 32, 16, 4, 2)
        sel(key=(7, 7, "x"))
    assert len(cache_warnings(rec)) == 1
    assert not os.path.exists(autotune.cache_file())
    assert not [f for f in os.listdir(cache_dir) if f.endswith(".tmp")]  # the temporary file is removed


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() == 0,
                    reason="root ignores directory permissions (covered by the two tests above)")
def test_read_only_directory(gpu_mode, cache_dir):
    cache_dir.mkdir()
    cache_dir.chmod(stat.S_IRUSR | stat.S_IXUSR)
    try:
        with warnings.catch_warnings(record=True) as rec:
            warnings.simplefilter("always")
            assert sel() == Config(32, 32, 16, 4, 2)
        assert len(cache_warnings(rec)) == 1
    finally:
        cache_dir.chmod(stat.S_IRWXU)


# -- off switch ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("value", ["0", "off", "False"])
def test_off_switch_uses_heuristic_only(gpu_mode, monkeypatch, value):
    sel()  # a tuned entry is on disk
    before = cache_json()
    monkeypatch.setenv("GAM_TRITON_AUTOTUNE", value)
    autotune.reset()
    b = Bench()
    assert not autotune.enabled()
    assert sel(bench=b) == H and sel(key=(3, 3, "new"), bench=b) == H
    assert b.calls == [] and cache_json() == before  # nothing timed, nothing read or written


# -- keys ---------------------------------------------------------------------------------------------------
def test_batch_bucket():
    assert [autotune.batch_bucket(b, 400) for b in (1, 2, 3, 4, 5, 16, 17)] == [1, 2, 4, 4, 8, 16, 32]
    # 80 x 80 (6400 -> 8192 pixels): from 16 images on the GPU is full, bigger batches share the key
    assert {autotune.batch_bucket(b, 6400) for b in (16, 17, 32, 256)} == {16}
    assert autotune.batch_bucket(1, 1 << 20) == 1


def test_cache_path_is_per_device_triton_version_and_kernels(cache_dir):
    import triton

    src = tune_cache.kernels_hash()
    assert len(src) == 12 and int(src, 16) >= 0 and tune_cache.kernels_hash() == src
    path = tune_cache.cache_path("NVIDIA H100 80GB HBM3", triton.__version__, str(cache_dir))
    assert os.path.basename(path) == f"NVIDIA_H100_80GB_HBM3__triton-{triton.__version__}__kernels-{src}.json"
    assert autotune.cache_file().endswith(f"__kernels-{src}.json")
    assert tune_cache.sanitise("../../etc/passwd") == "etc_passwd"
    if not torch.cuda.is_available() or INTERPRET:
        assert os.path.basename(autotune.cache_file()).startswith("cpu-interpreter__triton-")


def test_kernel_edit_gets_a_new_file_and_old_files_stay(gpu_mode, monkeypatch, cache_dir):
    """A kernel edit (another source hash) does not serve the configs tuned for the old source; the old
    file is neither read nor deleted."""
    sel()
    old_file = autotune.cache_file()
    old_text = open(old_file).read()
    assert json.loads(old_text)["kernels"] == tune_cache.kernels_hash()
    monkeypatch.setattr(tune_cache, "_KERNELS_HASH", ["0123456789ab"])
    monkeypatch.setattr(autotune, "kernels_hash", tune_cache.kernels_hash)
    autotune.reset()
    b = Bench()
    assert sel(bench=b) == Config(32, 32, 16, 4, 2) and len(b.calls) == 4  # tuned again
    assert autotune.cache_file() != old_file and autotune.cache_file().endswith("__kernels-0123456789ab.json")
    assert open(old_file).read() == old_text


def test_kernels_hash_follows_the_source(tmp_path, monkeypatch):
    """The hash covers the kernels' *.py files: one byte changed, another hash (computed on a copy)."""
    import importlib.util
    import shutil

    src_dir = list(importlib.util.find_spec("gam_triton.kernels").submodule_search_locations)[0]
    copy = tmp_path / "kernels"
    shutil.copytree(src_dir, copy, ignore=shutil.ignore_patterns("__pycache__"))

    def hash_of(directory):
        spec = type("Spec", (), {"submodule_search_locations": [str(directory)]})()
        monkeypatch.setattr(importlib.util, "find_spec", lambda name: spec)
        monkeypatch.setattr(tune_cache, "_KERNELS_HASH", [])
        return tune_cache.kernels_hash()

    same = hash_of(copy)
    f = copy / "channel_gate.py"
    f.write_text(f.read_text() + "\n# an edit\n")
    assert hash_of(copy) != same
    monkeypatch.undo()
    assert same == tune_cache.kernels_hash()


def test_cache_and_memory_follow_the_tensors_device(gpu_mode, monkeypatch):
    """select(device=i) names the cache after device i, never the current device (a model on cuda:1)."""
    monkeypatch.setattr(autotune, "_has_cuda", lambda: True)
    monkeypatch.setattr(autotune, "_DEVICE_NAMES", {})
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda i: f"Fake GPU {i}")

    def no_current():
        raise AssertionError("the current device must not be asked when the tensors' device is known")

    monkeypatch.setattr(torch.cuda, "current_device", no_current)
    b0, b1 = Bench(), Bench(times={16: 1.0, 32: 3.0, 64: 2.0, 128: 4.0})  # device 1 prefers BLOCK_P=16
    assert autotune.select("fake_op", (1, 2, "k"), H, lambda: CANDS, b0, device=0).BLOCK_P == 32
    assert autotune.select("fake_op", (1, 2, "k"), H, lambda: CANDS, b1, device=1).BLOCK_P == 16
    assert len(b0.calls) == len(b1.calls) == 4  # one tuning per device, same key
    files = sorted(os.path.basename(autotune.cache_file(f"Fake GPU {i}")) for i in (0, 1))
    assert files[0].startswith("Fake_GPU_0__") and files[1].startswith("Fake_GPU_1__")
    assert all(os.path.exists(autotune.cache_file(f"Fake GPU {i}")) for i in (0, 1))


class FakeEvent:
    """torch.cuda.Event stand-in on a fake clock advanced by the timed function."""

    clock = [0.0]

    def __init__(self, enable_timing=False):
        self.t = None

    def record(self):
        self.t = FakeEvent.clock[0]

    def elapsed_time(self, end):
        return end.t - self.t


def test_bench_ms_reuses_one_flush_buffer(monkeypatch):
    """The timing loop (checked with stand-ins for the CUDA calls): one flush buffer per device for every
    candidate and key, zeroed before each timed call, the median of the timed calls."""
    allocated, zeroed = [], []

    class Buffer:
        def zero_(self):
            zeroed.append(1)

    def fake_alloc(index):
        allocated.append(index)
        return Buffer()

    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a: None)
    monkeypatch.setattr(torch.cuda, "Event", FakeEvent)
    monkeypatch.setattr(autotune, "_FLUSH", {})

    def flush_buffer(index):
        buf = autotune._FLUSH.get(index)
        if buf is None:
            buf = autotune._FLUSH[index] = fake_alloc(index)
        return buf

    monkeypatch.setattr(autotune, "flush_buffer", flush_buffer)
    durations = iter([0.5] * 10 + [0.2, 0.3, 0.1] * 1000)

    def fn():
        FakeEvent.clock[0] += next(durations)

    assert autotune.bench_ms(fn) == pytest.approx(0.2)  # median of 0.2 / 0.3 / 0.1 repeated
    zeroed_once = len(zeroed)
    assert autotune.bench_ms(lambda: None) == 0.0  # a second candidate: same buffer, timed calls capped
    assert allocated == [0] and len(zeroed) - zeroed_once == 5 + autotune.MAX_REPS


# -- failures while tuning ----------------------------------------------------------------------------------
def _raising(exc_by_block_p):
    """A bench that raises ``exc_by_block_p[cfg.BLOCK_P]`` when present, else returns TIMES."""
    calls = []

    def bench(cfg):
        calls.append(cfg)
        exc = exc_by_block_p.get(cfg.BLOCK_P)
        if exc is not None:
            raise exc
        return TIMES[cfg.BLOCK_P]

    bench.calls = calls
    return bench


def _compile_failures():
    from triton.compiler.errors import CompilationError
    from triton.runtime.errors import OutOfResources, PTXASError

    return [OutOfResources(232448, 101376, "shared memory"), PTXASError("ptxas fatal: too many registers"),
            CompilationError("src", None, "bad block shape"),
            RuntimeError("Triton Error [CUDA]: too many resources requested for launch")]


@pytest.mark.parametrize("i", range(4), ids=["OutOfResources", "PTXASError", "CompilationError", "launch-resources"])
def test_compile_failures_skip_the_candidate(gpu_mode, i):
    exc = _compile_failures()[i]
    assert autotune.failure_kind(exc) == "skip"
    b = _raising({32: exc})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert sel(bench=b) == H and len(b.calls) == 4  # 32 failed; 64 (the heuristic, 2 ms) wins
    assert cache_json()["entries"]["fake_op"]["1,2,k"]["source"] == "tuned"


@pytest.mark.parametrize("exc", [torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 256.00 MiB"),
                                 RuntimeError("Triton Error [CUDA]: out of memory")], ids=["torch", "triton"])
def test_out_of_memory_falls_back_to_the_heuristic_with_a_warning(gpu_mode, exc):
    b = _raising({16: exc})
    with pytest.warns(autotune.TuningWarning, match="out of GPU memory"):
        assert sel(bench=b) == H
    assert [c.BLOCK_P for c in b.calls] == [64, 16]  # tuning stopped at the failure
    assert not os.path.exists(autotune.cache_file())  # not stored: a later process tunes again
    rec, = autotune.drain_log()
    assert rec.source == "failed"
    assert sel(bench=b) == H and len(b.calls) == 2  # remembered for this process: no retry on every call


@pytest.mark.parametrize("exc", [RuntimeError("CUDA error: an illegal memory access was encountered"),
                                 RuntimeError("Triton Error [CUDA]: an illegal memory access was encountered")],
                         ids=["torch", "triton"])
def test_sticky_cuda_error_propagates(gpu_mode, exc):
    b = _raising({16: exc})
    with pytest.raises(RuntimeError, match="illegal memory access"):
        sel(bench=b)
    assert not os.path.exists(autotune.cache_file())


def test_accelerator_error_propagates(gpu_mode):
    accel = getattr(torch, "AcceleratorError", None)
    if accel is None:
        pytest.skip(f"torch {torch.__version__} has no torch.AcceleratorError")
    assert autotune.failure_kind(accel("unspecified launch failure")) == "fatal"


def test_unexpected_error_checks_the_device(gpu_mode, monkeypatch):
    """An exception that is neither a compile failure nor a CUDA error skips the candidate unless the device
    reports an error when synchronised (then that error propagates)."""
    b = _raising({16: ValueError("num_warps must be a power of 2")})
    assert sel(bench=b) == Config(32, 32, 16, 4, 2)

    def sticky():
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    monkeypatch.setattr(autotune, "check_device", sticky)
    with pytest.raises(RuntimeError, match="illegal memory access"):
        sel(key=(2, 2, "other"), bench=_raising({16: ValueError("odd")}))


def counting_bench_ms(monkeypatch):
    """Replace the real timer: run the launch once (so every candidate really executes), count, and make
    later candidates look faster so that a non-heuristic config wins."""
    calls = []

    def fake(fn):
        fn()
        calls.append(1)
        return 10.0 - len(calls) * 0.1

    monkeypatch.setattr(autotune, "bench_ms", fake)
    return calls


@needs_kernels
def test_key_bucketing_tunes_once_per_bucket_and_keeps_results(gpu_mode, monkeypatch, device):
    from gam_triton.channel_gate import channel_gate, channel_gate_torch

    calls = counting_bench_ms(monkeypatch)
    g = torch.Generator().manual_seed(0)
    w1, b1 = torch.randn(4, 16, generator=g).to(device), torch.randn(4, generator=g).to(device)
    w2, b2 = torch.randn(16, 4, generator=g).to(device), torch.randn(16, generator=g).to(device)

    def run(b, h, w):
        x = torch.randn(b, 16, h, w, generator=g).to(device)
        x0 = x.clone()
        out = channel_gate(x, w1, b1, w2, b2, True)
        torch.testing.assert_close(out, channel_gate_torch(x, w1, b1, w2, b2, True), rtol=1e-4, atol=1e-5)
        assert torch.equal(x, x0)  # timing the candidates did not touch the input
        return len(calls)

    n1 = run(3, 7, 7)
    assert n1 > 1
    assert run(4, 8, 8) == n1    # batch 3 -> 4 and 49 -> 64 pixels: the same bucket, no tuning
    n2 = run(4, 5, 6)            # 30 -> 32 pixels: a new bucket, tuned
    assert n2 > n1
    assert run(5, 8, 8) > n2     # batch 5 -> bucket 8: tuned again
    tuned = [r for r in autotune.drain_log() if r.source == "tuned"]
    assert any(r.config != channel_gate_heuristic(16, 4, 64, torch.float32) for r in tuned)


@needs_kernels
def test_fp32_precision_is_part_of_the_channel_gate_key(gpu_mode, monkeypatch, device):
    """A config tuned with ieee fp32 dots is not reused once the user allows TF32 (and back)."""
    from gam_triton import _runtime
    from gam_triton.channel_gate import channel_gate

    calls = counting_bench_ms(monkeypatch)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 16, 4, 4, generator=g).to(device)
    w1, b1 = torch.randn(4, 16, generator=g).to(device), torch.randn(4, generator=g).to(device)
    w2, b2 = torch.randn(16, 4, generator=g).to(device), torch.randn(16, generator=g).to(device)
    monkeypatch.setattr(_runtime, "fp32_matmul_allows_tf32", lambda: False)
    channel_gate(x, w1, b1, w2, b2, True)
    n = len(calls)
    channel_gate(x, w1, b1, w2, b2, True)
    assert len(calls) == n  # same precision: the tuned config is reused
    monkeypatch.setattr(_runtime, "fp32_matmul_allows_tf32", lambda: True)
    channel_gate(x, w1, b1, w2, b2, True)
    assert len(calls) > n  # TF32 allowed: another key, tuned anew
    keys = set(cache_json()["entries"]["channel_gate"])
    assert {k.rsplit(",", 1)[1] for k in keys} == {"ieee", "tf32"}


# -- guards -------------------------------------------------------------------------------------------------
def test_capture_guard_uses_heuristic_warns_once_and_tunes_later(gpu_mode, monkeypatch):
    monkeypatch.setattr(autotune, "capturing", lambda: True)
    b = Bench()
    with pytest.warns(autotune.CaptureWarning) as rec:
        assert sel(bench=b) == H and sel(bench=b) == H and sel(key=(2, 2, "z"), bench=b) == H
    assert len([w for w in rec if issubclass(w.category, autotune.CaptureWarning)]) == 1
    assert b.calls == [] and not os.path.exists(autotune.cache_file())
    monkeypatch.setattr(autotune, "capturing", lambda: False)
    assert sel(bench=b) == Config(32, 32, 16, 4, 2) and len(b.calls) == 4  # capture over: tuned


def test_capture_guard_uses_a_cached_config(gpu_mode, monkeypatch):
    sel()
    autotune.reset()
    monkeypatch.setattr(autotune, "capturing", lambda: True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert sel(bench=Bench()) == Config(32, 32, 16, 4, 2)


def test_fake_tensor_tracing_does_not_benchmark(gpu_mode):
    from torch._subclasses.fake_tensor import FakeTensorMode

    b = Bench()
    with FakeTensorMode():
        assert autotune.tracing()
        assert sel(bench=b) == H
    assert b.calls == [] and not os.path.exists(autotune.cache_file())
    assert not autotune.tracing()
    assert sel(bench=b) == Config(32, 32, 16, 4, 2)
    autotune.reset()
    with FakeTensorMode():
        assert sel(bench=b) == Config(32, 32, 16, 4, 2)  # a cached config is used while tracing


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or INTERPRET,
                    reason="CUDA-graph capture needs a GPU and compiled kernels (TRITON_INTERPRET unset)")
def test_graph_capture_guard_gpu(monkeypatch):
    from gam_triton.channel_gate import channel_gate, channel_gate_torch

    x = torch.randn(2, 32, 8, 8, device="cuda")
    w1, b1 = torch.randn(8, 32, device="cuda"), torch.randn(8, device="cuda")
    w2, b2 = torch.randn(32, 8, device="cuda"), torch.randn(32, device="cuda")
    monkeypatch.setenv("GAM_TRITON_AUTOTUNE", "0")
    autotune.reset()
    channel_gate(x, w1, b1, w2, b2, True)  # compile the heuristic config before capturing
    torch.cuda.synchronize()
    monkeypatch.delenv("GAM_TRITON_AUTOTUNE")
    autotune.reset()
    graph = torch.cuda.CUDAGraph()
    with pytest.warns(autotune.CaptureWarning):
        with torch.cuda.graph(graph):
            out = channel_gate(x, w1, b1, w2, b2, True)
    graph.replay()
    torch.cuda.synchronize()
    torch.testing.assert_close(out, channel_gate_torch(x, w1, b1, w2, b2, True), rtol=1e-2, atol=1e-2)
    assert not os.path.exists(autotune.cache_file())  # nothing tuned or stored during the capture
    channel_gate(x, w1, b1, w2, b2, True)  # eager again: tunes and stores
    assert [r.source for r in autotune.drain_log()][-1] == "tuned"
    assert "channel_gate" in cache_json()["entries"]


# -- end to end ---------------------------------------------------------------------------------------------
@needs_kernels
def test_gam_fills_the_cache_then_reads_it(cpu_mode, device):
    from gam_triton import GAM

    gam = GAM(16).to(device).eval()
    x = torch.randn(2, 16, 6, 5, device=device)
    with torch.no_grad():
        y = gam(x)
    entries = cache_json()["entries"]
    assert set(entries) >= {"channel_gate", "final_gate"}
    assert all(e["source"] == "heuristic" for t in entries.values() for e in t.values())
    assert {r.source for r in autotune.drain_log()} == {"heuristic"}
    autotune.reset()  # a new process, in effect
    with torch.no_grad():
        torch.testing.assert_close(gam(x), y)
    assert {r.source for r in autotune.drain_log()} == {"cache"}


# -- candidates ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("c,cr,hw", [(16, 4, 64), (24, 6, 400), (128, 32, 6400), (576, 144, 400),
                                     (1024, 256, 1600), (3, 1, 5)])
def test_candidates_are_pruned_by_shape(c, cr, hw):
    for dtype in (torch.float32, torch.bfloat16):
        cands = channel_gate_candidates(c, cr, hw, dtype)
        assert 1 <= len(cands) <= MAX_CANDIDATES and len(set(cands)) == len(cands)
        for k in cands:
            assert k.BLOCK_R == max(16, next_pow2(cr)) and k.BLOCK_R >= cr
            assert 16 <= k.BLOCK_P <= max(16, next_pow2(hw)) and 16 <= k.BLOCK_C <= max(16, next_pow2(c))
            assert tune_cache.validate_entry(k.as_dict()) is not None
        assert tune_cache.validate_entry(channel_gate_heuristic(c, cr, hw, dtype).as_dict()) is not None
    for cl in (False, True):
        cands = elementwise_candidates(c, hw, cl)
        assert 1 <= len(cands) <= MAX_CANDIDATES
        assert all(k.BLOCK_P <= max(16, next_pow2(hw)) and k.BLOCK_C <= max(16, next_pow2(c)) for k in cands)
        assert elementwise_heuristic(c, hw, cl).BLOCK_R == 0


# -- the pre-tuning command ---------------------------------------------------------------------------------
@pytest.mark.parametrize("argv", [
    [], ["--channels", "32"], ["--channels", "0", "--sizes", "8"], ["--channels", "32", "--sizes", "8x"],
    ["--channels", "32", "--sizes", "8", "--dtype", "int8"],
    ["--channels", "30", "--sizes", "8", "--shuffle", "4"],
    ["--channels", "3", "--sizes", "8", "--rate", "4"], ["--channels", "32", "--sizes", "8", "--amp"],
])
def test_tune_cli_rejects_bad_arguments(argv, capsys):
    from gam_triton import tune

    with pytest.raises(SystemExit) as e:
        tune.parse_args(argv)
    assert e.value.code == 2 and "error:" in capsys.readouterr().err


def test_tune_cli_fills_the_cache(cpu_mode, capsys, cache_dir):
    from gam_triton import tune

    status = tune.main(["--channels", "16", "--sizes", "4", "3x5", "--batch", "2", "--train"])
    out = capsys.readouterr().out
    if not KERNELS_RUN:  # no GPU and no interpreter: it refuses, clearly
        assert status == 2
        return
    assert status == 0
    assert "[1/2] C=16 r=4 4x4 B=2" in out and "[2/2]" in out and "channel_gate" in out
    assert set(cache_json()["entries"]) == {"channel_gate", "final_gate", "bn_relu",  # and the training path's:
                                            "bn_stats", "bn_bwd_reduce", "bn_bwd_apply", "channel_gate_bwd"}


@needs_kernels
def test_tune_cli_reports_tuning(gpu_mode, monkeypatch, capsys):
    from gam_triton import tune

    counting_bench_ms(monkeypatch)
    assert tune.main(["--channels", "16", "--sizes", "4", "--batch", "1", "--layout", "channels_last"]) == 0
    out = capsys.readouterr().out
    assert "(tuned, " in out and "| kernel | key | tuned config |" in out and "| channel_gate |" in out
    entries = cache_json()["entries"]
    assert entries["channel_gate"] and all(e["source"] == "tuned" for e in entries["channel_gate"].values())


def test_tune_cli_off_switch(monkeypatch, capsys):
    from gam_triton import tune

    monkeypatch.setenv("GAM_TRITON_AUTOTUNE", "0")
    assert tune.main(["--channels", "16", "--sizes", "4"]) == 2
    assert "off" in capsys.readouterr().err
