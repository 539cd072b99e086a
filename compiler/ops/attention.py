"""The fused attention op: causal, sliding window, GRAPE-M rotation, ALiBi bias, GQA (MATH.md §1–§3).

    out = attention(q (B, Hq, T, D), k (B, Hkv, T, D), v (B, Hkv, T, D), theta, slopes, window, scale,
                    bias=None)

For query head h, query i and key j (h reads KV head h // G, G = Hq / Hkv):

    S[h, i, j] = scale * (R(i theta) q_i) . (R(j theta) k_j)  -  slopes[h] * (i - j)  +  bias[h, i, j]
    visible    = j <= i  and  (window == 0  or  i - j <= window - 1)
    out[h, i]  = sum_j softmax_j(S[h, i, :] over visible j) v_j

- Causal always. ``window = W > 0``: query i sees keys max(0, i-W+1)..i, W keys counting itself
  (MATH.md §1; Megatron's ``--window-size W-1,0``). ``window = 0``: full causal.
- ``theta`` (D/2,) fp32 given: q and k are rotated at positions 0..T-1 exactly as
  ``grape_m_rotate`` does (fp32 angles, result rounded to q's dtype); None: no rotation.
- ``slopes`` (Hq,) fp32 given: the ALiBi bias is added after the scaling, in fp32; None: no bias.
- ``bias`` (optional, fp32, broadcastable to (Hq, T, T)): a dense additive score bias, added after
  the scaling like the slopes. It exists so that the fusion pass ``attention_formation`` can fold
  ANY additive bias of the explicit chain (the unfused-bias state stays representable);
  ``bias_softmax`` then turns an ALiBi bias into ``slopes``. Reference path only: a call with a
  bias never reaches the CUDA kernels (they always get ``bias=None``); it runs the reference.
  Gradient: dS summed over the batch and over the dimensions the bias was broadcast along.
- GQA by grouping: q is viewed as (B, Hkv, G*T, D) so one matmul per KV head serves its G query
  heads; K and V are never repeated.
- Scores, softmax statistics and accumulators are fp32 (fp64 for fp64 inputs); out has q's dtype.

Structure. ``grapefx::attention`` is the op the fusion passes insert. Its kernel is a
CompositeImplicitAutograd forwarder to two opaque custom ops: ``grapefx::attention_fwd``
-> (out, lse) and ``grapefx::attention_bwd``. The split exists because a custom op's
``setup_context`` only sees the op's outputs: the forward must *return* the logsumexp so the
backward can rebuild the probabilities from it (flash-attention style) instead of recomputing
it. Under torch.compile the CPU graphs therefore show ``attention_fwd``/``attention_bwd``; on CUDA
the forwarder takes the kernels' traceable ops instead (below), and the graphs show their launches.

CPU reference. Small problems run as one dense block: T <= ``DENSE_MAX_T`` and no window that
would let blocks skip most of the T x T scores. Otherwise: query blocks of ``BLOCK_Q`` rows, each
visiting only the keys inside its causal/window range in blocks of up to ``BLOCK_K``, with an
online softmax; the backward recomputes P = exp(S - lse) per block. Memory is
O(BLOCK_Q * BLOCK_K) per (batch, head) beyond the O(T * D) tensors, and a sliding window costs
O(T * (W + BLOCK_Q)).

CUDA. This module imports no kernels: it exposes ``register_cuda_impl``, and ``compiler.kernels``
(imported once, by ``compiler/__init__.py``, where triton and a GPU are present) registers its Triton
kernels there. By default ``grapefx::attention`` then calls the kernels' ``triton_op``s (``traced``),
which torch.compile decomposes into kernel launches that Inductor issues itself; the opaque ops
above keep the reference (and, with ``GRAPEFX_OPAQUE_KERNELS=1``, launch the kernels from their
Python bodies instead). Calls the kernels do not cover (a dense ``bias``, other dtypes or head
dims) run the reference on CUDA too; so does everything when nothing is registered.
"""

from typing import Callable, Optional

import torch
from torch import Tensor

from compiler.ops._util import compute_dtype
from compiler.ops.grape_m import cos_sin, rotate, theta_grad, unrotate
from compiler.window import blocked as window_blocked

DENSE_MAX_T = 1024   # up to this T (and a window that is not much shorter) the reference is one dense block
BLOCK_Q = 128        # query rows per block on the blockwise path
BLOCK_K = 512        # key rows per block: larger than BLOCK_Q to cut Python steps on global layers


