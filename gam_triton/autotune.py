"""Autotuner: the launch configuration of each kernel per shape key, tuned once, remembered across runs.

:func:`select` is what the launch functions call, inside their ``torch.library.triton_op`` bodies::

    cfg = autotune.select(op, key, heuristic, candidates, bench)

Decision, in order (the first step is the hot path: one dict lookup per call, no disk access):

1. ``GAM_TRITON_AUTOTUNE=0`` (or false/off/no): the heuristic, always. The cache is neither read nor written:
   "heuristic configs only" means a tuned entry left by another run is not used either.
2. The in-memory table of this process, keyed by (device, op, key).
3. The disk cache (:mod:`gam_triton.tune_cache`), read once per process; on a miss it is re-read before
   tuning, so a result another process wrote meanwhile is used instead of tuning again.
4. Still a miss:

   * on a GPU, eager, real tensors: benchmark the heuristic and the candidates with :func:`bench_ms`
     (do_bench's method with one reused L2-flush buffer, 5 ms warm-up, 25 ms of repetitions, median), skip
     those that fail to compile (OutOfResources, CompilationError, PTXASError; :func:`failure_kind`), keep the
     fastest (ties within 2 % go to the heuristic), store it with its time, the heuristic's time and the
     tuning time. Running out of GPU memory stops the tuning: the heuristic is used (not stored) with a
     :class:`TuningWarning`; any other CUDA error (an illegal address: the context is lost) propagates.
     The callers' ``bench`` closures launch on the call's real tensors: the kernels only read their inputs
     and write the output buffer, which the final launch overwrites, so tuning does not change any result;
   * without a GPU (``TRITON_INTERPRET=1`` on the CPU): the heuristic, stored in the cache all the same
     (``"source": "heuristic"``) so that CI runs the whole cache machinery;
   * inside CUDA-graph capture (tuning would launch kernels into the graph and break it) or while
     torch.compile / FakeTensor tracing (the tensors hold no data): the heuristic, not stored, so the next
     eager call tunes. Capture warns once per process (pre-tune with ``python -m gam_triton.tune`` or run one
     eager step first); tracing does not warn (torch.compile bakes the config chosen at trace time into the
     graph: fill the cache before compiling to get tuned configs there).

``GAM_TRITON_AUTOTUNE`` and ``GAM_TRITON_CACHE_DIR`` are read at the first call; :func:`reset` forgets the
process's state and re-reads them. Several processes (DDP ranks) may tune the same key at once, each on its
own GPU: each uses its own winner and the file keeps the last one written.

Entries are re-validated against the current code when first read: a ``heuristic`` entry must equal the
current heuristic, a ``tuned`` one must be the heuristic or among the current candidates; on a GPU a
``heuristic`` entry counts as a miss (it is tuned and replaced).

The key. The launch functions build it from what changes the best tile: C, C/r, the dtypes, the layouts of
inputs and output, the shuffle groups, the pixel count H*W rounded up to a power of two, and
:func:`batch_bucket` of the batch size. The batch does matter: a small B*H*W leaves most of the GPU idle and
favours smaller tiles (20x20 at B=1 is 7 programs of 64 pixels), so the batch is bucketed to a power of two,
capped where B*HW reaches ``WORK_CAP`` = 2**17 pixels (a thousand 128-pixel programs, several waves on an
H100): past it the GPU is full and a bigger batch reuses the same tuning. Shapes in one bucket share one
tuning.

What Triton's own autotuner (``triton.autotune``) does not do, and this module does: a cache per GPU name and
Triton version under a directory the user controls, shared by processes with atomic merged writes; keys
bucketed (Triton keys on exact argument values, so H*W = 6400 and 6000 would tune twice); a heuristic path
for the interpreter (its benchmarker needs a GPU driver); no tuning inside CUDA-graph capture or on fake
tensors; an off switch; configs read in plain JSON. Used from Triton: ``do_bench``'s timing method (with L2 flush),
its compile errors for pruning what cannot compile, its version in the cache name. The cache file is also
keyed on a hash of the kernels' source (:func:`gam_triton.tune_cache.kernels_hash`), and on the GPU name of the
tensors' device (a model on cuda:1 uses cuda:1's name and is tuned there).
"""
from __future__ import annotations

import collections
import logging
import math
import os
import threading
import time
import warnings
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch

