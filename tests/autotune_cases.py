"""The fake op of tests/test_autotune.py (not a test file), and its cache writers in other processes.

The fake op has one block size, BLOCK_P: heuristic 64, candidates 16, 32 and 128; :class:`Bench` times them
(TIMES: 32 wins) and counts its calls. :func:`tune_keys` tunes keys as if on a GPU, in a forked writer
(:func:`write`) or a fresh interpreter: ``python tests/autotune_cases.py KEYS`` (a JSON list) prints
``{"calls": <benchmarks run>, "chosen": [<BLOCK_P per key>]}``.
"""
import json
import os
import sys
import time

import triton

from gam_triton.ops import _autotune, _runtime


def cfg(block_p: int, warps: int = 4, stages: int = 2) -> triton.Config:
    return triton.Config({"BLOCK_P": block_p}, num_warps=warps, num_stages=stages)


H = cfg(64)                                     # the fake op's heuristic
CANDS = [cfg(16), cfg(32), cfg(128)]
TIMES = {16: 3.0, 32: 1.0, 64: 2.0, 128: 4.0}   # ms by BLOCK_P: 32 wins, the heuristic is second


def bp(choice) -> int:
    return choice.kwargs["BLOCK_P"]


class Bench:
    """A fake bench(choice) -> ms by BLOCK_P (``fail``: BLOCK_P -> the exception to raise), counting calls."""

    def __init__(self, times=None, fail=None):
        self.times, self.fail, self.calls = times or TIMES, fail or {}, []

    def __call__(self, choice) -> float:
        self.calls.append(bp(choice))
        if bp(choice) in self.fail:
            raise self.fail[bp(choice)]
        return self.times[bp(choice)]


def sel(key=(1, 2, "k"), bench=None, cands=None, op="fake_op"):
    """The fake op's choice for ``key``."""
    cands = CANDS if cands is None else cands
    return _autotune.select(op, key, lambda: H, lambda: cands, Bench() if bench is None else bench)


def tune_keys(keys, barrier=None, n=0, device=None) -> dict:
    """Tune each key (a list) on a pretended GPU (named ``device`` when given), after waiting until ``n``
    writers are in ``barrier``."""
    _autotune.reset()
    _runtime.has_cuda = lambda: True
    _runtime.device_name = lambda index=None: device or _runtime.CPU_DEVICE
    if device:  # a forked writer must not touch CUDA (it may be initialised in the parent)
        _runtime.device_name = lambda index=None: device
        _runtime.capturing = lambda: False
    if barrier:
        open(os.path.join(barrier, str(os.getpid())), "w").close()
        t0 = time.time()
        while len(os.listdir(barrier)) < n and time.time() - t0 < 60:
            time.sleep(0.002)
    b = Bench()
    chosen = [bp(sel(tuple(k), b)) for k in keys]
    return {"calls": len(b.calls), "chosen": chosen}


def write(keys, barrier, n, out) -> None:
    """A forked writer: :func:`tune_keys` on "Writer GPU", its result written to the file ``out``."""
    result = tune_keys(keys, barrier, n, "Writer GPU")
    with open(out, "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    print(json.dumps(tune_keys(json.loads(sys.argv[1]))))