# ---------------------------------------------------------------------------------------------
# argument checks (shared by the real and fake kernels, so errors surface at trace time too)

def _check(q: Tensor, k: Tensor, v: Tensor, theta: Optional[Tensor], slopes: Optional[Tensor], window: int,
           bias: Optional[Tensor] = None) -> None:
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"attention: q, k, v must be (B, H, T, D); got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    B, Hq, T, D = q.shape
    if k.shape != v.shape or k.shape[0] != B or k.shape[2] != T or k.shape[3] != D:
        raise ValueError(f"attention: k and v must be (B, Hkv, T, D) = ({B}, Hkv, {T}, {D}); "
                         f"got {tuple(k.shape)}, {tuple(v.shape)}")
    if k.shape[1] == 0 or Hq % k.shape[1] != 0:
        raise ValueError(f"attention: query heads ({Hq}) must be a multiple of KV heads ({k.shape[1]})")
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(f"attention: q, k, v must share a dtype; got {q.dtype}, {k.dtype}, {v.dtype}")
    if theta is not None and (theta.dim() != 1 or 2 * theta.shape[0] != D):
        raise ValueError(f"attention: theta must be (D/2,) = ({D // 2},); got {tuple(theta.shape)}")
    if slopes is not None and (slopes.dim() != 1 or slopes.shape[0] != Hq):
        raise ValueError(f"attention: slopes must be (Hq,) = ({Hq},); got {tuple(slopes.shape)}")
    if window < 0:
        raise ValueError(f"attention: window must be >= 0 (0 = full causal); got {window}")
    if bias is not None and (not bias.is_floating_point() or bias.dim() > 3
                             or any(b not in (1, n) for b, n in zip(bias.shape[::-1], (T, T, Hq)))):
        raise ValueError(f"attention: bias must be a float tensor broadcastable to (Hq, T, T) = ({Hq}, {T}, {T}); "
                         f"got {tuple(bias.shape)} {bias.dtype}")


def _dtype(q: Tensor, theta: Optional[Tensor], slopes: Optional[Tensor], bias: Optional[Tensor] = None) -> torch.dtype:
    """The fp32 (or fp64) dtype of scores, statistics and accumulators; also lse's dtype."""
    return compute_dtype(q.dtype, *(t.dtype for t in (theta, slopes, bias) if t is not None))


def _grouped_bias(bias: Optional[Tensor], Hkv: int, G: int, T: int, cd: torch.dtype) -> Optional[Tensor]:
    """The dense bias broadcast to (Hq, T, T) and viewed per KV head: (Hkv, G, T, T) in cd."""
    if bias is None:
        return None
    return bias.to(cd).expand(Hkv * G, T, T).reshape(Hkv, G, T, T)


# ---------------------------------------------------------------------------------------------
# CPU reference (runs on any device)

def _block_sizes(T: int, window: int) -> tuple[int, int]:
    """(query rows, key rows) per block: (T, T) is the dense path."""
    if T <= DENSE_MAX_T and (window == 0 or T <= window + BLOCK_Q):
        return T, T
    return BLOCK_Q, BLOCK_K


def _query_blocks(T: int, block: int):
    """Query row ranges [qs, qe)."""
    for qs in range(0, T, block):
        yield qs, min(qs + block, T)


def _key_blocks(qs: int, qe: int, window: int, block: int):
    """Key ranges [ks, ke) covering every key some query in [qs, qe) may see, and whether every
    (query, key) pair of the block is visible (then the mask is skipped)."""
    lo = 0 if window == 0 else max(0, qs - window + 1)
    for ks in range(lo, qe, block):
        ke = min(ks + block, qe)
        all_visible = ke - 1 <= qs and (window == 0 or (qe - 1) - ks <= window - 1)
        yield ks, ke, all_visible


