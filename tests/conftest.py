"""Test set-up: poisoned kernel outputs, a private autotune cache, and the device the kernels run on.

* ``GAM_TRITON_POISON=1``: every kernel output starts as NaN, so an element a kernel fails to write
  shows up as a mismatch.
* ``GAM_TRITON_CACHE_DIR``: a temporary folder, so tests never touch the user's cache; ``TORCHINDUCTOR_CACHE_DIR``
  too: Inductor's FX-graph cache does not key on a custom op's fake kernel, so graphs compiled by another checkout
  whose fake returned other sizes (the reductions' counters) would be served stale.
* ``kernel_names`` fixture: the names of the kernels launched through the one launch seam while the test runs.
* ``device`` fixture: "cpu" under ``TRITON_INTERPRET=1`` (the kernels run in Triton's interpreter, as in
  CI); "cuda" when a GPU is present and the interpreter is off (the kernels compile for real); "cpu"
  otherwise (the PyTorch path is what is tested then).
"""
import os
import tempfile

os.environ.setdefault("GAM_TRITON_POISON", "1")
os.environ.setdefault("GAM_TRITON_CACHE_DIR", tempfile.mkdtemp(prefix="gam_triton_test_cache_"))
os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", tempfile.mkdtemp(prefix="gam_triton_test_inductor_"))

import pytest  # noqa: E402
import torch  # noqa: E402

from gam_triton.ops._runtime import INTERPRET  # noqa: E402

DEVICE = "cuda" if (torch.cuda.is_available() and not INTERPRET) else "cpu"

if DEVICE == "cuda":  # compare fp32 against float64 without TF32 in the convolutions
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False


@pytest.fixture
def device() -> str:
    return DEVICE


@pytest.fixture
def kernel_names(monkeypatch) -> list:
    """The names of the kernels launched through ``_runtime.launch`` (the one launch seam) from here on, in order;
    each still runs."""
    from gam_triton.ops import _runtime

    names, real = [], _runtime.launch
    monkeypatch.setattr(_runtime, "launch", lambda k, *a: names.append(getattr(k, "fn", k).__name__) or real(k, *a))
    return names