from ._runtime import INTERPRET
from .configs import Config, next_pow2
from .tune_cache import TuneCache, cache_dir, cache_path, kernels_hash

__all__ = ["select", "bench_ms", "batch_bucket", "enabled", "reset", "drain_log", "cache_file",
           "TuneRecord", "CaptureWarning", "TuningWarning", "WORK_CAP", "CPU_DEVICE"]

log = logging.getLogger(__name__)

#: Bucketed batch x bucketed pixels beyond which a bigger batch shares the key (see the module docstring).
WORK_CAP = 1 << 17
#: Device name of the interpreter (and of any process without CUDA) in the cache file name.
CPU_DEVICE = "cpu-interpreter"
#: do_bench budgets per candidate, in ms: a shape tunes in well under a second once the kernels are compiled.
WARMUP_MS = 5
REP_MS = 25
#: A candidate must beat the heuristic by more than this factor to replace it (timing noise).
TIE = 1.02
#: At most this many warm-up or timed calls per candidate (kernels of a few microseconds).
MAX_REPS = 1000


class CaptureWarning(UserWarning):
    """A kernel met a shape with no tuned config during CUDA-graph capture; the heuristic one was used."""


class TuningWarning(UserWarning):
    """Tuning a shape ran out of GPU memory; the heuristic config is used for it in this process."""


@dataclass(frozen=True)
class TuneRecord:
    """How one (op, key) got its config in this process.

    ``source``: ``tuned`` (timed here), ``heuristic`` (no GPU: stored untimed), ``cache`` (read from the
    file), ``fallback`` (capture or tracing: heuristic, not stored) or ``failed`` (no config ran: heuristic).
    """

    op: str
    key: str
    config: Config
    source: str
    ms: Optional[float] = None
    heuristic_ms: Optional[float] = None
    tune_s: Optional[float] = None
    candidates: int = 0
    failed: int = 0

    @property
    def speedup(self) -> Optional[float]:
        """Heuristic time over chosen time (1.0 when the heuristic won), when both were measured."""
        if self.ms and self.heuristic_ms:
            return self.heuristic_ms / self.ms
        return None


