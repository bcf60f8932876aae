"""Triton kernels of gam_triton, shipped inside the package as ``gam_triton.kernels``.

One file per fused operation; each file holds only ``@triton.jit`` kernels (no launch logic):

* :mod:`.channel_gate` - x1 = x * g(W2 relu(W1 x + b1) + b2), the channel MLP gate, in one pass.
* :mod:`.final_gate`   - out = x1 * sigmoid(scale * y2 + shift), channel shuffle folded in.
* :mod:`.bn_relu`      - z = relu(scale * y + shift), BatchNorm-apply + ReLU between the convolutions.
* :mod:`.conv`         - the eval spatial branch: KxK implicit-GEMM convolutions, conv1 + BN1 + ReLU and
  conv2 + BN2 + sigmoid + shuffle + gate multiply (y2 never stored).
* :mod:`.tiles`        - the [b, c, p] tile indexing the two elementwise kernels share.
* :mod:`.batchnorm`    - train mode: BatchNorm batch statistics (running statistics updated), BatchNorm
  backward reductions and elementwise pass (BN1 + ReLU; BN2 + sigmoid + shuffle + final gate).
* :mod:`.channel_gate_bwd` - train mode: the channel gate's backward (dx, the rows of the weight-gradient
  GEMMs, the bias gradients).

The launch functions, autograd and custom-op registration live in ``gam_triton/``.
"""