def _block_scores(qb: Tensor, kb: Tensor, qs: int, qe: int, ks: int, ke: int, slopes_g: Optional[Tensor],
                  window: int, all_visible: bool, bias_g: Optional[Tensor] = None) -> tuple[Tensor, Optional[Tensor]]:
    """S for queries [qs, qe) x keys [ks, ke): (scale q).k - m_h (i - j) + bias, -inf where not visible.

    qb (B, Hkv, G*bq, D) already scaled, kb (B, Hkv, bk, D), slopes_g (Hkv, G, 1, 1), bias_g
    (Hkv, G, T, T) -> S (B, Hkv, G, bq, bk) and the distance i - j (bq, bk) when it was needed.
    """
    B, Hkv = qb.shape[:2]
    s = torch.matmul(qb, kb.transpose(-1, -2))                                      # (B, Hkv, G*bq, bk)
    s = s.view(B, Hkv, -1, qe - qs, ke - ks)                                        # (B, Hkv, G, bq, bk)
    dist = None
    if slopes_g is not None or not all_visible:
        i = torch.arange(qs, qe, dtype=s.dtype, device=s.device)
        j = torch.arange(ks, ke, dtype=s.dtype, device=s.device)
        dist = i[:, None] - j[None, :]                                              # (bq, bk)
    # in place from here on: the reference is bound by passes over these (bq, bk) blocks
    if slopes_g is not None:
        s.sub_(slopes_g * dist)                                                     # after the scaling, fp32
    if bias_g is not None:
        s.add_(bias_g[:, :, qs:qe, ks:ke])                                          # dense bias, after the scaling
    if not all_visible:
        s.masked_fill_(window_blocked(dist, window), float("-inf"))
    return s, dist


def _rotated(x: Tensor, theta: Optional[Tensor], cd: torch.dtype) -> tuple[Tensor, Optional[Tensor]]:
    """(x as the attention reads it, in cd; the fp32 rotation before rounding, for dtheta).

    The rotated vector is rounded to x's dtype like ``grape_m_rotate``'s output, so the fused op
    sees the same q and k as the unfused graph.
    """
    if theta is None:
        return x.to(cd), None
    _, cos, sin = cos_sin(theta, x.shape[-2], 0, cd)                                 # (T, D/2)
    r = rotate(x.to(cd), cos, sin)                                                   # (B, H, T, D)
    return r.to(x.dtype).to(cd), r


def _forward_ref(q, k, v, theta, slopes, window, scale, bias=None):
    """Reference ``attention_fwd`` on any device: (out, lse)."""
    B, Hq, T, D = q.shape
    Hkv = k.shape[1]
    G = Hq // Hkv
    cd = _dtype(q, theta, slopes, bias)
    bq, bk = _block_sizes(T, window)
    qr = (_rotated(q, theta, cd)[0] * scale).reshape(B, Hkv, G, T, D)                # (B, Hkv, G, T, D) scaled
    kr = _rotated(k, theta, cd)[0]                                                   # (B, Hkv, T, D)
    vc = v.to(cd)                                                                    # (B, Hkv, T, D)
    slopes_g = None if slopes is None else slopes.to(cd).view(Hkv, G, 1, 1)
    bias_g = _grouped_bias(bias, Hkv, G, T, cd)                                      # (Hkv, G, T, T) or None
    out = torch.empty(B, Hkv, G, T, D, dtype=cd, device=q.device)
    lse = torch.empty(B, Hkv, G, T, dtype=cd, device=q.device)
    for qs, qe in _query_blocks(T, bq):
        rows = qe - qs
        qb = qr[:, :, :, qs:qe].reshape(B, Hkv, G * rows, D)                        # (B, Hkv, G*rows, D)
        m = torch.full((B, Hkv, G, rows), float("-inf"), dtype=cd, device=q.device)  # running row max
        l = torch.zeros(B, Hkv, G, rows, dtype=cd, device=q.device)                # running sum of exp
        acc = torch.zeros(B, Hkv, G, rows, D, dtype=cd, device=q.device)           # running P @ V
        for ks, ke, all_visible in _key_blocks(qs, qe, window, bk):
            s, _ = _block_scores(qb, kr[:, :, ks:ke], qs, qe, ks, ke, slopes_g, window, all_visible, bias_g)
            m_new = torch.maximum(m, s.amax(-1))                                    # (B, Hkv, G, rows)
            m_safe = m_new.masked_fill(m_new == float("-inf"), 0.0)                 # rows with no visible key yet
            p = s.sub_(m_safe[..., None]).exp_()                                    # (B, Hkv, G, rows, bk)
            alpha = torch.exp(m - m_safe)                                           # rescales the old stats
            l = l * alpha + p.sum(-1)
            pv = torch.matmul(p.view(B, Hkv, G * rows, ke - ks), vc[:, :, ks:ke])   # (B, Hkv, G*rows, D)
            acc = acc * alpha[..., None] + pv.view(B, Hkv, G, rows, D)
            m = m_new
        out[:, :, :, qs:qe] = acc / l[..., None]
        lse[:, :, :, qs:qe] = m + torch.log(l)                                      # every row sees key i: finite
    return out.view(B, Hq, T, D).to(q.dtype), lse.view(B, Hq, T)


