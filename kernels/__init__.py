"""Triton kernels of gam_triton, shipped inside the package as ``gam_triton.kernels``.

One file per op family; each holds only ``@triton.jit`` functions (no launch logic), its docstring stating
what they compute, read and write:

* :mod:`.channel_gate` - x1 = x * g(W2 relu(W1 x + b1) + b2), the channel MLP gate, and its backward.
* :mod:`.elementwise`  - the final gate (BN2, sigmoid, shuffle, multiply) and BatchNorm-apply + ReLU.
* :mod:`.batchnorm`    - train mode: BatchNorm batch statistics (running statistics updated) and the
  backward's reductions and elementwise pass (BN1 + ReLU; BN2 + sigmoid + shuffle + final gate).
* :mod:`.shuffle`      - the channel shuffle read and written as contiguous runs of channels (shared helpers).
* :mod:`.align`        - integers the launch knows to be multiples of 2, 4 or 8, told to the compiler (shared
  helpers: strides and extents Triton's divisibility-16 specialisation misses).
* :mod:`.conv`         - the eval spatial branch: KxK implicit-GEMM convolutions, conv1 + BN1 + ReLU and
  conv2 + BN2 + sigmoid + shuffle + gate multiply (y2 never stored).

Everything else about an op (launch choices, launch, registration, autograd) is in ``gam_triton/ops/``.
"""
