"""The router's selection kernel as a traceable op: what ``grapefx::router_topk`` runs on CUDA by default.

``grapefx::router_select_triton`` -> (indices, counts) is a ``torch.library.triton_op`` over
``compiler.kernels.router.router_topk`` (the formula is there). Under torch.compile it decomposes into
its body, so Inductor issues the two allocations and the kernel's launch (``wrap_triton``) from its
generated code, where the opaque ``grapefx::router_select`` runs its Python body (the argument checks,
the dispatch, the launch) once per MoE layer per step. Eagerly it runs as an ordinary custom op. It
takes scores that need no gradient (``grapefx::router_topk`` detaches them): the selection has none.

Imported only where triton is installed (defining a ``triton_op`` inspects triton).
"""

from torch import Tensor
from torch.library import triton_op

from compiler.kernels import traceable_launches
from compiler.kernels.router import router_topk

__all__ = ["router_select_triton"]


@triton_op("grapefx::router_select_triton", mutates_args=())
def router_select_triton(choice_scores: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """(indices (N, k) int64, counts (E,) fp32) of ``router_topk`` over fp32 scores, E <= 256, no group limit."""
    with traceable_launches():
        return router_topk(choice_scores, k)
