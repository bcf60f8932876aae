"""The tuner: each kernel's launch choice per shape key, tuned once on the GPU, remembered across runs.

A choice is a ``triton.Config`` (the kernel's own constexpr names) or a path name ("cudnn", "triton", ...).
Ops call ``select(op, key(...), heuristic, candidates, bench)`` inside their launch functions, under their
tensors' device (``_runtime.entry``). In order:

1. ``GAM_TRITON_AUTOTUNE=0`` (false/off/no): the heuristic; the cache is neither read nor written.
2. The process's memory table, keyed (GPU name, op, key): the hot path, one dict lookup.
3. The cache file, read once and re-read on a miss (another process may have tuned the key). An entry is
   used only if it equals the heuristic or a current candidate; on a GPU an untimed entry is a miss.
4. On a GPU, eager, real tensors: the heuristic and the candidates timed (``triton.testing.do_bench``, L2
   flushed, median); the fastest kept, ties within 2 % to the heuristic. Skipped: a candidate whose kernel
   spills registers on this GPU (Triton reports it per compiled kernel), fails to compile or launch, or
   disagrees with a reference (:func:`checked`). Out of GPU memory: the heuristic, not stored
   (:class:`TuningWarning`); any other CUDA error is raised. Without a GPU (the interpreter) the heuristic
   is stored untimed. In CUDA-graph capture (warned once) or tracing: the heuristic, not stored.

The file, ``$GAM_TRITON_CACHE_DIR/<gpu>__triton-<version>__kernels-<hash>.json`` (default directory
``~/.cache/gam_triton``; the hash covers the kernels' source), is parsed with ``json.loads`` and decoded
strictly (nothing in it is executed); a corrupt or oversized one warns once (:class:`CacheWarning`) and is
rewritten. A store merges under ``flock`` through a temporary file, fsync and ``os.replace``, so processes
keep each other's entries; an unwritable directory warns once and results stay in memory.
"""
from __future__ import annotations

import collections
import contextlib
import hashlib
import json
import logging
import math
import os
import re
import tempfile
import threading
import time
import warnings
from dataclasses import dataclass
from typing import Callable, Optional, Sequence, Union

import torch
import triton
from triton.testing import do_bench

from .. import kernels
from ._runtime import INTERPRET, is_channels_last, next_pow2

try:  # POSIX advisory locks; elsewhere concurrent writers may drop each other's new entries
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

log = logging.getLogger(__name__)
Choice = Union[triton.Config, str]
WORK_CAP = 1 << 17          # bucketed batch x pixels past which a bigger batch shares the key (GPU full)
CPU_DEVICE = "cpu-interpreter"
WARMUP_MS, REP_MS, TIE = 5, 25, 1.02
MAX_CANDIDATES = 12         # timed besides the heuristic (:func:`nearest`)
FORMAT = 2                  # of the cache file; files of another format are ignored, then rewritten
MAX_FILE_BYTES = 16 << 20
_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_.:-]{0,63}$")
_META = {"source", "ms", "heuristic_ms", "tune_s", "candidates"}


class CaptureWarning(UserWarning):
    """A kernel met an untuned shape during CUDA-graph capture; the heuristic was used."""


class TuningWarning(UserWarning):
    """Tuning a shape ran out of GPU memory; the heuristic is used for it in this process."""


class CacheWarning(UserWarning):
    """The tuning cache could not be read or written; gam_triton carries on without it."""


class CandidateMismatchWarning(UserWarning):
    """A tuning candidate was dropped: its output disagreed with the reference path's."""


class Rejected(RuntimeError):
    """A candidate that runs but must not be chosen (it spills, or its output is wrong): skipped."""


@dataclass(frozen=True)
class TuneRecord:
    """How (op, key) got its choice: ``tuned`` (timed here), ``heuristic`` (no GPU: stored untimed),
    ``cache`` (from the file), ``fallback`` (capture or tracing) or ``failed`` (nothing ran: heuristic)."""

    op: str
    key: str
    choice: Choice
    source: str
    ms: Optional[float] = None
    heuristic_ms: Optional[float] = None
    tune_s: Optional[float] = None
    candidates: int = 0
    failed: int = 0

    @property
    def speedup(self) -> Optional[float]:
        """Heuristic time over chosen time, when both were measured."""
        return self.heuristic_ms / self.ms if self.ms and self.heuristic_ms else None


