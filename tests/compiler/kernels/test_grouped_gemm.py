"""The grouped GEMMs that read rows in place (compiler/kernels/grouped_gemm.py) against per-expert
matmuls written here, and on a case computed by hand.

Runs on CPU through Triton's interpreter (``TRITON_INTERPRET=1``, set before triton is imported) when
triton is installed, on the GPU when there is one; skipped where triton is missing (CI). fp32 on the
interpreter (its dot mishandles bf16; fp16 where a test needs 16-bit operands), bf16 on a GPU. Groups are uneven, one expert gets no row, and
the row count is no multiple of any tile.
"""

import pytest
import torch

from triton_interpreter import on_gpu_or_interpreter

ON_GPU = on_gpu_or_interpreter()

from compiler.kernels import grouped_gemm as gg  # noqa: E402

DEV = "cuda" if ON_GPU else "cpu"
DT = torch.bfloat16 if ON_GPU else torch.float32
TOL = 1e-2 if ON_GPU else 1e-5


@pytest.fixture(autouse=True, scope="module")
def _one_config():
    """The interpreter cannot time configurations: each autotuner keeps its first."""
    if ON_GPU:
        yield
        return
    tuners = (gg._rows_tuned, gg._swiglu_tuned, gg._weight_tuned)
    saved = [t.configs for t in tuners]
    for t in tuners:
        t.configs = t.configs[:1]
    yield
    for t, c in zip(tuners, saved):
        t.configs = c


def _rel(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm())


