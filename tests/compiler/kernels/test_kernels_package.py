"""compiler.kernels without a GPU (CI): it imports with or without triton, says it is not
available, hooks into the ops (attention, experts, linear cross-entropy, router) only when it is, and its
CUDA entry points hand every call they cannot take to the op's reference."""

import importlib
import json

import pytest
import torch

import compiler.kernels as kernels
from compiler.kernels import attention as kattn
from compiler.kernels import register as kregister
from spec.errors import GrapefxError

ops_attention = importlib.import_module("compiler.ops.attention")   # the package attribute is the op wrapper
ops_experts = importlib.import_module("compiler.ops.experts")
ops_lce = importlib.import_module("compiler.ops.linear_cross_entropy")
ops_router = importlib.import_module("compiler.ops.router")


@pytest.fixture
def unregistered(monkeypatch):
    """Every op hook emptied for the test (and restored after it)."""
    for module, names in ((ops_attention, ("_cuda_kernels", "_traced_kernels")),
                          (ops_experts, ("_cuda_kernels", "_traced_lean")), (ops_lce, ("_cuda_rows",)),
                          (ops_router, ("_cuda_topk", "_traced_topk"))):
        for name in names:
            monkeypatch.setattr(module, name, None)


def test_imports_without_gpu_and_reports_availability():
    assert kernels.available() == (kernels.triton_installed() and torch.cuda.is_available())


def test_importing_the_compiler_registers_nothing_without_a_gpu():
    """CI has no GPU: the ops keep their references (the hooks stay empty after ``import compiler``)."""
    if kernels.available():
        pytest.skip("a GPU and triton are present: the kernels are registered")
    assert ops_attention._cuda_impl() is None and ops_attention._traced_kernels is None
    assert ops_experts._cuda_kernels is None and ops_experts._traced_lean is None
    assert ops_lce._cuda_rows is None and ops_router._cuda_topk is None and ops_router._traced_topk is None


def test_registers_with_the_ops_only_when_available(monkeypatch, unregistered):
    monkeypatch.setattr(kernels, "available", lambda: False)
    kregister.register()
    assert ops_attention._cuda_kernels is None and ops_experts._cuda_kernels is None and ops_lce._cuda_rows is None
    assert ops_router._cuda_topk is None


@pytest.mark.skipif(not kernels.triton_installed(), reason="the moe, cross-entropy and router kernels import triton")
def test_opaque_registers_the_kernels_without_the_traced_ops(monkeypatch, unregistered):
    from compiler.kernels import cross_entropy, moe, router
    monkeypatch.setattr(kernels, "available", lambda: True)
    monkeypatch.setenv("GRAPEFX_OPAQUE_KERNELS", "1")
    kregister.register()
    assert ops_attention._cuda_kernels == (kattn.cuda_forward, kattn.cuda_backward)
    assert ops_attention._traced_kernels is None                 # opaque: the op bodies launch the kernels
    assert ops_experts._cuda_kernels is moe and ops_experts._traced_lean is None
    assert ops_lce._cuda_rows is cross_entropy.ce_rows
    assert ops_router._cuda_topk is router.router_topk and ops_router._cuda_max_experts == 256
    assert ops_router._traced_topk is None


@pytest.mark.skipif(not kernels.triton_installed(), reason="defining the triton_ops needs triton")
def test_registers_the_traced_ops_by_default(monkeypatch, unregistered):
    monkeypatch.setattr(kernels, "available", lambda: True)
    monkeypatch.delenv("GRAPEFX_OPAQUE_KERNELS", raising=False)
    kregister.register()
    from compiler.kernels.attention_ops import traced_attention
    from compiler.kernels.moe_ops import expert_ffn_lean_fwd
    from compiler.kernels.router_ops import router_select_triton
    assert ops_attention._traced_kernels is traced_attention
    assert ops_experts._traced_lean is expert_ffn_lean_fwd
    assert ops_router._traced_topk is router_select_triton