def _backward_ref(grad_out, q, k, v, out, lse, theta, slopes, window, scale, bias=None):
    """(dq, dk, dv, dtheta, dslopes), and dbias (bias's shape) as a sixth entry when a bias is given."""
    B, Hq, T, D = q.shape
    Hkv = k.shape[1]
    G = Hq // Hkv
    cd = _dtype(q, theta, slopes, bias)
    bq, bk = _block_sizes(T, window)
    qr, q_rot = _rotated(q, theta, cd)
    kr, k_rot = _rotated(k, theta, cd)
    qr = (qr * scale).reshape(B, Hkv, G, T, D)                                       # (B, Hkv, G, T, D) scaled
    vc = v.to(cd)                                                                    # (B, Hkv, T, D)
    go = grad_out.to(cd).reshape(B, Hkv, G, T, D)                                    # dL/dout
    delta = (go * out.to(cd).reshape(B, Hkv, G, T, D)).sum(-1)                       # (B, Hkv, G, T) rowsum(dO * O)
    lse = lse.to(cd).reshape(B, Hkv, G, T)
    slopes_g = None if slopes is None else slopes.to(cd).view(Hkv, G, 1, 1)
    dqr = torch.empty(B, Hkv, G, T, D, dtype=cd, device=q.device)                    # dL/d(rotated q)
    dkr = torch.zeros(B, Hkv, T, D, dtype=cd, device=q.device)                       # dL/d(rotated k)
    dv = torch.zeros(B, Hkv, T, D, dtype=cd, device=q.device)
    dslopes = None if slopes is None else torch.zeros(Hkv, G, dtype=cd, device=q.device)
    bias_g = _grouped_bias(bias, Hkv, G, T, cd)                                      # (Hkv, G, T, T) or None
    dbias = None if bias is None else torch.zeros(Hkv, G, T, T, dtype=cd, device=q.device)
    for qs, qe in _query_blocks(T, bq):
        rows = qe - qs
        qb = qr[:, :, :, qs:qe].reshape(B, Hkv, G * rows, D)                        # (B, Hkv, G*rows, D)
        gb = go[:, :, :, qs:qe].reshape(B, Hkv, G * rows, D)
        lse_b, delta_b = lse[..., qs:qe, None], delta[..., qs:qe, None]             # (B, Hkv, G, rows, 1)
        dqb = torch.zeros(B, Hkv, G * rows, D, dtype=cd, device=q.device)
        for ks, ke, all_visible in _key_blocks(qs, qe, window, bk):
            kb = kr[:, :, ks:ke]                                                     # (B, Hkv, keys, D)
            s, dist = _block_scores(qb, kb, qs, qe, ks, ke, slopes_g, window, all_visible, bias_g)
            p = s.sub_(lse_b).exp_()                                                 # (B, Hkv, G, rows, keys)
            p2 = p.view(B, Hkv, G * rows, ke - ks)
            dv[:, :, ks:ke] += torch.matmul(p2.transpose(-1, -2), gb)               # (B, Hkv, keys, D)
            dp = torch.matmul(gb, vc[:, :, ks:ke].transpose(-1, -2))                # (B, Hkv, G*rows, keys)
            ds = dp.view_as(p).sub_(delta_b).mul_(p)                                 # dL/dS
            if dslopes is not None:
                dslopes -= (ds * dist).sum((0, 3, 4))                                # dS/dm_h = -(i - j)
            if dbias is not None:
                dbias[:, :, qs:qe, ks:ke] += ds.sum(0)                               # dS/dbias = 1, summed over B
            ds2 = ds.view(B, Hkv, G * rows, ke - ks)
            dqb += torch.matmul(ds2, kb)                                             # (B, Hkv, G*rows, D)
            dkr[:, :, ks:ke] += torch.matmul(ds2.transpose(-1, -2), qb)             # sums the G query heads
        dqr[:, :, :, qs:qe] = dqb.view(B, Hkv, G, rows, D)
    dqr = dqr.view(B, Hq, T, D) * scale                                              # S = (scale q) . k
    # dkr = dS^T (scale q) is already scaled
    dtheta = None
    if theta is not None:                                                            # back through the rotation
        n, cos, sin = cos_sin(theta, T, 0, cd)
        dtheta = (theta_grad(q_rot, dqr, n) + theta_grad(k_rot, dkr, n)).to(theta.dtype)
        dqr, dkr = unrotate(dqr, cos, sin), unrotate(dkr, cos, sin)
    grads = (dqr.to(q.dtype), dkr.to(k.dtype), dv.to(v.dtype), dtheta,
             None if dslopes is None else dslopes.reshape(Hq).to(slopes.dtype))
    if bias is None:
        return grads
    return grads + (dbias.reshape(Hq, T, T).sum_to_size(bias.shape).to(bias.dtype),)   # bias's broadcast shape