def _routing(N, E, K, idle, seed):
    g = torch.Generator().manual_seed(seed)
    scores = torch.rand(N, E, generator=g)
    scores[:, idle] = -1.0
    ids, order = torch.sort(scores.topk(K, dim=1).indices.reshape(-1), stable=True)
    offs = torch.searchsorted(ids, torch.arange(E), right=True).to(torch.int32)
    return (order // K).to(DEV), offs.to(DEV), list(zip([0] + offs.tolist()[:-1], offs.tolist()))


def test_swiglu_gemm_by_hand():
    """x[t] = t * ones(64), W_gate[e] = (e + 1) I, W_up[e] = I: row r of expert e reading token t has
    a = (e + 1) t and b = t in every column, h = silu(a) b; tokens 0, 1, 2 with top-1 experts 1, 0, 1."""
    C = F = 64
    x = torch.arange(3, dtype=torch.float32)[:, None].expand(3, C).contiguous().to(DEV, DT)
    eye = torch.eye(C)
    wg = torch.stack([eye, 2 * eye]).to(DEV, DT)
    wu = torch.stack([eye, eye]).to(DEV, DT)
    src = torch.tensor([1, 0, 2], device=DEV)                  # sorted by expert: token 1 (e 0), tokens 0, 2 (e 1)
    offs = torch.tensor([1, 3], dtype=torch.int32, device=DEV)
    gu, h = gg.rows_mm_swiglu(x, src, offs, wg, wu)
    a = torch.tensor([1.0, 0.0, 4.0])                          # (e + 1) t: 1*1, 2*0, 2*2
    b = torch.tensor([1.0, 0.0, 2.0])
    h_hand = torch.tensor([0.7310585786, 0.0, 7.8561103])      # silu(a) b: 1 * sigmoid(1); 0; 4 * 0.98201379 * 2
    assert torch.allclose(gu[:, 0].float().cpu(), a) and torch.allclose(gu[:, F].float().cpu(), b)
    assert torch.allclose(h.float().cpu(), h_hand[:, None].expand(3, F), rtol=1e-2 if ON_GPU else 1e-6)


def test_forward_gemms_match_per_expert_matmuls():
    N, C, F, E, K = 45, 128, 64, 4, 2
    src, offs, groups = _routing(N, E, K, idle=2, seed=0)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(N, C, generator=g).to(DEV, DT)
    wg, wu = (torch.randn(2, E, C, F, generator=g) / C ** 0.5).to(DEV, DT)
    wd = (torch.randn(E, F, C, generator=g) / F ** 0.5).to(DEV, DT)
    xs = x.float()[src]
    gu, h = gg.rows_mm_swiglu(x, src, offs, wg, wu)
    ref = torch.cat([torch.cat([xs[a:b] @ wg[e].float(), xs[a:b] @ wu[e].float()], 1) for e, (a, b) in enumerate(groups)])
    assert gu.shape == (N * K, 2 * F) and _rel(gu, ref) < TOL
    assert _rel(h, torch.nn.functional.silu(gu[:, :F].float()) * gu[:, F:].float()) < TOL
    u = gg.rows_mm(x, src, offs, wd.transpose(1, 2))          # a transposed weight view
    ref = torch.cat([xs[a:b] @ wd[e].float().t() for e, (a, b) in enumerate(groups)])
    assert u.shape == (N * K, F) and _rel(u, ref) < TOL


@pytest.mark.parametrize("N", [45, 200])      # 200: ~130 rows an expert, so each runs over several 64-row chunks
def test_weight_gradients_match_per_expert_matmuls_and_the_idle_expert_gets_zeros(N):
    C, F, E, K = 128, 64, 4, 2
    src, offs, groups = _routing(N, E, K, idle=2, seed=2)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(N, C, generator=g).to(DEV, DT)
    dgu = torch.randn(N * K, 2 * F, generator=g).to(DEV, DT)
    hg = torch.randn(N * K, F, generator=g).to(DEV, DT)
    xs = x.float()[src]
    dwg, dwu = torch.full((2, E, C, F), float("nan"), device=DEV, dtype=DT)
    gg.weight_mm(x, src, dgu, None, offs, dwg, dwu)
    ref = torch.stack([xs[a:b].t() @ dgu[a:b].float() for a, b in groups])
    assert _rel(dwg, ref[..., :F]) < TOL and _rel(dwu, ref[..., F:]) < TOL
    dwd = torch.full((E, F, C), float("nan"), device=DEV, dtype=DT)
    gg.weight_mm(hg, None, x, src, offs, dwd)
    ref = torch.stack([hg[a:b].float().t() @ xs[a:b] for a, b in groups])
    assert _rel(dwd, ref) < TOL
    assert not dwg[2].any() and not dwu[2].any() and not dwd[2].any()       # written, and zero


def test_fp32_gradients_hold_the_sums_rounded_to_the_operands_dtype():
    """An fp32 output (the gradient of an fp32 master) gets each fp32 sum rounded to the operands' 16-bit
    dtype, as a 16-bit gradient cast to fp32 would hold. fp16 on the interpreter (its dot mishandles bf16)."""
    dt = torch.bfloat16 if ON_GPU else torch.float16
    g = torch.Generator().manual_seed(5)
    a, b = torch.randn(40, 64, generator=g).to(DEV, dt), torch.randn(40, 64, generator=g).to(DEV, dt)
    offs = torch.tensor([15, 15, 40], dtype=torch.int32, device=DEV)             # expert 1 gets no row
    out = torch.full((3, 64, 64), float("nan"), device=DEV)
    gg.weight_mm(a, None, b, None, offs, out)
    ref = torch.stack([a[:15].float().t() @ b[:15].float(), torch.zeros(64, 64, device=DEV),
                       a[15:].float().t() @ b[15:].float()])
    assert out.dtype == torch.float32 and torch.equal(out, out.to(dt).float())
    assert _rel(out, ref) < 1e-2 and (out - ref).abs().max() > 0                   # rounded, not the fp32 sums


def test_the_lean_expert_path_takes_fp32_masters_with_the_numbers_of_a_cast_on_each_side(monkeypatch):
    """The expert op's lean forward and backward through these kernels, given the fp32 masters, equal
    bit for bit the same steps given the weights cast to the rows' dtype (the gradients cast back), and
    return the weights' gradients in fp32 (fp16 rows on the interpreter, whose dot mishandles bf16)."""
    from compiler.kernels import moe
    from compiler.ops import experts
    monkeypatch.setattr(experts, "_cuda_kernels", moe)
    monkeypatch.setattr(experts, "_grouped_kernels", lambda x: moe)
    dt = torch.bfloat16 if ON_GPU else torch.float16
    g = torch.Generator().manual_seed(6)
    N, C, F, E, K = 48, 64, 64, 4, 2
    x, gates, grad = (torch.randn(*s, generator=g).to(DEV, dt) for s in ((N, C), (N, K), (N, C)))
    idx = torch.rand(N, E, generator=g).topk(K).indices.to(DEV)
    masters = [(torch.randn(*s, generator=g) * 0.1).to(DEV) for s in ((E, C, F), (E, C, F), (E, F, C))]
    cast = [w.to(dt) for w in masters]
    out_m, gu_m, order, offs = experts._lean_forward(x, idx, gates, *masters)
    out_c, gu_c, _, _ = experts._lean_forward(x, idx, gates, *cast)
    assert torch.equal(out_m, out_c) and torch.equal(gu_m, gu_c)
    got = experts._lean_backward(grad, x, idx, gates, *masters, gu_m, order, offs)
    want = experts._lean_backward(grad, x, idx, gates, *cast, gu_c, order, offs)
    assert [t.dtype for t in got] == [dt, dt, torch.float32, torch.float32, torch.float32]
    assert all(torch.equal(a, b.to(a.dtype)) for a, b in zip(got, want))


def test_rows_whose_depth_is_no_multiple_of_64_are_refused():
    x = torch.zeros(4, 72, device=DEV, dtype=DT)
    with pytest.raises(ValueError, match="multiple of 64"):
        gg.rows_mm(x, None, torch.tensor([4], dtype=torch.int32, device=DEV), torch.zeros(1, 72, 64, device=DEV, dtype=DT))
