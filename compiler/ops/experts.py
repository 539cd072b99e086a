"""Routed experts: a grouped SwiGLU FFN over the router's top-k choices (MATH.md §5).

    out_t = sum_k gates[t, k] * (silu(x_t W_gate[e]) * (x_t W_up[e])) W_down[e],   e = indices[t, k]

The CPU reference groups the N*K (token, slot) assignments by expert with a stable argsort, so
every expert runs one matmul over its rows (``torch._grouped_mm`` where it has a CPU kernel,
else one matmul per expert), and scatters the results back; there is no loop over tokens.
The math runs in fp32 (fp64 for fp64 inputs) and the output has x's dtype. The backward is
written out (grads to x, gates and the three weight stacks) and recomputes the expert
activations rather than keeping them.
"""

import functools

import torch
import torch.nn.functional as F
from torch import Tensor

from compiler.ops._util import compute_dtype


def _check(x: Tensor, indices: Tensor, gates: Tensor, w_gate: Tensor, w_up: Tensor, w_down: Tensor) -> None:
    if x.dim() != 2 or indices.dim() != 2 or indices.shape[0] != x.shape[0] or gates.shape != indices.shape:
        raise ValueError(f"expert_ffn: need x (N, C), indices (N, K), gates (N, K); got "
                         f"{tuple(x.shape)}, {tuple(indices.shape)}, {tuple(gates.shape)}")
    if indices.dtype != torch.int64:
        raise ValueError(f"expert_ffn: indices must be int64, got {indices.dtype}")
    C = x.shape[1]
    if w_gate.dim() != 3 or w_gate.shape[1] != C or w_up.shape != w_gate.shape:
        raise ValueError(f"expert_ffn: w_gate and w_up must be (E, C={C}, F); got {tuple(w_gate.shape)}, {tuple(w_up.shape)}")
    E, _, F_ = w_gate.shape
    if tuple(w_down.shape) != (E, F_, C):
        raise ValueError(f"expert_ffn: w_down must be (E, F, C) = ({E}, {F_}, {C}); got {tuple(w_down.shape)}")


@functools.cache
def _grouped_mm_works() -> bool:
    """Whether this torch build has a CPU ``torch._grouped_mm`` (fp32, 16-byte aligned strides).

    Checked once on a tiny case against per-expert matmuls; builds without the kernel raise.
    """
    if not hasattr(torch, "_grouped_mm"):
        return False
    a = torch.arange(24, dtype=torch.float32).view(6, 4) / 8                      # 6 rows, 2 experts
    w = torch.arange(32, dtype=torch.float32).view(2, 4, 4) / 8
    try:
        y = torch._grouped_mm(a, w, offs=torch.tensor([2, 6], dtype=torch.int32))
    except (RuntimeError, NotImplementedError):
        return False
    return torch.equal(y, torch.cat([a[:2] @ w[0], a[2:] @ w[1]]))


class _Groups:
    """Rows sorted by expert: ``sizes`` rows per expert, and the grouped-matmul path if it applies.

    ``torch._grouped_mm`` on CPU takes fp32 (bf16 and fp16 too, but the reference computes in
    fp32) and needs 16-byte aligned strides, i.e. C and F multiples of 4; fp64 (gradcheck), other
    devices and unaligned widths use one matmul per expert.
    """

    def __init__(self, counts: Tensor, dtype: torch.dtype, C: int, F_: int):
        self.grouped = (counts.device.type == "cpu" and dtype == torch.float32 and C % 4 == 0 and F_ % 4 == 0
                        and _grouped_mm_works())
        if self.grouped:
            self.offs = torch.cumsum(counts, 0).to(torch.int32)                     # (E,) end row of each expert
        else:
            self.sizes = counts.tolist()

    def mm(self, a: Tensor, w: Tensor) -> Tensor:
        """Each expert's rows of a (R, I) times its w[e] (E, I, O) -> (R, O)."""
        if self.grouped:
            return torch._grouped_mm(a, w, offs=self.offs)
        return torch.cat([a_e @ w[e] for e, a_e in enumerate(a.split(self.sizes))])

    def mm_weight(self, a: Tensor, b: Tensor) -> Tensor:
        """Per expert, a_e^T b_e over its rows: a (R, I), b (R, O) -> (E, I, O)."""
        if self.grouped:
            return torch._grouped_mm(a.t(), b, offs=self.offs)
        return torch.stack([a_e.t() @ b_e for a_e, b_e in zip(a.split(self.sizes), b.split(self.sizes))])


def _route(indices: Tensor, E: int, dtype: torch.dtype, C: int, F_: int) -> tuple[Tensor, Tensor, _Groups]:
    """Sort the N*K assignments by expert: (order (N*K,), token of each sorted row (N*K,), groups)."""
    flat = indices.reshape(-1)                                                     # (N*K,) expert of each (t, k)
    if flat.numel() and (int(flat.min()) < 0 or int(flat.max()) >= E):
        raise ValueError(f"expert_ffn: expert indices must lie in [0, {E}); got {int(flat.min())}..{int(flat.max())}")
    order = torch.argsort(flat, stable=True)                                       # (N*K,) rows grouped by expert
    counts = torch.bincount(flat, minlength=E)                                     # (E,)
    return order, order // indices.shape[1], _Groups(counts, dtype, C, F_)


