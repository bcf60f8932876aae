"""gam_triton's fused ops: one file per op, holding all there is to know about it but its jit kernels.

Each op file has, in this order: the math and where its gradient comes from (docstring); the heuristic and the
candidate launch choices (``triton.Config``, the kernel's own parameter names) and the tuning key; the launch
arguments (``*launch_args``: kernel, grid, arguments, all launched through ``_runtime.launch``); the op,
registered through :func:`gam_triton.ops._runtime.entry`; its PyTorch fallback; the checked public function
(``gam_triton.ops.channel_gate.channel_gate``, ``gam_triton.ops.elementwise.final_gate`` / ``bn_relu``,
``gam_triton.ops.conv.conv_bn_relu`` / ``conv_gate`` / ``spatial_eval``).

* :mod:`.channel_gate` - x1 = x * g(W2 relu(W1 x + b1) + b2), forward and the train block's fused backward.
* :mod:`.elementwise`  - the final gate (BN2, sigmoid, shuffle, multiply) and BatchNorm-apply + ReLU.
* :mod:`.batchnorm`    - BatchNorm on batch statistics: statistics, backward reductions and apply.
* :mod:`.conv`         - the eval spatial branch: Triton convolutions with fused epilogues, or cuDNN.
* :mod:`.train_block`  - the train-mode block as two ops around an autograd.Function.

Shared: :mod:`._runtime` (where kernels run, allocation, checks, registration, the one launch seam) and
:mod:`._autotune` (the tuner). The jit kernels are in ``kernels/`` (shipped as ``gam_triton.kernels``).
"""