# --- choices and keys --------------------------------------------------------------------------------------
def encode(choice: Choice) -> dict:
    """``{"path": name}`` or ``{"config": {constexprs..., "num_warps": w, "num_stages": s}}``."""
    if isinstance(choice, str):
        return {"path": choice}
    return {"config": {**choice.kwargs, "num_warps": choice.num_warps, "num_stages": choice.num_stages}}


def decode(entry) -> Optional[Choice]:
    """The choice in a cache entry, or None unless it is exactly a valid one."""
    if not isinstance(entry, dict) or len(set(entry) - _META) != 1:
        return None
    if "path" in entry:
        return entry["path"] if isinstance(entry["path"], str) and _NAME.match(entry["path"]) else None
    cfg = entry.get("config")
    if not isinstance(cfg, dict) or not {"num_warps", "num_stages"} <= set(cfg) or not all(
            isinstance(k, str) and k.isidentifier() and type(v) is int and 0 <= v <= 1 << 16 for k, v in cfg.items()):
        return None
    kw = {k: v for k, v in cfg.items() if k not in ("num_warps", "num_stages")}
    return triton.Config(kw, num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])


def ident(choice: Choice) -> tuple:
    """A hashable identity of a choice (``triton.Config`` compares by identity before Triton 3.5)."""
    if isinstance(choice, str):
        return ("path", choice)
    return ("config", tuple(sorted(choice.kwargs.items())), choice.num_warps, choice.num_stages)


def describe(choice: Choice) -> str:
    """``BLOCK_P=64 BLOCK_C=64 w4 s2``, or the path name."""
    if isinstance(choice, str):
        return choice
    return " ".join(f"{k}={v}" for k, v in choice.kwargs.items()) + f" w{choice.num_warps} s{choice.num_stages}"