def test_unsupported_calls_go_to_the_reference():
    """fp64 is never a kernel dtype: cuda_forward / cuda_backward must return the reference's values."""
    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, 4, 9, 8, generator=g, dtype=torch.float64)
    k, v = (torch.randn(1, 2, 9, 8, generator=g, dtype=torch.float64) for _ in range(2))
    theta, slopes = torch.rand(4, generator=g, dtype=torch.float64), torch.rand(4, generator=g, dtype=torch.float64)
    assert not kattn.supports(q, k, v, theta, slopes)
    out, lse = kattn.cuda_forward(q, k, v, theta, slopes, 4, 0.3)
    ref_out, ref_lse = ops_attention._forward_ref(q, k, v, theta, slopes, 4, 0.3)
    torch.testing.assert_close(out, ref_out, rtol=0, atol=0)
    torch.testing.assert_close(lse, ref_lse, rtol=0, atol=0)
    go = torch.randn(q.shape, generator=g, dtype=torch.float64)
    got = kattn.cuda_backward(go, q, k, v, out, lse, theta, slopes, 4, 0.3)
    want = ops_attention._backward_ref(go, q, k, v, out, lse, theta, slopes, 4, 0.3)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_default_configs_are_valid_and_cover_every_case():
    for d in (32, 64, 128):
        for window, T in ((128, 4096), (0, 4096), (4096, 4096)):
            kattn.default_config(d, window, T).check()
            for table in (kattn.HOPPER, kattn.OTHER):
                table[(d <= 64, 0 < window < T)].check()
    assert kattn.default_config(64, 4096, 4096) == kattn.default_config(64, 0, 4096)   # W >= T is global


def test_tiles_follow_the_device_family():
    # H100 and H200 (9.0) share Hopper's table; an Ampere or Blackwell card gets at most 2 stages
    assert kattn.tile_table((9, 0)) is kattn.HOPPER
    local_d64 = kattn.HOPPER[(True, True)]
    assert (local_d64.fwd.block_m, local_d64.fwd.block_n, local_d64.fwd.num_stages) == (128, 32, 3)
    for cap in ((8, 0), (8, 6), (10, 0), (12, 0)):
        other = kattn.tile_table(cap)[(True, True)]
        assert other.fwd == kattn.Tiles(128, 32, 4, 2, True) and other.dkdv == kattn.Tiles(32, 64, 4, 2, True)
    cpu = torch.device("cpu")                                      # Triton's interpreter: Hopper's shapes
    assert kattn.default_config(64, 128, 4096, device=cpu) == local_d64
    assert kattn.default_config(64, 128, 4096, torch.float32, cpu) == kattn.FP32_CONFIG


@pytest.mark.parametrize("window, pairs", [(0, 10 * 11 / 2), (3, 3 * 4 / 2 + 7 * 3), (10, 55), (40, 55)])
def test_flops_count_visible_pairs(window, pairs):
    """T = 10: full causal sees 1 + 2 + ... + 10 pairs; a window of 3 sees 1, 2, 3, 3, ..., 3."""
    assert kattn.flops(1, 1, 10, 16, window) == 4 * 16 * pairs


def test_tuned_tiles_file_replaces_the_entries_it_names(tmp_path, monkeypatch):
    cpu = torch.device("cpu")                                      # counts as Hopper (9.0)
    tuned = kattn.AttnConfig(fwd=kattn.Tiles(64, 64, 4, 3, True, True), dkdv=kattn.Tiles(32, 128, 4, 3, True),
                             dq=kattn.Tiles(128, 32, 4, 3, True), atomic_dq=True)
    path = tmp_path / "tiles.json"
    path.write_text(json.dumps({"capability": "9.0", "configs": {"d64_local": kattn.tile_literal(tuned)}}))
    monkeypatch.setenv(kattn.TUNED_ENV, str(path))
    assert kattn.default_config(64, 128, 4096, device=cpu) == tuned
    assert kattn.default_config(64, 0, 4096, device=cpu) == kattn.HOPPER[(True, False)]      # not in the file
    other = tmp_path / "ampere.json"
    other.write_text(json.dumps({"capability": "8.0", "configs": {"d64_local": kattn.tile_literal(tuned)}}))
    monkeypatch.setenv(kattn.TUNED_ENV, str(other))
    assert kattn.default_config(64, 128, 4096, device=cpu) == kattn.HOPPER[(True, True)]      # another card's
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"capability": "9.0", "configs": {"d64_local": {"fwd": [48, 32, 4, 3]}}}))
    monkeypatch.setenv(kattn.TUNED_ENV, str(bad))
    with pytest.raises(GrapefxError, match=r"GRAPEFX_ATTENTION_TILES=.*bad.json: not a tuned-tiles file .*--tiles-out"):
        kattn.default_config(64, 128, 4096, device=cpu)
