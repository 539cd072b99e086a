"""Where the Triton kernel tests run (imported by name: the test folders have no __init__.py).

``on_gpu_or_interpreter()`` is called by those test modules before anything imports triton: it
skips the module where triton is missing (CI), returns True where a GPU runs the kernels, and
otherwise turns on Triton's interpreter (``TRITON_INTERPRET=1``) and returns False. Triton decides
at decoration time whether a @jit function is interpreted, its own library included, so the
variable must be set before triton is first imported in the process.
"""

import importlib.util
import os
import sys

import pytest
import torch


def on_gpu_or_interpreter() -> bool:
    if importlib.util.find_spec("triton") is None:
        pytest.skip("triton is not installed", allow_module_level=True)
    if torch.cuda.is_available():
        return True
    if "triton" in sys.modules and os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
        pytest.skip("triton was imported before TRITON_INTERPRET=1 was set; run this file in its own "
                    "process (or export TRITON_INTERPRET=1)", allow_module_level=True)
    os.environ["TRITON_INTERPRET"] = "1"
    import numpy
    if tuple(int(x) for x in numpy.__version__.split(".")[:2]) >= (2, 4):
        pytest.skip("Triton's interpreter mis-runs loops whose bounds depend on the program id with numpy >= 2.4; "
                    "run these tests with numpy < 2.4 (pip install 'numpy<2.4')", allow_module_level=True)
    return False
