"""gam_triton: the GAM attention block (Liu et al. 2021) with fused Triton kernels.

    import gam_triton
    gam = gam_triton.GAM(256)                  # the paper's form
    gam = gam_triton.GAM.from_module(old_gam)   # same function and weights as an existing block
    model = gam_triton.convert(model)           # swap every GAM block of a model, in place
    model = gam_triton.revert(model)            # and back: plain PyTorch modules of the public forms

The channel-MLP gate and the final attention multiply run as Triton kernels on CUDA tensors (and on CPU
tensors under ``TRITON_INTERPRET=1``); the 7x7 convolutions run on cuDNN, or in eval mode as two Triton
convolutions with fused epilogues where faster (``GAM_TRITON_CONV``, see :mod:`gam_triton.ops.conv`).
Elsewhere a PyTorch path with BatchNorm folded and no permute copies runs; that is also all there is where Triton
is not installed (macOS, Windows, CPU-only: ``gam_triton.ops._runtime.HAS_TRITON`` is false), and everything
else (conversion, training, deploy, checkpoints) works the same there. ``python -m gam_triton.bench MODEL``
measures eager against gam_triton on your own model.
"""
from .convert import convert, revert
from .module import GAM, TailedGAM

__all__ = ["GAM", "TailedGAM", "convert", "revert", "__version__"]
__version__ = "0.1.0"
