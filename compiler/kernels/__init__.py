"""Triton kernels behind the fused ops. CUDA only; the CPU paths never need them.

The dependency points one way: the ops (``compiler.ops``) define each op's contract, reference
math and a ``register_cuda_impl`` hook, and import nothing from here; ``compiler.kernels.register``
hands the kernels to those hooks. It is imported once, by ``compiler/__init__.py``, so every use
of ``torch.ops.grapefx`` gets the kernels where triton and a GPU are present (``available()``).
Importing this package itself is safe without triton or a GPU and registers nothing.

Launch paths: by default the kernels are reached through ``torch.library.triton_op``s that
torch.compile decomposes, so Inductor launches them from its generated code (``traced``).
``GRAPEFX_OPAQUE_KERNELS=1`` in the environment keeps them behind the opaque custom ops instead
(their Python bodies launch the kernels): a switch for measuring what the traced path saves.
"""

import contextlib
import importlib.util
import os
import threading

import torch


def triton_installed() -> bool:
    return importlib.util.find_spec("triton") is not None


def available() -> bool:
    """True when the Triton kernels can run: triton importable and a CUDA device present."""
    return triton_installed() and torch.cuda.is_available()


def opaque() -> bool:
    """Whether ``GRAPEFX_OPAQUE_KERNELS`` asks for the opaque launch path (see the module docstring)."""
    return os.environ.get("GRAPEFX_OPAQUE_KERNELS", "0") not in ("", "0")


_traceable = threading.local()


@contextlib.contextmanager
def traceable_launches():
    """Within (the bodies of our ``triton_op``s): ``launch`` wraps kernels with
    ``torch.library.wrap_triton`` so that torch.compile records them as graph nodes."""
    before = getattr(_traceable, "on", False)
    _traceable.on = True
    try:
        yield
    finally:
        _traceable.on = before


def launch(kernel):
    """``kernel`` as the launch site should call it: traceable inside ``traceable_launches()``
    (``wrap_triton``: a graph node while torch.compile traces, a plain launch when the op runs
    eagerly), the kernel itself everywhere else (no tracing wrapper's dispatch on direct calls)."""
    if not getattr(_traceable, "on", False):
        return kernel
    from triton.runtime.autotuner import Autotuner
    from triton.runtime.jit import JITFunction
    # Triton's interpreter (TRITON_INTERPRET=1, CPU tests) gives no JITFunction: nothing to trace there
    jit = kernel.fn if isinstance(kernel, Autotuner) else kernel
    return torch.library.wrap_triton(kernel) if isinstance(jit, JITFunction) else kernel


__all__ = ["available", "triton_installed", "opaque", "launch", "traceable_launches"]
