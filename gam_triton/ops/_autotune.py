"""The tuner: each kernel's launch choice per shape key, tuned once on the GPU, remembered across runs.

A choice is a ``triton.Config`` (the kernel's own constexpr names) or a path name ("cudnn", "triton", ...);
ops call ``select(op, key(...), heuristic, candidates, bench)`` under their tensors' device. The policy
(off switch, memory table, the cache file re-read on a miss, tuning on a GPU with ``do_bench``, what is
skipped, out-of-memory and CUDA errors, capture and tracing) is stated in :func:`select`; the file
(``$GAM_TRITON_CACHE_DIR/<gpu>__triton-<version>__kernels-<source hash>.json``, plain JSON decoded
strictly, merged under ``flock`` and replaced atomically) in :class:`_Cache`.

Imports without Triton (``_runtime.HAS_TRITON`` false: macOS, Windows, CPU-only installs): nothing is tuned
there (no op selects a launch), but the module and its pure-Python parts (keys, the cache file) still load.
Without ``fcntl`` (Windows) a store is not locked: still atomic, but concurrent stores may lose an entry.
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
from typing import Callable, NamedTuple, Optional, Sequence, Union

import torch

from .. import kernels
from . import _runtime
from ._runtime import HAS_TRITON, is_channels_last, next_pow2

try:  # POSIX only: the cache file's lock
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None

if HAS_TRITON:
    import triton
    from triton.testing import do_bench

TRITON_VERSION = triton.__version__ if HAS_TRITON else "none"
Choice = Union["triton.Config", str]

log = logging.getLogger(__name__)
WORK_CAP = 1 << 17          # bucketed batch x pixels past which a bigger batch shares the key (GPU full)
WARMUP_MS, REP_MS, TIE = 5, 25, 1.02
FORMAT = 2                  # of the cache file; files of another format are ignored, then rewritten
MAX_FILE_BYTES = 16 << 20
_META = {"source", "ms", "heuristic_ms", "tune_s", "candidates"}
_OPTIONS = ("num_warps", "num_stages", "maxnreg")  # of a config entry, beside the kernel's constexprs
_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_.:-]{0,63}$")  # op and path names


class CaptureWarning(UserWarning):
    """A kernel met an untuned shape during CUDA-graph capture; the heuristic was used."""


class TuningWarning(UserWarning):
    """Tuning a shape ran out of GPU memory; the heuristic is used for it in this process."""


class CacheWarning(UserWarning):
    """The tuning cache could not be read or written; gam_triton carries on without it."""


class Rejected(RuntimeError):
    """A candidate that runs but must not be chosen (it spills, or its output is wrong): skipped."""


class TuneRecord(NamedTuple):
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
    """``{"path": name}`` or ``{"config": {constexprs..., "num_warps": w, "num_stages": s[, "maxnreg": r]}}``."""
    if isinstance(choice, str):
        return {"path": choice}
    return {"config": _runtime.config_kwargs(choice)}


def decode(entry) -> Optional[Choice]:
    """The choice of a cache entry, or None unless the entry is exactly a valid one: ``{"path": name}`` or
    ``{"config": {identifier: int in [0, 65536]}}`` with num_warps and num_stages, beside known metadata (a
    known source, finite non-negative numbers). Even then a choice is used only if it is the heuristic or a
    current candidate."""
    meta = [entry.get(n) for n in _META - {"source"}] if isinstance(entry, dict) else [None]
    if not isinstance(entry, dict) or len(set(entry) - _META) != 1 or entry.get("source", "tuned") not in (
            "tuned", "heuristic") or type(entry.get("candidates", 0)) is not int or not all(
            v is None or type(v) in (int, float) and math.isfinite(v) and v >= 0 for v in meta):
        return None
    if "path" in entry:
        return entry["path"] if isinstance(entry["path"], str) and _NAME.match(entry["path"]) else None
    cfg = entry.get("config")
    if not isinstance(cfg, dict) or not {"num_warps", "num_stages"} <= set(cfg) or not all(
            k.isidentifier() and type(v) is int and 0 <= v <= 1 << 16 for k, v in cfg.items()):
        return None
    if not HAS_TRITON:  # pragma: no cover - nothing selects a launch without Triton
        return None
    kw = {k: v for k, v in cfg.items() if k not in _OPTIONS}
    return triton.Config(kw, num_warps=cfg["num_warps"], num_stages=cfg["num_stages"], maxnreg=cfg.get("maxnreg"))


def ident(choice: Choice) -> tuple:
    """A hashable identity of a choice (``triton.Config`` compares by identity before Triton 3.5)."""
    if isinstance(choice, str):
        return ("path", choice)
    return ("config", tuple(sorted(choice.kwargs.items())), choice.num_warps, choice.num_stages, choice.maxnreg)


def describe(choice: Choice) -> str:
    """``BLOCK_P=64 BLOCK_C=64 w4 s2`` (`` r255`` with maxnreg), or the path name."""
    if isinstance(choice, str):
        return choice
    return " ".join(f"{k}={v}" for k, v in choice.kwargs.items()) + f" w{choice.num_warps} s{choice.num_stages}" + (
        f" r{choice.maxnreg}" if choice.maxnreg else "")


def pixels(batch: int, hw: int) -> tuple[int, int]:
    """How map and batch enter a key: H*W to the next power of two, the batch to the next power of two capped
    at WORK_CAP // that (a small B*H*W favours small tiles; past the cap the GPU is full)."""
    p = next_pow2(hw)
    return p, min(next_pow2(batch), max(1, WORK_CAP // p))


def key(shape: tuple, *tensors: torch.Tensor, precision: Optional[str]) -> tuple:
    """A tuning key: ``shape`` (ints, bools, strings), the dtype and layout of each of ``tensors``, and the
    fp32 dot precision the kernel runs with: required, None only for kernels without a dot."""
    parts = [*shape]
    for t in tensors:
        parts += [str(t.dtype).replace("torch.", ""), is_channels_last(t)]
    return (*parts, precision or "-")


# --- the cache file ----------------------------------------------------------------------------------------
def kernels_hash() -> str:
    """12 hex digits of SHA-256 over the names and bytes of the ``gam_triton.kernels`` source files."""
    folder, h = os.path.dirname(os.path.abspath(kernels.__file__)), hashlib.sha256()
    for name in sorted(f for f in os.listdir(folder) if f.endswith(".py")):
        with open(os.path.join(folder, name), "rb") as f:
            h.update(name.encode() + b"\0" + f.read() + b"\0")
    return h.hexdigest()[:12]


def cache_dir() -> str:
    return os.path.abspath(os.path.expanduser(os.environ.get("GAM_TRITON_CACHE_DIR") or "~/.cache/gam_triton"))


class _Cache:
    """The cache file of one GPU name (and Triton version, and kernel source): parsed with ``json.loads``,
    every entry decoded (nothing in it is executed); a corrupt or oversized file warns once
    (:class:`CacheWarning`) and is rewritten; a store merges into the file as it is on disk, under ``flock``,
    through a temporary file, fsync and ``os.replace``; an unwritable directory warns once (memory only)."""

    def __init__(self, path: str, device: str) -> None:
        self.path, self.device, self.warned, self.writable = path, device, set(), True

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
            ok = _NAME.match(op) and isinstance(table, dict)
            bad += not ok
            for k, e in table.items() if ok else ():
                good = 0 < len(k) <= 512 and decode(e) is not None
                bad += not good
                out.setdefault(op, {}).update({k: e} if good else {})
        if bad:
            self._warn("corrupt", f"{bad} invalid entr{'y' if bad == 1 else 'ies'} ignored")
        return out

    def store(self, op: str, k: str, entry: dict) -> None:
        """Merged into the file as it is on disk now (under the lock, atomically)."""
        folder = os.path.dirname(self.path)
        try:
            if not self.writable:
                return
            os.makedirs(folder, exist_ok=True)
            with open(self.path + ".lock", "a") as lock:
                with contextlib.suppress(OSError):  # a filesystem without flock: still atomic, maybe lossy
                    if fcntl is not None:
                        fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
                disk = self.read()  # with what other processes wrote meanwhile
                disk.setdefault(op, {})[k] = entry
                fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{os.path.basename(self.path)}.", suffix=".tmp")
                try:
                    with os.fdopen(fd, "w", encoding="utf-8") as f:
                        json.dump({"format": FORMAT, "device": self.device, "triton": TRITON_VERSION,
                                   "entries": {o: dict(sorted(t.items())) for o, t in sorted(disk.items())}}, f,
                                  indent=1)
                        f.flush()
                        os.fsync(f.fileno())
                    os.chmod(tmp, 0o644)  # mkstemp makes 0600; a cache may be shared by several users
                    os.replace(tmp, self.path)
                except BaseException:
                    with contextlib.suppress(OSError):
                        os.unlink(tmp)
                    raise
        except OSError as e:
            self.writable = False
            self._warn("unwritable", f"cannot be written ({e}); tuning results stay in this process's memory")


# --- process state -----------------------------------------------------------------------------------------
class _State:
    def __init__(self) -> None:
        self.enabled = os.environ.get("GAM_TRITON_AUTOTUNE", "1").strip().lower() not in ("0", "false", "off", "no")
        self.directory, self.kernels = cache_dir(), kernels_hash()
        self.memory, self.fallback, self.caches, self.warned = {}, {}, {}, set()  # memory: the hot path
        self.lock, self.log = threading.RLock(), collections.deque(maxlen=4096)

    def cache(self, device: str) -> _Cache:
        if device not in self.caches:
            safe = [re.sub(r"[^A-Za-z0-9._-]+", "_", s).strip("._-")[:100] or "unknown"
                    for s in (device, TRITON_VERSION)]
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
    return _state().cache(device or _runtime.device_name()).path


def drain_log() -> list:
    """The :class:`TuneRecord` of every choice resolved (not found in memory) since the last drain."""
    with _state().lock:
        out = list(_state().log)
        _state().log.clear()
    return out


def peek(op: str, k: tuple, device: torch.device) -> Optional[Choice]:
    """What the process holds for (op, key) on ``device``, resolving nothing: dict reads torch.compile traces."""
    name = _runtime.DEVICE_NAMES.get(device.index) if device.type == "cuda" else _runtime.CPU_DEVICE
    return None if _STATE is None else _STATE.memory.get((name, op, k))


# --- the entry point ---------------------------------------------------------------------------------------
def select(op: str, k: tuple, heuristic: Callable[[], Choice], candidates: Callable[[], Sequence[Choice]],
           bench: Optional[Callable[[Choice], float]]) -> Choice:
    """The choice to launch ``op`` with for key ``k`` on the current device.

    ``GAM_TRITON_AUTOTUNE=0``: the heuristic, no cache read or written. Else the memory table (the hot path:
    one dict lookup); then the cache file, re-read on a miss (another process may have tuned the key), whose
    entry counts if it is the heuristic or a current candidate (an untimed one only where nothing is timed);
    then, on a GPU, eager: the heuristic and the candidates timed by ``bench`` (:func:`timed`: a kernel that
    spills registers on this GPU is skipped, as is one that fails to compile or launch or is
    :class:`Rejected`), the fastest kept, ties within 2 % to the heuristic; out of GPU memory: the heuristic,
    not stored (:class:`TuningWarning`); another CUDA error is raised. Without a GPU (or with ``bench``
    None) the heuristic, stored untimed; in CUDA-graph capture (:class:`CaptureWarning`, once) or tracing
    the heuristic, not stored."""
    st = _STATE or _state()
    if not st.enabled:
        return heuristic()
    dev = _runtime.device_name()
    choice = st.memory.get((dev, op, k))
    if choice is not None:
        return choice
    with st.lock:
        return st.memory.get((dev, op, k)) or _resolve(st, dev, op, k, heuristic(), candidates, bench)


def _resolve(st: _State, dev: str, op: str, k: tuple, heur: Choice, candidates, bench) -> Choice:
    mk, ks, cache, cands = (dev, op, k), ",".join(map(str, k)), st.cache(dev), []
    mode = "capture" if _runtime.capturing() else "trace" if _runtime.tracing() else (
        "bench" if bench is not None and _runtime.has_cuda() else "heuristic")
    if mode != "bench" and mk in st.fallback:
        return st.fallback[mk]
    entry = cache.read().get(op, {}).get(ks)  # read on each miss: another process may have tuned the key
    got = decode(entry)
    if got is not None and entry.get("source") == "heuristic":  # untimed: only where nothing is timed
        got = got if mode == "heuristic" and ident(got) == ident(heur) else None
    elif got is not None and ident(got) != ident(heur):
        cands = list(candidates())
        got = got if ident(got) in {ident(c) for c in cands} else None
    if got is not None:
        st.memory[mk] = got
        st.log.append(TuneRecord(op, ks, got, "cache"))
        return got
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
        cache.store(op, ks, dict(entry, **{n: getattr(rec, n) for n in ("ms", "heuristic_ms", "tune_s")
                                           if getattr(rec, n) is not None}))
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
            kind, why = failure_kind(e), f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0][:160]}"
            if kind == "fatal":
                raise
            if kind == "oom":
                warnings.warn(f"gam_triton: out of GPU memory while tuning {op} ({ks}) at {describe(c)}: "
                              f"{why}; using the heuristic for this shape in this process (not stored)",
                              TuningWarning, stacklevel=5)
                return TuneRecord(op, ks, heur, "failed", tune_s=time.perf_counter() - t0, candidates=len(todo),
                                  failed=failed + 1)
            if not isinstance(e, Rejected) and _runtime.has_cuda():
                torch.cuda.synchronize()  # a sticky CUDA error behind an unexpected exception raises here
            log.debug("gam_triton: %s %s: %s skipped: %s", op, ks, describe(c), why)
            ms = float("nan")
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


def failure_kind(e: BaseException) -> str:
    """``"skip"`` (a compile failure, a rejection, too many resources for the launch, an error that leaves the
    device usable), ``"oom"`` (out of GPU memory: tuning stops) or ``"fatal"`` (another CUDA error: raised)."""
    from triton.compiler.errors import CompilationError
    from triton.runtime import errors

    text = str(e)
    if isinstance(e, torch.OutOfMemoryError) or "out of memory" in text.lower() and (
            "cuda" in text.lower() or "triton error" in text.lower()):
        return "oom"
    skips = (CompilationError, Rejected, *(getattr(errors, n) for n in ("OutOfResources", "PTXASError")
                                           if hasattr(errors, n)))
    if isinstance(e, skips) or "too many resources requested for launch" in text.lower():
        return "skip"
    accel = getattr(torch, "AcceleratorError", None)
    fatal = (accel is not None and isinstance(e, accel)) or any(
        s in text for s in ("CUDA error", "Triton Error [CUDA]", "CUDA_ERROR"))
    return "fatal" if fatal else "skip"