def _unsort(rows: Tensor, order: Tensor) -> Tensor:
    """Put sorted rows back in (token, slot) order: out[order[r]] = rows[r]."""
    out = torch.empty_like(rows)
    out[order] = rows
    return out


@torch.library.custom_op("grapefx::expert_ffn", mutates_args=())
def expert_ffn(x: Tensor, indices: Tensor, gates: Tensor, w_gate: Tensor, w_up: Tensor, w_down: Tensor) -> Tensor:
    """Gated sum of the chosen experts' SwiGLU outputs (MATH.md §5).

    x (N, C), indices (N, K) int64, gates (N, K), w_gate/w_up (E, C, F), w_down (E, F, C)
    -> (N, C) in x's dtype. Gradients flow to x, gates and the three weights.
    """
    _check(x, indices, gates, w_gate, w_up, w_down)
    (N, C), (E, _, F_), K = x.shape, w_gate.shape, indices.shape[1]
    cd = compute_dtype(x.dtype, gates.dtype, w_gate.dtype, w_up.dtype, w_down.dtype)
    order, tok, groups = _route(indices, E, cd, C, F_)
    xs = x.to(cd)[tok]                                                             # (N*K, C) rows by expert
    gs = gates.reshape(-1)[order].to(cd)                                           # (N*K,)
    h = F.silu(groups.mm(xs, w_gate.to(cd))) * groups.mm(xs, w_up.to(cd))          # (N*K, F)
    y = groups.mm(h, w_down.to(cd)) * gs[:, None]                                  # (N*K, C) gated
    return _unsort(y, order).view(N, K, C).sum(1).to(x.dtype)                      # (N, C)


@expert_ffn.register_fake
def _(x, indices, gates, w_gate, w_up, w_down):
    _check(x, indices, gates, w_gate, w_up, w_down)
    return x.new_empty(x.shape)


@torch.library.custom_op("grapefx::expert_ffn_backward", mutates_args=())
def expert_ffn_backward(grad_out: Tensor, x: Tensor, indices: Tensor, gates: Tensor, w_gate: Tensor, w_up: Tensor,
                        w_down: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Backward of ``expert_ffn``: (dx, dgates, dw_gate, dw_up, dw_down), each like its input.

    Per sorted row s (token t, expert e, gate g_s), with a = x W_gate, b = x W_up, h = silu(a) b
    and u = grad_out_t W_down^T:  dgate_s = u . h,  dh = g_s u,  dW_down += h^T (g_s grad_out_t),
    da = dh * b * silu'(a),  db = dh * silu(a),  dW_gate += x^T da,  dW_up += x^T db,
    dx_t += da W_gate^T + db W_up^T; silu'(a) = sigma(a) (1 + a (1 - sigma(a))).
    """
    (N, C), (E, _, F_), K = x.shape, w_gate.shape, indices.shape[1]
    cd = compute_dtype(x.dtype, gates.dtype, w_gate.dtype, w_up.dtype, w_down.dtype)
    order, tok, groups = _route(indices, E, cd, C, F_)
    wg, wu, wd = w_gate.to(cd), w_up.to(cd), w_down.to(cd)
    xs = x.to(cd)[tok]                                                             # (N*K, C)
    gs = gates.reshape(-1)[order].to(cd)[:, None]                                  # (N*K, 1)
    gt = grad_out.to(cd)[tok]                                                      # (N*K, C) dL/dout of each row's token
    a, b = groups.mm(xs, wg), groups.mm(xs, wu)                                    # (N*K, F) recomputed
    sig = torch.sigmoid(a)
    sa = a * sig                                                                   # silu(a)
    h = sa * b
    u = groups.mm(gt, wd.transpose(1, 2))                                          # (N*K, F)
    dgates = _unsort((u * h).sum(-1), order).view(N, K)                            # (N, K)
    dh = u * gs
    dw_down = groups.mm_weight(h, gt * gs)                                         # (E, F, C)
    da = dh * b * sig * (1 + a * (1 - sig))
    db = dh * sa
    dw_gate, dw_up = groups.mm_weight(xs, da), groups.mm_weight(xs, db)            # (E, C, F)
    dxs = groups.mm(da, wg.transpose(1, 2)) + groups.mm(db, wu.transpose(1, 2))    # (N*K, C)
    dx = _unsort(dxs, order).view(N, K, C).sum(1)                                  # (N, C)
    return (dx.to(x.dtype), dgates.to(gates.dtype), dw_gate.to(w_gate.dtype), dw_up.to(w_up.dtype),
            dw_down.to(w_down.dtype))


@expert_ffn_backward.register_fake
def _(grad_out, x, indices, gates, w_gate, w_up, w_down):
    return tuple(t.new_empty(t.shape) for t in (x, gates, w_gate, w_up, w_down))


def _setup_context(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _backward(ctx, grad_out):
    x, indices, gates, w_gate, w_up, w_down = ctx.saved_tensors
    dx, dgates, dw_gate, dw_up, dw_down = expert_ffn_backward(grad_out.contiguous(), x, indices, gates,
                                                              w_gate, w_up, w_down)
    return dx, None, dgates, dw_gate, dw_up, dw_down


expert_ffn.register_autograd(_backward, setup_context=_setup_context)