# ---------------------------------------------------------------------------------------------
# CUDA kernels hook

_cuda_kernels: Optional[tuple[Callable, Callable]] = None
_traced_kernels: Optional[Callable] = None


def register_cuda_impl(fwd: Optional[Callable], bwd: Optional[Callable], traced: Optional[Callable] = None) -> None:
    """Route CUDA inputs to kernels; ``(None, None)`` unregisters. ``compiler.kernels`` calls this.

    ``fwd(q, k, v, theta, slopes, window, scale) -> (out, lse)``: out (B, Hq, T, D) in q's dtype,
    lse (B, Hq, T) fp32 = natural-log logsumexp over the visible keys of the scaled, biased scores.
    ``bwd(grad_out, q, k, v, out, lse, theta, slopes, window, scale) -> (dq, dk, dv, dtheta, dslopes)``,
    each like its input (dtheta/dslopes may be None where theta/slopes is None or needs no
    gradient). All outputs contiguous. These two serve the opaque ops ``attention_fwd`` /
    ``attention_bwd`` from their Python bodies.
    ``traced(q, k, v, theta, slopes, window, scale) -> out or None``: the whole differentiable
    attention through traceable ops (``grapefx::attention`` calls it first; None = not covered).
    Semantics: this module's docstring; ``_forward_ref`` and ``_backward_ref`` take the same arguments.
    """
    global _cuda_kernels, _traced_kernels
    if (fwd is None) != (bwd is None):
        raise ValueError("register_cuda_impl: give both fwd and bwd, or neither")
    _cuda_kernels = None if fwd is None else (fwd, bwd)
    _traced_kernels = None if fwd is None else traced


def _cuda_impl() -> Optional[tuple[Callable, Callable]]:
    """The registered (fwd, bwd), or None: the reference serves CUDA too."""
    return _cuda_kernels


# ---------------------------------------------------------------------------------------------
# the ops

