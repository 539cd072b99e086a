"""Triton kernels behind the fused ops (issue 7). CUDA only; the CPU paths never need them.

Importing this package is safe without triton or a GPU. Where both are present it registers the
attention kernels with ``grapefx::attention_fwd``/``attention_bwd`` through
``compiler.ops.attention.register_cuda_impl`` (the op imports this package on its first CUDA
call). ``available()`` says whether that happened here.
"""

import importlib.util

import torch


def triton_installed() -> bool:
    return importlib.util.find_spec("triton") is not None


def available() -> bool:
    """True when the Triton kernels can run: triton importable and a CUDA device present."""
    return triton_installed() and torch.cuda.is_available()


def _register() -> None:
    if available():
        from compiler.kernels.attention import cuda_backward, cuda_forward
        from compiler.ops.attention import register_cuda_impl
        register_cuda_impl(cuda_forward, cuda_backward)


_register()

__all__ = ["available", "triton_installed"]
