"""The lean expert step as traceable ops: what ``grapefx::expert_ffn`` runs on CUDA by default.

``grapefx::expert_ffn_lean_fwd`` -> (out, gu, order, offs) and ``grapefx::expert_ffn_lean_bwd``
are ``torch.library.triton_op``s over ``compiler.ops.experts``' lean forward and backward (the
formulas are there), with the same autograd as the opaque ``grapefx::expert_ffn_fwd``. Under
torch.compile AOTAutograd decomposes them into their bodies: the sort, the gathers, the grouped
GEMMs and the Triton SwiGLU / gather-sum launches (``wrap_triton``) become nodes of the compiled
graph, issued from Inductor's generated code, and the fp32 -> bf16 weight casts in front of them
can fuse with the concatenation of W_gate and W_up. Eagerly they run as ordinary custom ops.

Imported only where triton is installed (defining a ``triton_op`` inspects triton).
"""

from typing import Optional

from torch import Tensor
from torch.library import triton_op

from compiler.kernels import traceable_launches
from compiler.ops.experts import _lean_backward, _lean_forward, backward_through, setup_context

__all__ = ["expert_ffn_lean_fwd", "expert_ffn_lean_bwd"]


@triton_op("grapefx::expert_ffn_lean_fwd", mutates_args=())
def expert_ffn_lean_fwd(x: Tensor, indices: Tensor, gates: Tensor, w_gate: Tensor, w_up: Tensor,
                        w_down: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(out (N, C), gu (N*K, 2F), order (N*K,), offs (E,)) of the lean forward."""
    with traceable_launches():
        return _lean_forward(x, indices, gates, w_gate, w_up, w_down)


@triton_op("grapefx::expert_ffn_lean_bwd", mutates_args=())
def expert_ffn_lean_bwd(grad_out: Tensor, x: Tensor, indices: Tensor, gates: Tensor, w_gate: Tensor, w_up: Tensor,
                        w_down: Tensor, gu: Optional[Tensor] = None, order: Optional[Tensor] = None,
                        offs: Optional[Tensor] = None) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(dx, dgates, dw_gate, dw_up, dw_down) of the lean backward."""
    with traceable_launches():
        return _lean_backward(grad_out, x, indices, gates, w_gate, w_up, w_down, gu, order, offs)


expert_ffn_lean_fwd.register_autograd(backward_through(expert_ffn_lean_bwd), setup_context=setup_context)
