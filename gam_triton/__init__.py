"""gam_triton: the GAM attention block (Liu et al. 2021) with fused Triton kernels.

    import gam_triton
    gam = gam_triton.GAM(256)                  # the paper's form
    gam = gam_triton.GAM.from_module(old_gam)   # same function and weights as an existing block
    model = gam_triton.convert(model)           # swap every GAM block of a model, in place
    model = gam_triton.revert(model)            # and back: plain PyTorch modules of the public forms

The channel-MLP gate and the final attention multiply run as Triton kernels on CUDA tensors (and on CPU
tensors under ``TRITON_INTERPRET=1``); the 7x7 convolutions run on cuDNN, or in eval mode as two Triton
convolutions with fused epilogues where faster (``GAM_TRITON_CONV``, see :mod:`gam_triton.ops.conv`).
Elsewhere a PyTorch path with BatchNorm folded and no permute copies runs.
"""
from .convert import convert, revert
from .module import GAM

__all__ = ["GAM", "convert", "revert", "__version__"]
__version__ = "0.1.0"