def pixels(batch: int, hw: int) -> tuple[int, int]:
    """How the map and the batch enter a key: H*W to the next power of two, and the batch to the next power
    of two capped at WORK_CAP // that (a small B*H*W favours small tiles; past the cap the GPU is full)."""
    p = next_pow2(hw)
    return p, min(next_pow2(batch), max(1, WORK_CAP // p))


def key(shape: tuple, *tensors: torch.Tensor, precision: Optional[str]) -> tuple:
    """A tuning key: ``shape`` (ints, bools, strings), the dtype and layout of each of ``tensors``, and the
    fp32 dot precision the kernel runs with: required, None only for kernels without a dot."""
    parts = [*shape]
    for t in tensors:
        parts += [str(t.dtype).replace("torch.", ""), is_channels_last(t)]
    return (*parts, precision or "-")


def key_string(k: tuple) -> str:
    """The key as the file stores it: its items' str() joined by commas."""
    return ",".join(str(v) for v in k)


def nearest(cands: Sequence[triton.Config], ref: triton.Config, limit: int = MAX_CANDIDATES) -> list:
    """The ``limit`` candidates closest to ``ref``: log2 steps of its blocks, then warps and stages."""
    def dist(c: triton.Config) -> tuple:
        lg = lambda v: max(1, int(v)).bit_length()  # noqa: E731
        d = sum(abs(lg(c.kwargs[k]) - lg(ref.kwargs[k])) for k in ref.kwargs if k in c.kwargs)
        return (d + 0.5 * abs(lg(c.num_warps) - lg(ref.num_warps)) + 0.25 * abs(c.num_stages - ref.num_stages),
                ident(c))

    return sorted(cands, key=dist)[:limit]


# --- where we are ------------------------------------------------------------------------------------------
_CAN_BENCH: list = []
_DEVICE_NAMES: dict = {}


def _cuda() -> bool:
    """A CUDA device and no interpreter (asked once)."""
    if not _CAN_BENCH:
        _CAN_BENCH.append(not INTERPRET and torch.cuda.is_available())
    return _CAN_BENCH[0]


def can_benchmark() -> bool:
    """True where kernels can be timed: a CUDA device and no interpreter."""
    return _cuda()


def capturing() -> bool:
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


def tracing() -> bool:
    """True under torch.compile / export tracing or a FakeTensor / functionalization / proxy mode."""
    if torch.compiler.is_compiling():
        return True
    from torch._guards import detect_fake_mode
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch._subclasses.functional_tensor import FunctionalTensorMode
    from torch.fx.experimental.proxy_tensor import ProxyTorchDispatchMode
    from torch.utils._python_dispatch import _get_current_dispatch_mode_stack

    kinds = (FakeTensorMode, FunctionalTensorMode, ProxyTorchDispatchMode)
    return detect_fake_mode() is not None or any(isinstance(m, kinds) for m in _get_current_dispatch_mode_stack())


def device_name(index: Optional[int] = None) -> str:
    """The GPU name the cache is keyed on (default: the current device's), CPU_DEVICE without a GPU."""
    if not _cuda():
        return CPU_DEVICE
    index = torch.cuda.current_device() if index is None else index
    if index not in _DEVICE_NAMES:
        _DEVICE_NAMES[index] = torch.cuda.get_device_name(index)
    return _DEVICE_NAMES[index]


def kernels_hash() -> str:
    """12 hex digits of SHA-256 over the names and bytes of the ``gam_triton.kernels`` source files."""
    folder = os.path.dirname(os.path.abspath(kernels.__file__))
    h = hashlib.sha256()
    for name in sorted(f for f in os.listdir(folder) if f.endswith(".py")):
        with open(os.path.join(folder, name), "rb") as f:
            h.update(name.encode() + b"\0" + f.read() + b"\0")
    return h.hexdigest()[:12]


# --- the cache file ----------------------------------------------------------------------------------------
class _Cache:
    """The cache file of one GPU name: its entries in memory, merged into the file entry by entry."""

    def __init__(self, path: str, device: str) -> None:
        self.path, self.device, self.entries, self.warned = path, device, {}, set()
        self.loaded, self.writable = False, True

    def _warn(self, kind: str, msg: str) -> None:
        if kind not in self.warned:
            self.warned.add(kind)
            warnings.warn(f"gam_triton tuning cache {self.path}: {msg}", CacheWarning, stacklevel=6)

    def read(self) -> dict:
        """The valid entries on disk: {} if absent, and with one warning if unreadable or corrupt."""
        try:
            if os.path.getsize(self.path) > MAX_FILE_BYTES:
                raise ValueError(f"larger than {MAX_FILE_BYTES} bytes")
            with open(self.path, encoding="utf-8") as f:
                data = json.loads(f.read())
            if not isinstance(data, dict) or data.get("format") != FORMAT or not isinstance(data.get("entries"), dict):
                raise ValueError(f"not a gam_triton cache of format {FORMAT}")
        except (FileNotFoundError, NotADirectoryError):
            return {}
        except (OSError, UnicodeDecodeError, ValueError, RecursionError) as e:
            self._warn("corrupt", f"ignored, will be rewritten ({type(e).__name__}: {str(e)[:100]})")
            return {}
        out, bad = {}, 0
        for op, table in data["entries"].items():
            for k, e in (table.items() if isinstance(op, str) and _NAME.match(op) and isinstance(table, dict) else ()):
                if isinstance(k, str) and 0 < len(k) <= 512 and decode(e) is not None and _valid_meta(e):
                    out.setdefault(op, {})[k] = e
                else:
                    bad += 1
            bad += not (isinstance(op, str) and _NAME.match(op) and isinstance(table, dict))
        if bad:
            self._warn("corrupt", f"{bad} invalid entr{'y' if bad == 1 else 'ies'} ignored")
        return out

    def reload(self) -> None:
        for op, table in self.read().items():
            self.entries.setdefault(op, {}).update(table)
        self.loaded = True

    def lookup(self, op: str, k: str) -> Optional[dict]:
        if not self.loaded:
            self.reload()
        return self.entries.get(op, {}).get(k)

    def store(self, op: str, k: str, entry: dict) -> None:
        self.entries.setdefault(op, {})[k] = entry
        try:
            if self.writable:
                self._merge_write(op, k, entry)
        except OSError as e:
            self.writable = False
            self._warn("unwritable", f"cannot be written ({e}); tuning results stay in this process's memory")

    def _merge_write(self, op: str, k: str, entry: dict) -> None:
        folder = os.path.dirname(self.path)
        os.makedirs(folder, exist_ok=True)
        with open(self.path + ".lock", "a") as lock:
            with contextlib.suppress(OSError, AttributeError):  # no flock: still atomic, maybe lossy
                fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
            disk = self.read()
            disk.setdefault(op, {})[k] = entry
            for o, table in disk.items():  # pick up what other processes wrote meanwhile
                for kk, v in table.items():
                    self.entries.setdefault(o, {}).setdefault(kk, v)
            text = json.dumps({"format": FORMAT, "device": self.device, "triton": triton.__version__,
                               "entries": {o: dict(sorted(t.items())) for o, t in sorted(disk.items())}}, indent=1)
            fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{os.path.basename(self.path)}.", suffix=".tmp")
            try:
                with os.fdopen(fd, "w", encoding="utf-8") as f:
                    f.write(text)
                    f.flush()
                    os.fsync(f.fileno())
                os.chmod(tmp, 0o644)  # mkstemp makes 0600; a cache may be shared by several users
                os.replace(tmp, self.path)
            except BaseException:
                with contextlib.suppress(OSError):
                    os.unlink(tmp)
                raise


def _valid_meta(e: dict) -> bool:
    """Beside the choice only: source, finite non-negative times, a candidate count."""
    times = [e.get(n) for n in ("ms", "heuristic_ms", "tune_s") if e.get(n) is not None]
    n = e.get("candidates", 0)
    return e.get("source", "tuned") in ("tuned", "heuristic") and type(n) is int and 0 <= n <= 100000 and all(
        type(v) in (int, float) and math.isfinite(v) and v >= 0 for v in times)


# --- process state -----------------------------------------------------------------------------------------
def cache_dir() -> str:
    """``$GAM_TRITON_CACHE_DIR``, or ``~/.cache/gam_triton``."""
    return os.path.abspath(os.path.expanduser(os.environ.get("GAM_TRITON_CACHE_DIR") or "~/.cache/gam_triton"))


class _State:
    def __init__(self) -> None:
        self.enabled = os.environ.get("GAM_TRITON_AUTOTUNE", "1").strip().lower() not in ("0", "false", "off", "no")
        self.directory, self.kernels = cache_dir(), kernels_hash()
        self.memory: dict = {}    # (device, op, key) -> choice: the hot path
        self.fallback: dict = {}  # heuristic used while tracing / capturing (not stored)
        self.caches: dict = {}
        self.warned: set = set()
        self.lock = threading.RLock()
        self.log: collections.deque = collections.deque(maxlen=4096)

    def cache(self, device: str) -> _Cache:
        if device not in self.caches:
            safe = [re.sub(r"[^A-Za-z0-9._-]+", "_", s).strip("._-")[:100] or "unknown"
                    for s in (device, triton.__version__)]
            name = f"{safe[0]}__triton-{safe[1]}__kernels-{self.kernels}.json"
            self.caches[device] = _Cache(os.path.join(self.directory, name), device)
        return self.caches[device]


_STATE: Optional[_State] = None


def _state() -> _State:
    global _STATE
    if _STATE is None:
        _STATE = _State()
    return _STATE


def reset() -> None:
    """Forget what this process knows (memory table, loaded files, warnings); re-read the environment."""
    global _STATE
    _STATE = None


def enabled() -> bool:
    return _state().enabled


def cache_file(device: Optional[str] = None) -> str:
    """The cache file this process uses for ``device`` (a GPU name; default: the current device)."""
    return _state().cache(device or device_name()).path


def drain_log() -> list:
    """The :class:`TuneRecord` of every choice resolved (not found in memory) since the last drain."""
    with _state().lock:
        out = list(_state().log)
        _state().log.clear()
    return out


def peek(op: str, k: tuple, device: torch.device) -> Optional[Choice]:
    """What this process holds for (op, key) on ``device``, resolving nothing: dict reads torch.compile
    can trace (the spatial path under compile)."""
    name = _DEVICE_NAMES.get(device.index) if device.type == "cuda" else CPU_DEVICE
    return None if _STATE is None else _STATE.memory.get((name, op, k))


# --- the entry point ---------------------------------------------------------------------------------------
def select(op: str, k: tuple, heuristic: Callable[[], Choice], candidates: Callable[[], Sequence[Choice]],
           bench: Optional[Callable[[Choice], float]]) -> Choice:
    """The choice to launch ``op`` with for key ``k`` on the current device (module docstring). ``bench``
    None: never timed (kernels that must not run twice): the heuristic unless a tuned entry exists."""
    st = _STATE or _state()
    if not st.enabled:
        return heuristic()
    dev = device_name()
    choice = st.memory.get((dev, op, k))
    if choice is not None:
        return choice
    with st.lock:
        return st.memory.get((dev, op, k)) or _resolve(st, dev, op, k, heuristic(), candidates, bench)


def _resolve(st: _State, dev: str, op: str, k: tuple, heur: Choice, candidates, bench) -> Choice:
    mk, ks, cache, cands = (dev, op, k), key_string(k), st.cache(dev), []
    mode = "capture" if capturing() else "trace" if tracing() else (
        "bench" if bench is not None and can_benchmark() else "heuristic")
    if mode != "bench" and mk in st.fallback:
        return st.fallback[mk]

    def cached() -> Optional[Choice]:
        entry = cache.lookup(op, ks)
        got = decode(entry)
        if got is None:
            return None
        if entry.get("source") == "heuristic":  # stored untimed (no GPU): valid only where nothing is timed
            return got if mode != "bench" and ident(got) == ident(heur) else None
        if ident(got) == ident(heur):
            return got
        cands[:] = cands or list(candidates())
        return got if ident(got) in {ident(c) for c in cands} else None

    choice = cached()
    if choice is None:
        cache.reload()  # another process may have tuned this key meanwhile
        choice = cached()
    if choice is not None:
        st.memory[mk] = choice
        st.log.append(TuneRecord(op, ks, choice, "cache"))
        return choice
    if mode in ("capture", "trace"):
        if mode == "capture" and "capture" not in st.warned:
            st.warned.add("capture")
            warnings.warn(f"gam_triton: {op} met shape key ({ks}) during CUDA-graph capture with no tuned choice; "
                          "using the heuristic (tuning cannot run inside a capture). Run one eager step before "
                          "capturing, or pre-tune with `python -m gam_triton.tune`.", CaptureWarning, stacklevel=4)
        st.fallback[mk] = heur
        st.log.append(TuneRecord(op, ks, heur, "fallback"))
        return heur
    rec = _tune(op, ks, heur, cands or list(candidates()), bench) if mode == "bench" else \
        TuneRecord(op, ks, heur, "heuristic")
    st.memory[mk] = rec.choice
    st.log.append(rec)
    if rec.source != "failed":  # a failed tuning is not stored
        entry = dict(encode(rec.choice), source=rec.source, candidates=rec.candidates)
        entry.update({n: getattr(rec, n) for n in ("ms", "heuristic_ms", "tune_s") if getattr(rec, n) is not None})
        cache.store(op, ks, entry)
    return rec.choice


def _tune(op: str, ks: str, heur: Choice, cands: Sequence[Choice], bench) -> TuneRecord:
    """Time the heuristic and every candidate; the fastest that ran, ties to the heuristic."""
    t0, times, failed = time.perf_counter(), {}, 0
    todo = list({ident(c): c for c in (heur, *cands)}.values())
    if len(todo) == 1:
        return TuneRecord(op, ks, heur, "tuned", tune_s=0.0, candidates=1)
    for c in todo:
        try:
            ms = float(bench(c))
        except Exception as e:  # noqa: BLE001 - sorted by failure_kind: skipped, fallback or raised
            kind = failure_kind(e)
            if kind == "fatal":
                raise
            if kind == "oom":
                warnings.warn(f"gam_triton: out of GPU memory while tuning {op} ({ks}) at {describe(c)}: "
                              f"{_first_line(e)}; using the heuristic for this shape in this process (not stored)",
                              TuningWarning, stacklevel=5)
                return TuneRecord(op, ks, heur, "failed", tune_s=time.perf_counter() - t0, candidates=len(todo),
                                  failed=failed + 1)
            if not isinstance(e, Rejected) and _cuda():
                torch.cuda.synchronize()  # a sticky CUDA error behind an unexpected exception raises here
            log.debug("gam_triton: %s %s: %s skipped: %s", op, ks, describe(c), _first_line(e))
            failed += 1
            continue
        if math.isfinite(ms) and ms > 0:
            times[ident(c)] = (ms, c)
        else:
            failed += 1
    tune_s = time.perf_counter() - t0
    if not times:
        log.warning("gam_triton: tuning %s (%s) failed for all %d choices; using the heuristic", op, ks, len(todo))
        return TuneRecord(op, ks, heur, "failed", tune_s=tune_s, candidates=len(todo), failed=failed)
    best_ms, best = min(times.values(), key=lambda t: t[0])
    h_ms = times[ident(heur)][0] if ident(heur) in times else None
    if h_ms is not None and h_ms <= best_ms * TIE:
        best_ms, best = h_ms, heur
    log.info("gam_triton: tuned %s (%s) in %.2f s over %d choices: %s", op, ks, tune_s, len(todo), describe(best))
    return TuneRecord(op, ks, best, "tuned", best_ms, h_ms, tune_s, len(todo), failed)


def timed(run: Callable[[Choice], object]) -> Callable[[Choice], float]:
    """A ``bench``: ``run(choice)`` once (it compiles; a kernel that spills registers here is
    :class:`Rejected`), then its median time in ms (``do_bench``, L2 flushed)."""
    def bench(choice: Choice) -> float:
        spills = getattr(run(choice), "n_spills", 0) or 0
        if spills:
            raise Rejected(f"{describe(choice)} spills {spills} bytes of registers")
        return do_bench(lambda: run(choice), warmup=WARMUP_MS, rep=REP_MS, return_mode="median")

    return bench


def checked(op: str, bench: Callable[[Choice], float], run: Callable[[Choice], torch.Tensor],
            reference: Callable[[], torch.Tensor], tol: tuple[float, float]) -> Callable[[Choice], float]:
    """``bench`` with each choice first run once and compared with ``reference()`` (computed once); one that
    disagrees is :class:`Rejected` with a :class:`CandidateMismatchWarning` (compilers misbehave on hardware
    never tested here: pytorch issue 173068)."""
    ref: list = []

    def check(choice: Choice) -> float:
        want = ref[0] if ref else ref.append(reference().float()) or ref[0]
        got = run(choice).float()
        if got.shape != want.shape or not torch.allclose(got, want, rtol=tol[0], atol=tol[1]):
            err = (got - want).abs().max().item() if got.shape == want.shape else float("nan")
            msg = (f"gam_triton: {op} candidate {describe(choice)} disagrees with the reference path "
                   f"(max abs error {err:.3g}, rtol {tol[0]}, atol {tol[1]}): dropped")
            warnings.warn(msg, CandidateMismatchWarning, stacklevel=3)
            raise Rejected(msg)
        return bench(choice)

    return check


# --- failures while tuning ---------------------------------------------------------------------------------
def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}"[:200]


def failure_kind(e: BaseException) -> str:
    """``"skip"`` (it cannot run here: a compile failure, a rejection, too many resources for the launch, or
    an error that leaves the device usable), ``"oom"`` (out of GPU memory: tuning stops) or ``"fatal"`` (any
    other CUDA error: the context is unusable, re-raised)."""
    from triton.compiler.errors import CompilationError
    from triton.runtime import errors

    text = str(e)
    low = text.lower()
    if isinstance(e, torch.OutOfMemoryError) or "out of memory" in low and ("cuda" in low or "triton error" in low):
        return "oom"
    skips = (CompilationError, Rejected, *(getattr(errors, n) for n in ("OutOfResources", "PTXASError")
                                           if hasattr(errors, n)))
    if isinstance(e, skips) or "too many resources requested for launch" in low:
        return "skip"
    accel = getattr(torch, "AcceleratorError", None)
    fatal = (accel is not None and isinstance(e, accel)) or any(
        s in text for s in ("CUDA error", "Triton Error [CUDA]", "CUDA_ERROR"))
    return "fatal" if fatal else "skip"
