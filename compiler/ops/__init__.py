"""The grapefx op vocabulary, registered with ``torch.library`` in the namespace ``grapefx``.

Importing this package defines ``torch.ops.grapefx.*``. Every op has a reference kernel that
runs on any device (CPU first), a fake kernel (shapes and dtypes only, so torch.compile traces
it with no graph break) and an explicit autograd formula. One module per op family:

| op (``torch.ops.grapefx.``)                 | module       | MATH.md |
| ------------------------------------------- | ------------ | ------- |
| ``grape_m_rotate(x, theta, pos_offset=0)``  | grape_m.py   | §2      |
| ``alibi_bias(slopes, q_len, k_len)``        | alibi.py     | §3      |
| ``attention(q, k, v, theta, slopes, window, scale, bias=None)`` (+ ``attention_fwd``, ``attention_bwd``) | attention.py | §1–§3 |
| ``router_topk(choice_scores, k, num_groups, group_topk)`` | router.py | §5 |
| ``expert_ffn(x, indices, gates, w_gate, w_up, w_down)`` (+ ``expert_ffn_fwd``, ``expert_ffn_backward``) | experts.py | §5 |
| ``linear_cross_entropy(x, weight, targets, ignore_index=-100)`` (+ ``_fwd``, ``_fwd_bwd``) | linear_cross_entropy.py | §6 |
| ``expert_dispatch(x, indices, experts, ranks, group, capacity_factor)``, ``expert_combine(y, gates, order, splits, group)`` | expert_parallel.py | §5 |

Python helpers: ``grape_m_init_log_freq``, ``grape_m_theta``, ``alibi_slopes``; ``router.router_logits``
(the router's fp32 logits from bf16 tokens: plain torch ops that torch.compile traces through).

Note: the package attribute ``compiler.ops.attention`` is the op wrapper (a function), not the
module; reach the module's other names with ``from compiler.ops.attention import register_cuda_impl``.
"""

from compiler.ops.alibi import alibi_bias, alibi_slopes
from compiler.ops.attention import attention
from compiler.ops.expert_parallel import expert_combine, expert_dispatch
from compiler.ops.experts import expert_ffn
from compiler.ops.grape_m import grape_m_init_log_freq, grape_m_rotate, grape_m_theta
from compiler.ops.linear_cross_entropy import linear_cross_entropy
from compiler.ops.router import router_topk

__all__ = [
    "alibi_bias", "alibi_slopes", "attention", "expert_combine", "expert_dispatch", "expert_ffn", "grape_m_init_log_freq", "grape_m_rotate",
    "grape_m_theta", "linear_cross_entropy", "router_topk",
]
