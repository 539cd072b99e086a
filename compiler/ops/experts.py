"""Routed experts: a grouped SwiGLU FFN over the router's top-k choices (MATH.md §5).

    out_t = sum_k gates[t, k] * (silu(x_t W_gate[e]) * (x_t W_up[e])) W_down[e],   e = indices[t, k]

The weights are used as rounded to x's dtype, and their gradients are rounded to x's dtype and
returned in the weights' own dtype: fp32 masters with bf16 rows give exactly the numbers of casting
the weights to bf16 before the op and casting their gradients back after it, without those casts'
kernels. The weight-gradient kernel rounds its fp32 sums and writes them to the fp32 gradients
directly. On baseline.yaml at one micro-batch the casts back were 72 launches a step (three weight
stacks, 24 layers) of 6 bytes a parameter: about 2.4 ms at an H100's bandwidth.

The CPU reference groups the N*K (token, slot) assignments by expert with a stable argsort, so
every expert runs one matmul over its rows (``torch._grouped_mm`` where it has a CPU kernel,
else one matmul per expert), and scatters the results back; there is no loop over tokens.
The math runs in fp32 (fp64 for fp64 inputs) and the output has x's dtype. The backward is
written out (grads to x, gates and the three weight stacks) and recomputes the expert
activations rather than keeping them.

Lean path (CUDA, bf16; ``_lean_applies``): the step's real work, with no host synchronisation
and no per-token Python:

    order, offs = stable sort of the N*K expert ids; offs = searchsorted(sorted ids, 0..E-1, right)
                                            (cumulative int32 group ends, no bincount / .item())
    tok = order // K                        (R,) the token of each sorted row, R = N*K
    gu  = x[tok] @ [W_gate | W_up][e]       (R, 2F): ONE grouped GEMM over both weights
    h   = silu(a) * b                       (R, F)
    y   = grouped_mm(h, W_down)             (R, C)
    out[t] = sum_k g[t,k] y[pos[t*K+k]]     (N, C)   Triton gather-sum with the gates, fp32 sum;
                                            pos = the inverse permutation: no scatter/index_add

With the registered CUDA kernels the first GEMM is a Triton grouped GEMM that reads x's rows where
they lie (no (R, C) copy of x[tok]), takes W_gate and W_up as they are (no concatenated copy) and
applies SwiGLU in its epilogue (``rows_mm_swiglu``); elsewhere x[tok] is gathered, the weights
concatenated, ``torch._grouped_mm`` multiplies and SwiGLU is its own pass (same values: h is computed
from the bf16-rounded a and b either way).

``torch._grouped_mm`` takes bf16 operands with 16-byte aligned strides (C and F multiples of 8)
and int32 cumulative ``offs``; an expert with no rows is an empty group. The forward keeps ``gu``
(and the sort) for the backward, so nothing is recomputed there:

    u   = grad_out[tok] @ W_down[e]^T                                      (R, F)
    dgu, hg, dgate = swiglu_bwd(gu, u, g)                                 one Triton pass
    dW_down[e] = sum_r hg_r^T grad_out[tok_r];  dW_gate | dW_up [e] = sum_r x[tok_r]^T dgu_r
    dxs = grouped_mm(dgu, [W_gate | W_up]^T);  dx[t] = sum_k dxs[pos[t*K+k]]

With the kernels, u and the weight gradients read the rows of grad_out and x in place and the two
halves of dW_gate | dW_up are written straight into their own tensors (``rows_mm``, ``weight_mm``);
elsewhere grad_out[tok] and x[tok] are gathered and ``torch._grouped_mm`` runs, then dW_gate | dW_up
is split by two copies. The weight-gradient GEMMs there use a column-major left operand (a transposed
row-major view), the layout for which the CUTLASS kernel accepts groups of any size, empty ones
included. The kernels need row counts known when tracing; under expert parallelism they are
data-dependent, and the torch ops serve. Where triton is missing the elementwise steps run as torch
ops (same math); the CPU tests run this path in fp32 (``LEAN_ON_CPU``). Out-of-range expert ids are
not checked on this path (the router produces ids in range; the reference path checks).

Structure: ``grapefx::expert_ffn`` is a CompositeImplicitAutograd forwarder to
``grapefx::expert_ffn_fwd`` -> (out, gu, order, offs) (the last three empty on the reference
path) whose autograd calls ``grapefx::expert_ffn_backward``, as ``grapefx::attention`` does: a
custom op's autograd only sees its outputs, so what the backward reuses must be an output.

CUDA. This module imports no kernels: ``compiler.kernels`` (imported once, by
``compiler/__init__.py``, where triton and a GPU are present) registers through
``register_cuda_impl`` the Triton elementwise steps of the lean path and, by default, the
``triton_op``s of ``compiler.kernels.moe_ops`` (same functions, same autograd), which torch.compile
decomposes so that Inductor issues the sort, gathers, grouped GEMMs and Triton launches from its
generated code (no Python op body per call); ``GRAPEFX_OPAQUE_KERNELS=1`` keeps the opaque ops.
"""

