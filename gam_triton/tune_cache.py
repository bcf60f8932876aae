"""Persistent tuning cache: one JSON file per device and Triton version, safe to share between processes.

File: ``$GAM_TRITON_CACHE_DIR/<device>__triton-<version>__kernels-<hash>.json`` (default directory
``~/.cache/gam_triton``; ``<device>`` is the sanitised GPU name, ``cpu-interpreter`` under
``TRITON_INTERPRET=1``; ``<hash>`` is :func:`kernels_hash`, 12 hex digits of the kernels' source, so that a
kernel edit starts a new file; files of other versions or hashes are left alone, neither read nor deleted).
Contents::

    {"format": 1, "device": "NVIDIA H100 80GB HBM3", "triton": "3.9.0", "kernels": "0123456789ab",
     "entries": {"channel_gate": {"256,64,8192,16,torch.bfloat16,...": {
         "BLOCK_P": 64, "BLOCK_C": 64, "BLOCK_R": 64, "num_warps": 4, "num_stages": 2,
         "source": "tuned", "ms": 0.0123, "heuristic_ms": 0.0151, "tune_s": 0.84, "candidates": 12}}}}

Safety and robustness rules (issue 3):

* Nothing read is executed: the file is parsed with :func:`json.loads` only, and every entry is validated
  (known fields only, ints in sane ranges, powers of two for blocks). Invalid entries are dropped; a file that
  does not parse, or has the wrong shape or format number, counts as empty. Either case warns once per file
  per process (:class:`CacheWarning`), and the file is rewritten, valid, at the next store.
* Writes are atomic: a temporary file in the same directory, then :func:`os.replace`. A store is a
  read-modify-write under an exclusive ``fcntl.flock`` on ``<file>.lock`` (when fcntl exists), so concurrent
  writers (DDP ranks, parallel test workers) keep each other's entries; for one entry the last writer wins.
* A directory that cannot be created or written (read-only, full, a path under a regular file) is not an
  error: the store warns once and the process keeps its results in memory; later stores are not attempted.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import re
import tempfile
import threading
import warnings
from typing import Any, Optional

from .configs import CONFIG_FIELDS

try:  # POSIX advisory locks; elsewhere concurrent writers may drop each other's new entries
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

__all__ = ["CacheWarning", "TuneCache", "FORMAT", "cache_dir", "cache_path", "kernels_hash", "sanitise",
           "validate_entry", "CONFIG_FIELDS"]

#: Version of the file layout. A file with another number is ignored (with a warning) and rewritten.
FORMAT = 1
#: Files bigger than this are not read (a tuning cache holds kilobytes).
MAX_FILE_BYTES = 16 << 20

_META_FLOATS = ("ms", "heuristic_ms", "tune_s")
_SOURCES = ("tuned", "heuristic")
_OP_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_.:-]{0,63}$")
_MAX_KEY_LEN = 512


class CacheWarning(UserWarning):
    """The tuning cache could not be read or written; gam_triton carries on without it."""


def sanitise(name: str) -> str:
    """A file-name-safe form of a device name or version: [A-Za-z0-9._-] only, at most 100 characters."""
    s = re.sub(r"[^A-Za-z0-9._-]+", "_", str(name)).strip("._-")
    return s[:100] or "unknown"


def cache_dir() -> str:
    """``$GAM_TRITON_CACHE_DIR``, or ``~/.cache/gam_triton``."""
    d = os.environ.get("GAM_TRITON_CACHE_DIR") or os.path.join("~", ".cache", "gam_triton")
    return os.path.abspath(os.path.expanduser(d))


def cache_path(device: str, triton_version: str, directory: Optional[str] = None,
               kernels: Optional[str] = None) -> str:
    """Path of the cache file for ``device`` (a GPU name), ``triton_version`` and the kernels' source hash
    (default :func:`kernels_hash`)."""
    kernels = kernels_hash() if kernels is None else kernels
    name = f"{sanitise(device)}__triton-{sanitise(triton_version)}__kernels-{sanitise(kernels)}.json"
    return os.path.join(directory or cache_dir(), name)


_KERNELS_HASH: list[str] = []


def kernels_hash() -> str:
    """A short hash (12 hex digits) of the source of the ``gam_triton.kernels`` package (its ``*.py`` files,
    names and bytes), computed once per process: a kernel edit gets a new cache file, so configs tuned
    for the old kernels are not served. Files of other hashes stay on disk, unread."""
    if not _KERNELS_HASH:
        import importlib.util

        spec = importlib.util.find_spec(__package__ + ".kernels")  # located, not imported (needs no triton)
        directory = list(spec.submodule_search_locations)[0]
        h = hashlib.sha256()
        for name in sorted(f for f in os.listdir(directory) if f.endswith(".py")):
            with open(os.path.join(directory, name), "rb") as f:
                data = f.read()
            h.update(f"{name}\0{len(data)}\0".encode())
            h.update(data)
        _KERNELS_HASH.append(h.hexdigest()[:12])
    return _KERNELS_HASH[0]


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _pow2(v: Any, lo: int, hi: int) -> bool:
    return _is_int(v) and lo <= v <= hi and v & (v - 1) == 0


def validate_entry(entry: Any) -> Optional[dict]:
    """The entry as a clean dict if it is a valid cached configuration, else None.

    Valid: a dict with exactly the five config fields (BLOCK_P, BLOCK_C powers of two in [1, 65536], BLOCK_R
    0 or such a power of two, num_warps in {1, 2, ..., 32}, num_stages in [1, 8]) plus optional metadata:
    ``source`` ("tuned" or "heuristic"), ``ms``/``heuristic_ms``/``tune_s`` (finite floats >= 0 or null) and
    ``candidates`` (int in [0, 100000]). Any other field, or any other type, makes it invalid.
    """
    if not isinstance(entry, dict):
        return None
    allowed = set(CONFIG_FIELDS) | set(_META_FLOATS) | {"source", "candidates"}
    if not all(isinstance(k, str) and k in allowed for k in entry):
        return None
    if not all(k in entry for k in CONFIG_FIELDS):
        return None
    if not (_pow2(entry["BLOCK_P"], 1, 1 << 16) and _pow2(entry["BLOCK_C"], 1, 1 << 16)):
        return None
    if not (entry["BLOCK_R"] == 0 and _is_int(entry["BLOCK_R"]) or _pow2(entry["BLOCK_R"], 1, 1 << 16)):
        return None
    if not _pow2(entry["num_warps"], 1, 32):
        return None
    if not (_is_int(entry["num_stages"]) and 1 <= entry["num_stages"] <= 8):
        return None
    out = {k: int(entry[k]) for k in CONFIG_FIELDS}
    src = entry.get("source", "tuned")
    if src not in _SOURCES:
        return None
    out["source"] = src
    for k in _META_FLOATS:
        v = entry.get(k)
        if v is None:
            continue
        if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v) or v < 0:
            return None
        out[k] = float(v)
    if "candidates" in entry:
        n = entry["candidates"]
        if not (_is_int(n) and 0 <= n <= 100000):
            return None
        out["candidates"] = n
    return out


def _parse(text: str) -> tuple[Optional[dict], int]:
    """(entries, number of invalid entries dropped), or (None, 0) if the file as a whole is unusable."""
    try:
        data = json.loads(text)
    except (ValueError, RecursionError):
        return None, 0
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        return None, 0
    if not isinstance(data.get("entries"), dict):
        return None, 0
    entries: dict = {}
    bad = 0
    for op, table in data["entries"].items():
        if not isinstance(op, str) or not _OP_RE.match(op) or not isinstance(table, dict):
            bad += 1
            continue
        clean = {}
        for key, entry in table.items():
            v = validate_entry(entry) if isinstance(key, str) and 0 < len(key) <= _MAX_KEY_LEN else None
            if v is None:
                bad += 1
            else:
                clean[key] = v
        if clean:
            entries[op] = clean
    return entries, bad


class TuneCache:
    """The cache file of one device: lazily loaded, re-read on demand, stored entry by entry.

    ``lookup`` only reads memory (the file is read the first time and on :meth:`reload`); ``store`` merges
    one entry into the file as it is on disk at that moment, under the lock, and writes it atomically.
    """

    def __init__(self, path: str, device: str, triton_version: str, kernels: str = "") -> None:
        self.path = path
        self.device = device
        self.triton_version = triton_version
        self.kernels = kernels
        self.entries: dict[str, dict[str, dict]] = {}
        self.writable = True
        self._loaded = False
        self._warned: set[str] = set()
        self._mutex = threading.Lock()

    # -- warnings ----------------------------------------------------------------------------------------
    def _warn_once(self, kind: str, msg: str) -> None:
        if kind not in self._warned:
            self._warned.add(kind)
            warnings.warn(f"gam_triton tuning cache {self.path}: {msg}", CacheWarning, stacklevel=4)

    # -- reading -----------------------------------------------------------------------------------------
    def _read_disk(self) -> dict:
        """Validated entries of the file on disk ({} if absent, unreadable or corrupt, with one warning)."""
        try:
            if os.path.getsize(self.path) > MAX_FILE_BYTES:
                self._warn_once("corrupt", f"larger than {MAX_FILE_BYTES} bytes; ignored, will be rewritten")
                return {}
            with open(self.path, encoding="utf-8") as f:
                text = f.read()
        except (FileNotFoundError, NotADirectoryError):  # absent (the store says if it cannot be created)
            return {}
        except (OSError, UnicodeDecodeError) as e:
            self._warn_once("corrupt", f"cannot be read ({e}); ignored, will be rewritten")
            return {}
        entries, bad = _parse(text)
        if entries is None:
            self._warn_once("corrupt", "is not a valid gam_triton cache (format "
                            f"{FORMAT}); ignored, will be rewritten")
            return {}
        if bad:
            self._warn_once("corrupt", f"{bad} invalid entr{'y' if bad == 1 else 'ies'} ignored; "
                            "they are dropped at the next write")
        return entries

    def load(self) -> None:
        """Read the file once (later calls do nothing; see :meth:`reload`)."""
        if not self._loaded:
            self.reload()

    def reload(self) -> None:
        """Re-read the file, keeping in-memory entries that are not on disk (e.g. after a failed write)."""
        disk = self._read_disk()
        with self._mutex:
            for op, table in disk.items():
                self.entries.setdefault(op, {}).update(table)
            self._loaded = True

    def lookup(self, op: str, key: str) -> Optional[dict]:
        """The validated entry for (op, key), loading the file the first time; None when absent."""
        self.load()
        return self.entries.get(op, {}).get(key)

    # -- writing -----------------------------------------------------------------------------------------
    def store(self, op: str, key: str, entry: dict) -> bool:
        """Record ``entry`` in memory and merge it into the file; False when it could not be persisted."""
        clean = validate_entry(entry)
        if clean is None:
            raise ValueError(f"invalid tuning cache entry for {op}[{key}]: {entry!r}")
        if not _OP_RE.match(op) or not 0 < len(key) <= _MAX_KEY_LEN:
            raise ValueError(f"invalid tuning cache op or key: {op!r}, {key!r}")
        with self._mutex:
            self.entries.setdefault(op, {})[key] = clean
        if not self.writable:
            return False
        try:
            self._merge_write(op, key, clean)
            return True
        except OSError as e:
            self.writable = False
            self._warn_once("unwritable", f"cannot be written ({e}); tuning results are kept in memory "
                            "for this process only")
            return False

    def _merge_write(self, op: str, key: str, entry: dict) -> None:
        directory = os.path.dirname(self.path)
        os.makedirs(directory, exist_ok=True)
        lock_fd = None
        if fcntl is not None:
            try:
                lock_fd = os.open(self.path + ".lock", os.O_RDWR | os.O_CREAT, 0o644)
                fcntl.flock(lock_fd, fcntl.LOCK_EX)
            except OSError:
                if lock_fd is not None:
                    os.close(lock_fd)
                lock_fd = None  # no lock (e.g. a filesystem without flock): still atomic, maybe lossy
        try:
            disk = self._read_disk()
            disk.setdefault(op, {})[key] = entry
            with self._mutex:  # pick up what other processes wrote meanwhile
                for o, table in disk.items():
                    mine = self.entries.setdefault(o, {})
                    for k, v in table.items():
                        if not (o == op and k == key):
                            mine.setdefault(k, v)
            self._atomic_write(directory, disk)
        finally:
            if lock_fd is not None:
                os.close(lock_fd)  # closing releases the flock

    def _atomic_write(self, directory: str, entries: dict) -> None:
        data = {"format": FORMAT, "device": self.device, "triton": self.triton_version, "kernels": self.kernels,
                "entries": {op: dict(sorted(t.items())) for op, t in sorted(entries.items())}}
        text = json.dumps(data, indent=1, allow_nan=False)
        fd, tmp = tempfile.mkstemp(dir=directory, prefix="." + os.path.basename(self.path) + ".",
                                   suffix=".tmp")
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                f.write(text)
                f.flush()
                os.fsync(f.fileno())
            try:
                os.chmod(tmp, 0o644)  # mkstemp makes 0600; the cache may be shared by several users
            except OSError:
                pass
            os.replace(tmp, self.path)
        except BaseException:
            try:
                os.unlink(tmp)
            except OSError:
                pass
            raise