@torch.library.custom_op("grapefx::attention_fwd", mutates_args=())
def attention_fwd(q: Tensor, k: Tensor, v: Tensor, theta: Optional[Tensor], slopes: Optional[Tensor],
                  window: int, scale: float, bias: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
    """Forward of ``grapefx::attention``: (out (B, Hq, T, D) in q's dtype, lse (B, Hq, T) fp32)."""
    _check(q, k, v, theta, slopes, window, bias)
    kernels = _cuda_impl() if q.is_cuda and bias is None else None     # the kernels take no dense bias
    if kernels is not None:
        return kernels[0](q, k, v, theta, slopes, window, scale)
    return _forward_ref(q, k, v, theta, slopes, window, scale, bias)


@attention_fwd.register_fake
def _(q, k, v, theta, slopes, window, scale, bias=None):
    _check(q, k, v, theta, slopes, window, bias)
    B, Hq, T, _ = q.shape
    return q.new_empty(q.shape), q.new_empty(B, Hq, T, dtype=_dtype(q, theta, slopes, bias))


@torch.library.custom_op("grapefx::attention_bwd", mutates_args=())
def attention_bwd(grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
                  theta: Optional[Tensor], slopes: Optional[Tensor], window: int,
                  scale: float, bias: Optional[Tensor] = None) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Backward of ``grapefx::attention``: (dq, dk, dv, dtheta, dslopes, dbias).

    dtheta_j = sum over batch, heads, positions n of n (g2 r1 - g1 r2) for both q and k (r the
    rotated vector, g its gradient); dslopes_h = sum_ij -(i - j) dS[h, i, j]; dbias = dS summed
    to bias's shape. A missing theta, slopes or bias gives an empty (0,) tensor in its place
    (custom ops cannot return None).
    """
    kernels = _cuda_impl() if q.is_cuda and bias is None else None     # the same branch as the forward
    if kernels is not None:
        dq, dk, dv, dtheta, dslopes = kernels[1](grad_out, q, k, v, out, lse, theta, slopes, window, scale)
        dbias = None
    elif bias is None:
        dq, dk, dv, dtheta, dslopes = _backward_ref(grad_out, q, k, v, out, lse, theta, slopes, window, scale)
        dbias = None
    else:
        dq, dk, dv, dtheta, dslopes, dbias = _backward_ref(grad_out, q, k, v, out, lse, theta, slopes, window,
                                                           scale, bias)
    empty = lambda: q.new_empty(0, dtype=torch.float32)   # one each: outputs may not alias
    return (dq, dk, dv, empty() if dtheta is None else dtheta, empty() if dslopes is None else dslopes,
            empty() if dbias is None else dbias)


@attention_bwd.register_fake
def _(grad_out, q, k, v, out, lse, theta, slopes, window, scale, bias=None):
    empty = lambda: q.new_empty(0, dtype=torch.float32)
    return (q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape),
            empty() if theta is None else theta.new_empty(theta.shape),
            empty() if slopes is None else slopes.new_empty(slopes.shape),
            empty() if bias is None else bias.new_empty(bias.shape))


def _setup_context(ctx, inputs, output):
    q, k, v, theta, slopes, window, scale, bias = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, theta, slopes, out, lse, bias)
    ctx.window, ctx.scale = window, scale
    ctx.mark_non_differentiable(lse)


def _backward(ctx, grad_out, _grad_lse):
    q, k, v, theta, slopes, out, lse, bias = ctx.saved_tensors
    dq, dk, dv, dtheta, dslopes, dbias = attention_bwd(grad_out.contiguous(), q, k, v, out, lse, theta, slopes,
                                                       ctx.window, ctx.scale, bias)
    needs = ctx.needs_input_grad
    return (dq, dk, dv, dtheta if needs[3] else None, dslopes if needs[4] else None, None, None,
            None if bias is None or not needs[7] else dbias)    # needs has 7 entries when bias was left out


attention_fwd.register_autograd(_backward, setup_context=_setup_context)

# The public op, what the fusion passes insert. Its argument list, once: the op's schema, the
# passes (``compiler.passes.match.attention_args``) and the dumps read it from here.
ATTENTION_SIGNATURE = (("q", "Tensor"), ("k", "Tensor"), ("v", "Tensor"), ("theta", "Tensor?"), ("slopes", "Tensor?"),
                       ("window", "int"), ("scale", "float"), ("bias", "Tensor?"))
ATTENTION_ARGS = tuple(name for name, _ in ATTENTION_SIGNATURE)
ATTENTION_DEFAULTS = {"bias": None}          # trailing arguments that may be left out
_lib = torch.library.Library("grapefx", "FRAGMENT")
_lib.define("attention(" + ", ".join(f"{t} {n}" + ("=None" if n in ATTENTION_DEFAULTS else "")
                                     for n, t in ATTENTION_SIGNATURE) + ") -> Tensor")


def _attention_kernel(q, k, v, theta, slopes, window, scale, bias=None):
    if q.is_cuda and bias is None and _traced_kernels is not None:
        out = _traced_kernels(q, k, v, theta, slopes, window, scale)
        if out is not None:
            return out
    return torch.ops.grapefx.attention_fwd(q, k, v, theta, slopes, window, scale, bias)[0]


_lib.impl("attention", _attention_kernel, "CompositeImplicitAutograd")


def attention(q: Tensor, k: Tensor, v: Tensor, theta: Optional[Tensor] = None, slopes: Optional[Tensor] = None,
              window: int = 0, scale: Optional[float] = None, bias: Optional[Tensor] = None) -> Tensor:
    """``torch.ops.grapefx.attention`` with defaults: no rotation, no bias, full causal, scale 1/sqrt(D)."""
    if scale is None:
        scale = q.shape[-1] ** -0.5
    return torch.ops.grapefx.attention(q, k, v, theta, slopes, window, scale, bias)