def batch_bucket(batch: int, hw: int) -> int:
    """The batch size as it enters the key: next power of two, capped at WORK_CAP // next_pow2(hw)."""
    return min(next_pow2(batch), max(1, WORK_CAP // next_pow2(hw)))


def enabled() -> bool:
    """False when ``GAM_TRITON_AUTOTUNE`` is 0 / false / off / no (read once; :func:`reset` re-reads)."""
    return _state().enabled


def bench_ms(fn: Callable[[], object]) -> float:
    """Median time of ``fn()`` in ms on the current CUDA device, L2 flushed before each call.

    What ``triton.testing.do_bench`` does (an estimate from 5 calls, ``WARMUP_MS`` of warm-up, ``REP_MS`` of
    timed calls between CUDA events), without its 256 MB flush buffer allocated anew on every call (Triton
    3.4 to 3.9): the buffer of :func:`flush_buffer` is allocated once per device and reused. The launch
    functions call it inside ``torch.cuda.device(x.device)``, so the current device is the tensors'.
    """
    buf = flush_buffer(torch.cuda.current_device())
    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(5):
        buf.zero_()
        fn()
    end.record()
    torch.cuda.synchronize()
    est = max(start.elapsed_time(end) / 5, 1e-3)  # includes the flush: the repetition counts err low
    n_warmup = max(1, min(MAX_REPS, int(WARMUP_MS / est)))
    n_rep = max(1, min(MAX_REPS, int(REP_MS / est)))
    for _ in range(n_warmup):
        fn()
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(n_rep)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(n_rep)]
    for i in range(n_rep):
        buf.zero_()
        starts[i].record()
        fn()
        ends[i].record()
    torch.cuda.synchronize()
    times = sorted(a.elapsed_time(b) for a, b in zip(starts, ends))
    mid = len(times) // 2
    return float(times[mid] if len(times) % 2 else (times[mid - 1] + times[mid]) / 2)


_FLUSH: dict[int, torch.Tensor] = {}


def flush_buffer(index: int) -> torch.Tensor:
    """The L2-flush buffer of CUDA device ``index`` (zeroed before each timed call): twice the L2 cache
    (at least 16 MB; Triton's 256 MB where the size is unknown), allocated at the first tuning on that
    device and kept (tens of MB: 100 MB on an H100); :func:`reset` releases it."""
    buf = _FLUSH.get(index)
    if buf is None:
        l2 = getattr(torch.cuda.get_device_properties(index), "L2_cache_size", 0) or 0
        nbytes = min(256 << 20, max(16 << 20, 2 * l2)) if l2 > 0 else 256 << 20
        buf = _FLUSH[index] = torch.empty(nbytes // 4, dtype=torch.int32, device=torch.device("cuda", index))
    return buf


# -- policy hooks (module functions so that tests can monkeypatch them) -------------------------------------
def can_benchmark() -> bool:
    """True where kernels can be timed: a CUDA device and no interpreter."""
    return not INTERPRET and torch.cuda.is_available()


def capturing() -> bool:
    """True while the current CUDA stream is capturing a graph."""
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


def tracing() -> bool:
    """True under torch.compile / export tracing or a FakeTensor / functionalization / proxy mode."""
    if torch.compiler.is_compiling():
        return True
    try:
        from torch._guards import detect_fake_mode

        if detect_fake_mode() is not None:
            return True
        from torch._subclasses.fake_tensor import FakeTensorMode
        from torch._subclasses.functional_tensor import FunctionalTensorMode
        from torch.fx.experimental.proxy_tensor import ProxyTorchDispatchMode
        from torch.utils._python_dispatch import _get_current_dispatch_mode_stack

        kinds = (FakeTensorMode, FunctionalTensorMode, ProxyTorchDispatchMode)
        return any(isinstance(m, kinds) for m in _get_current_dispatch_mode_stack())
    except ImportError:  # pragma: no cover - private APIs moved: is_compiling() still covers torch.compile
        return False


def device_name(index: Optional[int] = None) -> str:
    """The name the cache file is keyed on: the name of CUDA device ``index`` (default: the current one;
    the launch functions pass their tensors' device), or CPU_DEVICE without CUDA or under the interpreter."""
    if not _has_cuda():
        return CPU_DEVICE
    if index is None:
        index = torch.cuda.current_device()
    name = _DEVICE_NAMES.get(index)
    if name is None:
        name = _DEVICE_NAMES[index] = torch.cuda.get_device_name(index)
    return name


_DEVICE_NAMES: dict[int, str] = {}
_HAS_CUDA: list[bool] = []


def _has_cuda() -> bool:
    """CUDA present and not interpreting (asked once: the hot path calls it)."""
    if not _HAS_CUDA:
        _HAS_CUDA.append(not INTERPRET and torch.cuda.is_available())
    return _HAS_CUDA[0]


# -- process state ------------------------------------------------------------------------------------------
class _State:
    def __init__(self) -> None:
        flag = os.environ.get("GAM_TRITON_AUTOTUNE", "1").strip().lower()
        self.enabled = flag not in ("0", "false", "off", "no")
        self.directory = cache_dir()
        self.memory: dict[tuple, Config] = {}      # (device, op, key) -> config: the hot path
        self.fallback: dict[tuple, Config] = {}    # heuristic used while tracing / capturing (not cached)
        self.caches: dict[str, TuneCache] = {}     # device -> its cache file
        self.warned: set[str] = set()
        self.lock = threading.RLock()
        self.log: collections.deque[TuneRecord] = collections.deque(maxlen=4096)

    def cache(self, device: str) -> TuneCache:
        c = self.caches.get(device)
        if c is None:
            import triton

            version, src = triton.__version__, kernels_hash()
            c = self.caches[device] = TuneCache(cache_path(device, version, self.directory, src), device, version,
                                                src)
        return c


_STATE: Optional[_State] = None


def _state() -> _State:
    global _STATE
    st = _STATE
    if st is None:
        st = _STATE = _State()
    return st


def reset() -> None:
    """Forget everything this process knows (memory table, loaded files, warnings, flush buffers) and
    re-read the env."""
    global _STATE
    _STATE = None
    _FLUSH.clear()


def cache_file(device: Optional[str] = None) -> str:
    """Path of the cache file that this process uses for ``device`` (default: the current one)."""
    return _state().cache(device or device_name()).path


def drain_log() -> list[TuneRecord]:
    """The :class:`TuneRecord` of every config resolved (not found in memory) since the last drain."""
    st = _state()
    with st.lock:
        out = list(st.log)
        st.log.clear()
    return out


def key_string(key: tuple) -> str:
    """The key as stored in the JSON file: its items' str() joined by commas."""
    return ",".join(str(v) for v in key)


# -- the entry point ---------------------------------------------------------------------------------------
def select(op: str, key: tuple, heuristic: Config, candidates: Callable[[], Sequence[Config]],
           bench: Optional[Callable[[Config], float]], device: Optional[int] = None) -> Config:
    """Return the configuration to launch ``op`` with for shape ``key`` (see the module docstring).

    ``candidates()`` is called only when tuning or validating a cached entry; ``bench(cfg)`` (time in ms, may
    raise for a config that cannot compile) only when tuning, on the current device (the launch functions
    call ``select`` inside ``torch.cuda.device`` of their tensors). ``key`` must be a hashable tuple of ints,
    bools and strings. ``device``: the CUDA index of the tensors (:func:`gam_triton._runtime.device_index`),
    whose GPU name picks the cache file; None: the current device.
    """
    st = _STATE or _state()
    if not st.enabled:
        return heuristic
    dev = device_name(device)
    cfg = st.memory.get((dev, op, key))
    if cfg is not None:
        return cfg
    with st.lock:
        return _resolve(st, dev, op, key, heuristic, candidates, bench)


def _resolve(st: _State, dev: str, op: str, key: tuple, heuristic: Config,
             candidates: Callable[[], Sequence[Config]], bench) -> Config:
    mk = (dev, op, key)
    cfg = st.memory.get(mk)  # another thread may have resolved it
    if cfg is not None:
        return cfg
    if capturing():
        mode = "capture"
    elif tracing():
        mode = "trace"
    else:
        mode = "bench" if (bench is not None and can_benchmark()) else "heuristic"
    if mode != "bench" and mk in st.fallback:
        return st.fallback[mk]
    ks = key_string(key)
    cache = st.cache(dev)
    cand_list: list[Config] = []

    def cached() -> Optional[Config]:
        entry = cache.lookup(op, ks)
        if entry is None:
            return None
        c = Config.from_dict(entry)
        if entry["source"] == "heuristic":
            ok = mode != "bench" and c == heuristic
        else:
            if not cand_list:
                cand_list.extend(candidates())
            ok = c == heuristic or c in cand_list
        return c if ok else None

    cfg = cached()
    if cfg is None:
        cache.reload()  # another process may have tuned this key meanwhile
        cfg = cached()
    if cfg is not None:
        st.memory[mk] = cfg
        st.log.append(TuneRecord(op, ks, cfg, "cache"))
        return cfg

    if mode in ("capture", "trace"):
        if mode == "capture" and "capture" not in st.warned:
            st.warned.add("capture")
            warnings.warn(f"gam_triton: {op} met shape key ({ks}) during CUDA-graph capture with no tuned "
                          "config; using the heuristic one (tuning cannot run inside a capture). Run one "
                          "eager step before capturing, or pre-tune with `python -m gam_triton.tune`.",
                          CaptureWarning, stacklevel=3)
        elif mode == "trace" and can_benchmark():
            log.info("gam_triton: %s (%s) traced with no tuned config: the heuristic is compiled in", op, ks)
        st.fallback[mk] = heuristic
        st.log.append(TuneRecord(op, ks, heuristic, "fallback"))
        return heuristic

    if mode == "bench":
        if not cand_list:
            cand_list.extend(candidates())
        rec = _tune(op, ks, heuristic, cand_list, bench)
    else:
        rec = TuneRecord(op, ks, heuristic, "heuristic")
    entry = rec.config.as_dict()
    entry["source"] = "tuned" if rec.source == "tuned" else "heuristic"
    for name in ("ms", "heuristic_ms", "tune_s"):
        v = getattr(rec, name)
        if v is not None:
            entry[name] = v
    if rec.source == "tuned":
        entry["candidates"] = rec.candidates
    st.memory[mk] = rec.config
    st.log.append(rec)
    if rec.source == "tuned" or mode == "heuristic":  # a failed tuning is not persisted
        cache.store(op, ks, entry)
    return rec.config


def _tune(op: str, ks: str, heuristic: Config, cands: Sequence[Config],
          bench: Callable[[Config], float]) -> TuneRecord:
    """Time the heuristic and every candidate; the fastest that ran (ties to the heuristic)."""
    t0 = time.perf_counter()
    todo = list(dict.fromkeys([heuristic, *cands]))
    if len(todo) == 1:  # nothing to choose from: no timing needed
        return TuneRecord(op, ks, heuristic, "tuned", tune_s=0.0, candidates=1)
    times: dict[Config, float] = {}
    failed = 0
    for cfg in todo:
        try:
            ms = float(bench(cfg))
        except Exception as e:  # noqa: BLE001 - sorted below: skipped, fallback or raised
            kind = failure_kind(e)
            if kind == "fatal":
                raise
            if kind == "oom":
                _FLUSH.clear()
                warnings.warn(f"gam_triton: out of GPU memory while tuning {op} ({ks}) at {cfg}: {_first_line(e)}; "
                              "using the heuristic config for this shape in this process (not stored)",
                              TuningWarning, stacklevel=4)
                return TuneRecord(op, ks, heuristic, "failed", tune_s=time.perf_counter() - t0,
                                  candidates=len(todo), failed=failed + 1)
            check_device()  # a sticky error behind an unexpected exception propagates from here
            log.debug("gam_triton: %s %s: %s failed: %s", op, ks, cfg, e)
            failed += 1
            continue
        if math.isfinite(ms) and ms > 0:
            times[cfg] = ms
        else:
            failed += 1
    tune_s = time.perf_counter() - t0
    if not times:
        log.warning("gam_triton: tuning %s (%s) failed for all %d configs; using the heuristic", op, ks,
                    len(todo))
        return TuneRecord(op, ks, heuristic, "failed", tune_s=tune_s, candidates=len(todo), failed=failed)
    best = min(times, key=times.__getitem__)
    h_ms = times.get(heuristic)
    if h_ms is not None and h_ms <= times[best] * TIE:
        best = heuristic
    rec = TuneRecord(op, ks, best, "tuned", ms=times[best], heuristic_ms=h_ms, tune_s=tune_s,
                     candidates=len(todo), failed=failed)
    log.info("gam_triton: tuned %s (%s) in %.2f s over %d configs: %s%s", op, ks, tune_s, len(todo), best,
             f" ({rec.speedup:.2f}x over the heuristic)" if rec.speedup else "")
    return rec


# -- failures while tuning ----------------------------------------------------------------------------------
def _compile_errors() -> tuple:
    """Triton's compile-time failures of one config (a config that does not fit: skip it)."""
    errors = []
    try:
        from triton.runtime import errors as runtime_errors

        errors += [getattr(runtime_errors, n) for n in ("OutOfResources", "PTXASError") if hasattr(runtime_errors, n)]
    except ImportError:  # pragma: no cover
        pass
    try:
        from triton.compiler.errors import CompilationError

        errors.append(CompilationError)
    except ImportError:  # pragma: no cover
        pass
    return tuple(errors)


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}"[:200]


def failure_kind(e: BaseException) -> str:
    """How tuning treats an exception from timing one config.

    * ``"skip"``: the config cannot run here; the next one is timed. Triton's compile failures
      (OutOfResources, CompilationError, PTXASError), a launch asking for too many registers
      ("too many resources requested for launch", which leaves the context usable), and other exceptions
      that leave the device usable (:func:`check_device` decides);
    * ``"oom"``: out of GPU memory (``torch.OutOfMemoryError`` or a CUDA/Triton "out of memory"): tuning stops
      and the heuristic is used, with a :class:`TuningWarning`;
    * ``"fatal"``: any other CUDA error (an illegal address, a launch failure, ``torch.AcceleratorError``):
      re-raised, as the CUDA context is unusable (sticky errors) and the user must see it.
    """
    oom_types = tuple(t for t in (getattr(torch, "OutOfMemoryError", None),
                                  getattr(torch.cuda, "OutOfMemoryError", None)) if t is not None)
    if oom_types and isinstance(e, oom_types):
        return "oom"
    if isinstance(e, _compile_errors()):
        return "skip"
    text = str(e)
    low = text.lower()
    if "out of memory" in low and ("cuda" in low or "triton error" in low):
        return "oom"
    if "too many resources requested for launch" in low:
        return "skip"
    accel = getattr(torch, "AcceleratorError", None)
    if (accel is not None and isinstance(e, accel)) or "CUDA error" in text or "Triton Error [CUDA]" in text \
            or "CUDA_ERROR" in text:
        return "fatal"
    return "skip"


def check_device() -> None:
    """Synchronise the current CUDA device (where kernels can run): a sticky CUDA error raises here."""
    if can_benchmark() and torch.cuda.is_available():
        torch.cuda.synchronize()