import functools
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from torch.fx.experimental.symbolic_shapes import guard_or_false

from compiler.ops._util import compute_dtype, expert_sort_keys


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


def _reference_forward(x: Tensor, indices: Tensor, gates: Tensor, w_gate: Tensor, w_up: Tensor,
                       w_down: Tensor) -> Tensor:
    """The reference math, fp32 (fp64 for fp64 inputs), any device."""
    (N, C), (E, _, F_), K = x.shape, w_gate.shape, indices.shape[1]
    cd = compute_dtype(x.dtype, gates.dtype, w_gate.dtype, w_up.dtype, w_down.dtype)
    order, tok, groups = _route(indices, E, cd, C, F_)
    wg, wu, wd = (_as_used(w, x).to(cd) for w in (w_gate, w_up, w_down))
    xs = x.to(cd)[tok]                                                             # (N*K, C) rows by expert
    gs = gates.reshape(-1)[order].to(cd)                                           # (N*K,)
    h = F.silu(groups.mm(xs, wg)) * groups.mm(xs, wu)                              # (N*K, F)
    y = groups.mm(h, wd) * gs[:, None]                                             # (N*K, C) gated
    return _unsort(y, order).view(N, K, C).sum(1).to(x.dtype)                      # (N, C)


def _reference_backward(grad_out: Tensor, x: Tensor, indices: Tensor, gates: Tensor, w_gate: Tensor, w_up: Tensor,
                        w_down: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(dx, dgates, dw_gate, dw_up, dw_down) of the reference math (formulas: ``expert_ffn_backward``)."""
    (N, C), (E, _, F_), K = x.shape, w_gate.shape, indices.shape[1]
    cd = compute_dtype(x.dtype, gates.dtype, w_gate.dtype, w_up.dtype, w_down.dtype)
    order, tok, groups = _route(indices, E, cd, C, F_)
    wg, wu, wd = (_as_used(w, x).to(cd) for w in (w_gate, w_up, w_down))
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
    return (dx.to(x.dtype), dgates.to(gates.dtype), _as_returned(dw_gate, x, w_gate), _as_returned(dw_up, x, w_up),
            _as_returned(dw_down, x, w_down))


def _as_used(w: Tensor, x: Tensor) -> Tensor:
    """A weight as the op computes with it: rounded to x's dtype (module docstring)."""
    return w.to(x.dtype)


def _as_returned(dw: Tensor, x: Tensor, w: Tensor) -> Tensor:
    """A weight's gradient as the op returns it: rounded to x's dtype, in the weight's own dtype."""
    return dw.to(x.dtype).to(w.dtype)


# ---------------------------------------------------------------------------------------------
# the lean path

LEAN_ON_CPU = False     # tests set this to run the lean path on CPU tensors (fp32 or bf16)


def _lean_applies(x: Tensor, w_gate: Tensor, w_up: Tensor, w_down: Tensor) -> bool:
    """Whether ``expert_ffn`` takes the lean path; decided from metadata only (the fake kernel agrees)."""
    dt = x.dtype
    # the weights in x's dtype, or all fp32 masters (rounded to x's dtype inside: module docstring)
    same = w_gate.dtype == w_up.dtype == w_down.dtype and w_gate.dtype in (dt, torch.float32)
    # guard_or_false: under expert parallelism the row count is data-dependent (unbacked) when compiling
    if not same or guard_or_false(x.shape[0] == 0) or not hasattr(torch, "_grouped_mm"):
        return False
    if x.is_cuda:
        ok_dtype = dt == torch.bfloat16                      # the fast grouped GEMM (no host sync) is bf16
    else:
        ok_dtype = LEAN_ON_CPU and x.device.type == "cpu" and dt in (torch.float32, torch.bfloat16)
    align = 16 // x.element_size()                           # 16-byte aligned strides
    return ok_dtype and x.shape[1] % align == 0 and w_gate.shape[2] % align == 0


# ---------------------------------------------------------------------------------------------
# the lean path's CUDA kernels hook, and its elementwise steps (the registered kernels, else torch ops)

_cuda_kernels = None                    # swiglu_fwd, swiglu_bwd, gather_sum: see register_cuda_impl
_traced_lean: Optional[Callable] = None


def register_cuda_impl(elementwise, traced: Optional[Callable] = None) -> None:
    """Route the lean path's CUDA work to kernels; ``None`` unregisters. ``compiler.kernels`` calls this.

    ``elementwise``: an object (``compiler.kernels.moe``) with the three steps whose torch versions
    follow, same arguments and results: ``swiglu_fwd(gu)``, ``swiglu_bwd(gu, u, g)`` and
    ``gather_sum(src, pos, gates, K)``, and the grouped GEMMs of ``compiler.kernels.grouped_gemm``
    (``rows_mm_swiglu``, ``rows_mm``, ``weight_mm`` and their K tile ``ROWS_DEPTH_MULTIPLE``). They serve CUDA
    tensors only.
    ``traced(x, indices, gates, w_gate, w_up, w_down) -> (out, gu, order, offs)``: the lean forward
    as a traceable op with its autograd, which ``grapefx::expert_ffn`` calls on CUDA where the lean
    path applies (None: the opaque ``grapefx::expert_ffn_fwd`` serves).
    """
    global _cuda_kernels, _traced_lean
    _cuda_kernels = elementwise
    _traced_lean = None if elementwise is None else traced


def _swiglu_fwd(gu: Tensor) -> Tensor:
    k = _cuda_kernels if gu.is_cuda else None
    if k is not None:
        return k.swiglu_fwd(gu)
    a, b = gu.float().chunk(2, dim=-1)
    return (F.silu(a) * b).to(gu.dtype)


def _gather_sum(src: Tensor, pos: Tensor, gates: Optional[Tensor], K: int) -> Tensor:
    k = _cuda_kernels if src.is_cuda else None
    if k is not None:
        return k.gather_sum(src, pos, gates, K)
    R, C = src.shape
    v = src.index_select(0, pos).float().view(R // K, K, C)
    if gates is not None:
        v = v * gates.float().view(R // K, K, 1)
    return v.sum(1).to(src.dtype)


def _swiglu_bwd(gu: Tensor, u: Tensor, g: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    k = _cuda_kernels if gu.is_cuda else None
    if k is not None:
        return k.swiglu_bwd(gu, u, g)
    a, b = gu.float().chunk(2, dim=-1)
    u, g = u.float(), g.float()[:, None]
    sig = torch.sigmoid(a)
    sa = a * sig
    h = sa * b
    dh = g * u
    dgu = torch.cat([dh * b * sig * (1 + a * (1 - sig)), dh * sa], dim=-1)
    return dgu.to(gu.dtype), (g * h).to(gu.dtype), (u * h).sum(-1)


def _lean_route(indices: Tensor, E: int) -> tuple[Tensor, Tensor]:
    """(order (R,) int64: assignments sorted by expert, offs (E,) int32: cumulative group ends)."""
    flat = indices.reshape(-1)                                                     # (R,) expert of each (t, k)
    ids, order = torch.sort(expert_sort_keys(flat, E), stable=True)               # narrow keys: fewer radix passes
    experts = torch.arange(E, device=flat.device, dtype=ids.dtype)
    return order, torch.searchsorted(ids, experts, right=True).to(torch.int32)


def _inverse(order: Tensor) -> Tensor:
    """pos with pos[order[r]] = r: the sorted row of each assignment."""
    return torch.empty_like(order).scatter_(0, order, torch.arange(order.numel(), device=order.device))


def _grouped_kernels(x: Tensor):
    """The registered kernels' grouped GEMMs that read rows in place, where they serve: CUDA tensors
    whose row count is known when tracing (under expert parallelism it is data-dependent) and whose
    width C, the depth of their products, is a multiple of their K tile (``ROWS_DEPTH_MULTIPLE``); else None."""
    k = _cuda_kernels if x.is_cuda else None
    static = not isinstance(x.shape[0], torch.SymInt)
    return k if k is not None and static and x.shape[1] % k.ROWS_DEPTH_MULTIPLE == 0 else None


def _lean_forward(x: Tensor, indices: Tensor, gates: Tensor, w_gate: Tensor, w_up: Tensor,
                  w_down: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(out (N, C), gu (R, 2F), order (R,), offs (E,)) -- formulas in the module docstring."""
    K, E = indices.shape[1], w_gate.shape[0]
    w_gate, w_up, w_down = (_as_used(w, x) for w in (w_gate, w_up, w_down))
    order, offs = _lean_route(indices, E)
    tok = order // K                                                               # (R,) token of each sorted row
    k = _grouped_kernels(x)
    if k is not None:
        gu, h = k.rows_mm_swiglu(x.contiguous(), tok, offs, w_gate, w_up)          # rows read in place, SwiGLU fused
    else:
        xs = x.index_select(0, tok)                                                # (R, C) rows by expert
        gu = torch._grouped_mm(xs, torch.cat([w_gate, w_up], dim=2), offs=offs)    # (R, 2F)
        h = _swiglu_fwd(gu)                                                        # (R, F)
    y = torch._grouped_mm(h, w_down, offs=offs)                                    # (R, C)
    out = _gather_sum(y, _inverse(order), gates.reshape(-1), K)                    # (N, C) gated sum
    return out, gu, order, offs


def _lean_backward(grad_out: Tensor, x: Tensor, indices: Tensor, gates: Tensor, w_gate: Tensor, w_up: Tensor,
                   w_down: Tensor, gu: Optional[Tensor], order: Optional[Tensor],
                   offs: Optional[Tensor]) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    N, F_, K = x.shape[0], w_gate.shape[2], indices.shape[1]
    if gu is None or gu.numel() == 0 or order is None or offs is None:
        _, gu, order, offs = _lean_forward(x, indices, gates, w_gate, w_up, w_down)
    tok, pos = order // K, _inverse(order)
    g = gates.reshape(-1).index_select(0, order)                                   # (R,) gate of each row
    grad_out, x = grad_out.to(x.dtype).contiguous(), x.contiguous()
    grad_dtype = w_gate.dtype                                                      # the weights' own (all one dtype)
    w_gate, w_up, w_down = (_as_used(w, x) for w in (w_gate, w_up, w_down))
    k = _grouped_kernels(x)
    if k is not None:                                                              # rows of x and grad_out read in place
        u = k.rows_mm(grad_out, tok, offs, w_down.transpose(1, 2))                 # (R, F)
        dgu, hg, dgate = _swiglu_bwd(gu, u, g)                                     # (R, 2F), (R, F), (R,)
        # contiguous, in the weights' own dtype: the kernel rounds its fp32 sums to x's dtype and writes them there
        dw_down, dw_gate, dw_up = (w.new_empty(w.shape, dtype=grad_dtype) for w in (w_down, w_gate, w_up))
        k.weight_mm(hg, None, grad_out, tok, offs, dw_down)                        # (E, F, C)
        k.weight_mm(x, tok, dgu, None, offs, dw_gate, dw_up)                       # (E, C, F) each, one pass
    else:
        xs = x.index_select(0, tok)                                                # (R, C)
        dy = grad_out.index_select(0, tok)                                         # (R, C)
        u = torch._grouped_mm(dy, w_down.transpose(1, 2), offs=offs)               # (R, F)
        dgu, hg, dgate = _swiglu_bwd(gu, u, g)
        dw_down = torch._grouped_mm(hg.t(), dy, offs=offs).to(grad_dtype)          # (E, F, C)
        dw_gu = torch._grouped_mm(xs.t(), dgu, offs=offs)                          # (E, C, 2F): one GEMM, N = 2F
        dw_gate, dw_up = (half.to(grad_dtype).contiguous() for half in (dw_gu[..., :F_], dw_gu[..., F_:]))
    w_gu = torch.cat([w_gate, w_up], dim=2)                                        # (E, C, 2F)
    dxs = torch._grouped_mm(dgu, w_gu.transpose(1, 2), offs=offs)                  # (R, C)
    dx = _gather_sum(dxs, pos, None, K)                                            # (N, C)
    dgates = dgate.index_select(0, pos).view(N, K)
    return dx, dgates.to(gates.dtype), dw_gate, dw_up, dw_down


# ---------------------------------------------------------------------------------------------
# the ops

def _empty_saved(x: Tensor, indices: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """What the reference path returns in place of (gu, order, offs): nothing to reuse."""
    return x.new_empty(0), indices.new_empty(0), indices.new_empty(0, dtype=torch.int32)


@torch.library.custom_op("grapefx::expert_ffn_fwd", mutates_args=())
def expert_ffn_fwd(x: Tensor, indices: Tensor, gates: Tensor, w_gate: Tensor, w_up: Tensor,
                   w_down: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Gated sum of the chosen experts' SwiGLU outputs (MATH.md §5), and what its backward reuses.

    x (N, C), indices (N, K) int64, gates (N, K), w_gate/w_up (E, C, F), w_down (E, F, C)
    -> out (N, C) in x's dtype, and on the lean path gu (N*K, 2F), order (N*K,) int64 and
    offs (E,) int32 (empty tensors on the reference path).
    """
    _check(x, indices, gates, w_gate, w_up, w_down)
    if _lean_applies(x, w_gate, w_up, w_down):
        return _lean_forward(x, indices, gates, w_gate, w_up, w_down)
    return (_reference_forward(x, indices, gates, w_gate, w_up, w_down), *_empty_saved(x, indices))


@expert_ffn_fwd.register_fake
def _(x, indices, gates, w_gate, w_up, w_down):
    _check(x, indices, gates, w_gate, w_up, w_down)
    if _lean_applies(x, w_gate, w_up, w_down):
        R = indices.numel()
        return (x.new_empty(x.shape), x.new_empty(R, 2 * w_gate.shape[2]), indices.new_empty(R),
                indices.new_empty(w_gate.shape[0], dtype=torch.int32))
    return (x.new_empty(x.shape), *_empty_saved(x, indices))


@torch.library.custom_op("grapefx::expert_ffn_backward", mutates_args=())
def expert_ffn_backward(grad_out: Tensor, x: Tensor, indices: Tensor, gates: Tensor, w_gate: Tensor, w_up: Tensor,
                        w_down: Tensor, gu: Optional[Tensor] = None, order: Optional[Tensor] = None,
                        offs: Optional[Tensor] = None) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Backward of ``expert_ffn``: (dx, dgates, dw_gate, dw_up, dw_down), each like its input.

    Per sorted row s (token t, expert e, gate g_s), with a = x W_gate, b = x W_up, h = silu(a) b
    and u = grad_out_t W_down^T:  dgate_s = u . h,  dh = g_s u,  dW_down += h^T (g_s grad_out_t),
    da = dh * b * silu'(a),  db = dh * silu(a),  dW_gate += x^T da,  dW_up += x^T db,
    dx_t += da W_gate^T + db W_up^T; silu'(a) = sigma(a) (1 + a (1 - sigma(a))).
    ``gu``, ``order``, ``offs``: the lean forward's saved outputs (recomputed when absent or empty).
    """
    if _lean_applies(x, w_gate, w_up, w_down):
        return _lean_backward(grad_out, x, indices, gates, w_gate, w_up, w_down, gu, order, offs)
    return _reference_backward(grad_out, x, indices, gates, w_gate, w_up, w_down)


@expert_ffn_backward.register_fake
def _(grad_out, x, indices, gates, w_gate, w_up, w_down, gu=None, order=None, offs=None):
    return tuple(t.new_empty(t.shape) for t in (x, gates, w_gate, w_up, w_down))


def setup_context(ctx, inputs, output):
    """Saves the inputs and the forward's (gu, order, offs) for ``backward_through``."""
    _, gu, order, offs = output
    ctx.save_for_backward(*inputs, gu, order, offs)
    ctx.mark_non_differentiable(gu, order, offs)


def backward_through(backward_op):
    """The autograd formula of a forward op returning (out, gu, order, offs): ``backward_op`` takes
    (grad_out, x, indices, gates, w_gate, w_up, w_down, gu, order, offs) -> the five gradients."""
    def backward(ctx, grad_out, _grad_gu, _grad_order, _grad_offs):
        x, indices, gates, w_gate, w_up, w_down, gu, order, offs = ctx.saved_tensors
        dx, dgates, dw_gate, dw_up, dw_down = backward_op(grad_out.contiguous(), x, indices, gates,
                                                          w_gate, w_up, w_down, gu, order, offs)
        return dx, None, dgates, dw_gate, dw_up, dw_down
    return backward


expert_ffn_fwd.register_autograd(backward_through(expert_ffn_backward), setup_context=setup_context)

# The public op: what the lowering writes into the MoE graphs.
_lib = torch.library.Library("grapefx", "FRAGMENT")
_lib.define("expert_ffn(Tensor x, Tensor indices, Tensor gates, Tensor w_gate, Tensor w_up, Tensor w_down) -> Tensor")


def _expert_ffn_kernel(x, indices, gates, w_gate, w_up, w_down):
    if x.is_cuda and _traced_lean is not None and _lean_applies(x, w_gate, w_up, w_down):
        return _traced_lean(x, indices, gates, w_gate, w_up, w_down)[0]
    return torch.ops.grapefx.expert_ffn_fwd(x, indices, gates, w_gate, w_up, w_down)[0]


_lib.impl("expert_ffn", _expert_ffn_kernel, "CompositeImplicitAutograd")


def expert_ffn(x: Tensor, indices: Tensor, gates: Tensor, w_gate: Tensor, w_up: Tensor, w_down: Tensor) -> Tensor:
    """``torch.ops.grapefx.expert_ffn``: the gated sum of the chosen experts' SwiGLU outputs (MATH.md §5).

    x (N, C), indices (N, K) int64, gates (N, K), w_gate/w_up (E, C, F), w_down (E, F, C)
    -> (N, C) in x's dtype. Gradients flow to x, gates and the three weights.
    """
    return torch.ops.grapefx.expert_ffn(x, indices, gates, w_gate, w_up, w_down)
