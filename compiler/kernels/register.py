"""Hands the Triton kernels to the ops' CUDA hooks; imported once, by ``compiler/__init__.py``.

Where ``available()`` (triton importable and a GPU present):

- ``grapefx::attention``: ``cuda_forward`` / ``cuda_backward`` (``compiler.kernels.attention``) for
  the opaque ops, and by default the traced ``triton_op``s of ``compiler.kernels.attention_ops``;
- ``grapefx::expert_ffn``: the lean path's elementwise kernels (``compiler.kernels.moe``), and by
  default the traced lean forward of ``compiler.kernels.moe_ops``;
- ``grapefx::linear_cross_entropy``: the row kernel of ``compiler.kernels.cross_entropy``;
- ``grapefx::router_topk``: the selection kernel of ``compiler.kernels.router``, and by default its
  traced ``triton_op`` of ``compiler.kernels.router_ops``.

``GRAPEFX_OPAQUE_KERNELS=1`` (read here, once) leaves the traced ops out, so the opaque custom ops
launch the kernels from their Python bodies. Elsewhere nothing is registered and the ops' references
serve every device.
"""

import compiler.kernels as kernels


def register() -> None:
    """Register every kernel with its op (see the module docstring); a no-op where not ``available()``."""
    if not kernels.available():
        return
    from compiler.kernels import cross_entropy, moe, router           # these import triton
    from compiler.kernels.attention import cuda_backward, cuda_forward
    from compiler.ops.attention import register_cuda_impl as register_attention
    from compiler.ops.experts import register_cuda_impl as register_experts
    from compiler.ops.linear_cross_entropy import register_cuda_impl as register_linear_cross_entropy
    from compiler.ops.router import register_cuda_impl as register_router
    traced_attention = traced_lean = traced_router = None
    if not kernels.opaque():
        from compiler.kernels.attention_ops import traced_attention    # defining a triton_op inspects triton
        from compiler.kernels.moe_ops import expert_ffn_lean_fwd as traced_lean
        from compiler.kernels.router_ops import router_select_triton as traced_router
    register_attention(cuda_forward, cuda_backward, traced_attention)
    register_experts(moe, traced_lean)
    register_linear_cross_entropy(cross_entropy.ce_rows)
    register_router(router.router_topk, router.MAX_EXPERTS, traced_router)


register()
