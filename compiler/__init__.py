"""How a spec becomes fast code: lowering, the op vocabulary, fusion passes, Inductor.

Importing any part of the compiler registers the Triton kernels with the ops (on CUDA, where triton
is installed; nothing elsewhere): the one place ``compiler.kernels`` is brought in, so the ops
themselves never import their kernels.
"""

import compiler.kernels.register  # noqa: F401  (the kernels register themselves with compiler.ops)
