"""`grapefx bench` on CPU, and the reference way's model: it computes exactly the lowered model
(fp32, dense attention in place of FlexAttention, which has no CPU backward), from the same weights."""

import json
from pathlib import Path

import pytest
import torch

from compiler.lower import lower
from runtime.bench import RUN_ORDER, format_table, kernel_group
from runtime.bench.ways import MAX_WINDOWS, steady, timed_windows
from runtime.bench.reference_model import ReferenceModel
from runtime.cli import main
from spec import load_spec

TINY = Path(__file__).resolve().parents[2] / "examples" / "tiny.yaml"
SMALL = ["model.d_model=32", "model.n_layers=4", "attention.local.heads=4", "attention.local.kv_heads=2",
         "attention.local.head_dim=8", "attention.local.window=4", "attention.global.heads=4",
         "attention.global.kv_heads=2", "attention.global.head_dim=8", "moe.experts=4", "moe.expert_hidden=16",
         "data.seq_len=12", "train.micro_batch=2"]
VARIANTS = {
    "tiny-shape": [],
    "learnable-alibi, per-layer grape-m, qk-norm, tied, a dense layer": [
        "attention.global.position.learnable=true", "attention.local.position.share=layer", "model.qk_norm=true",
        "model.tied_embeddings=true", "moe.first_k_dense=1", "ffn.hidden=24", "moe.router.topk_scaling_factor=2.5"],
}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_reference_model_computes_the_lowered_model(variant):
    spec = load_spec(TINY, SMALL + VARIANTS[variant])
    ours = lower(spec)
    ref = ReferenceModel.from_state_dict(spec, ours.state_dict(), attention="dense", dtype=torch.float32)
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, spec.model.vocab_size, (2, 12), generator=g)
    targets = torch.randint(0, spec.model.vocab_size, (2, 12), generator=g)
    targets[1, :4] = -100
    a, b = ours(tokens, targets).loss, ref(tokens, targets)
    assert abs(a.item() - b.item()) < 1e-5 * abs(a.item())
    names = [n for n, _ in ours.named_parameters()]
    ga = torch.autograd.grad(a, list(ours.parameters()))
    gb = dict(zip([n for n, _ in ref.named_parameters()], torch.autograd.grad(b, list(ref.parameters()))))
    for name, grad in zip(names, ga):
        err = ((grad - gb[name]).norm() / grad.norm().clamp_min(1e-30)).item()
        assert err < 1e-4, name


def test_bench_cli_eager_on_cpu(tmp_path, capsys):
    out = tmp_path / "bench.json"
    code = main(["bench", str(TINY), "--out", str(out), "--ways", "eager", "--steps", "2", "--warmup", "1",
                 *[a for o in SMALL for a in ("--set", o)]])
    assert code == 0
    doc = json.loads(out.read_text())
    rec = doc["ways"]["eager"]
    assert rec["status"] == "ok" and len(rec["step_ms_all"]) == 2 * rec["timed_windows"]
    assert rec["step_ms"] == pytest.approx(sum(rec["step_ms_all"][-2:]) / 2)      # the last window's median
    assert rec["tokens_per_s"] == pytest.approx(2 * 12 / (rec["step_ms"] / 1e3))
    assert rec["loss_step1"] == pytest.approx(float(torch.log(torch.tensor(320.0))), rel=0.05)  # ~uniform at init
    assert rec["mfu_measured"] is None and rec["compile_cold_s"] is None            # CPU: no peak, eager
    assert doc["settings"]["order"] == ["eager"] and doc["flops_per_token"] > 0
    printed = capsys.readouterr().out
    assert "eager" in printed and "tok/s" in printed


# step times (ms) of one GPU run: the first six timed steps still ~15 ms slow, the last two settled
DRIFTING = [142.2, 138.0, 136.1, 135.7, 136.4, 135.8, 120.9, 120.5]
SETTLED = [120.6, 121.3, 121.9, 120.6, 121.8, 122.1, 120.5, 120.3]


def test_steady_compares_the_medians_of_the_halves():
    assert steady(SETTLED)                        # 121.15 and 121.15
    assert not steady(DRIFTING)                   # 137.05 against 128.35: 6.8% apart
    assert steady([100.0, 102.9]) and not steady([100.0, 103.1])    # 3% of the smaller
    assert steady([5.0])                          # one step: nothing to compare


def test_timed_windows_run_until_a_window_is_steady_or_the_cap():
    given = iter([DRIFTING, SETTLED, DRIFTING])
    windows = timed_windows(lambda: next(given))
    assert windows == [DRIFTING, SETTLED]         # stopped at the steady one
    assert len(timed_windows(lambda: DRIFTING)) == MAX_WINDOWS
    assert timed_windows(lambda: SETTLED) == [SETTLED]


def test_the_table_says_when_a_way_never_settled():
    doc = {"spec": "s", "shape": {"tokens_per_step": 8}, "flops_per_token": 1e6,
           "settings": {"order": ["grapefx"], "steps": 8},
           "peak": {"measured_bf16_matmul_tflops": None, "datasheet_tflops": None},
           "ways": {"grapefx": {"status": "ok", "step_ms": 128.35, "steady": False, "timed_windows": 3}}}
    assert ("grapefx: step times still drifting after 3 windows of 8 steps (halves differ by more than 3%); "
            "its figures are the last window's median: run more --steps") in format_table(doc)
    doc["ways"]["grapefx"]["steady"] = True
    assert "drifting" not in format_table(doc)


def test_bench_cli_rejects_unknown_ways(tmp_path, capsys):
    assert main(["bench", str(TINY), "--out", str(tmp_path / "b.json"), "--ways", "eager,fast"]) == 2
    assert "unknown way(s) fast" in capsys.readouterr().err


def test_kernel_groups_and_table():
    assert kernel_group("_bwd_dkdv") == "attention"
    assert kernel_group("_rows_kernel") == kernel_group("_weight_kernel") == "grouped GEMM"   # ours (grouped_gemm.py)
    assert kernel_group("triton_tem_fused_flex_attention_0") == "attention"
    assert kernel_group("void cutlass::device_kernel<cutlass::gemm::kernel::GemmUniversal<cutlass::gemm::GroupProblemShape<") \
        == "grouped GEMM"
    assert kernel_group("nvjet_hsh_256x128_64x4_2x1_v_bz_coopA_NNT") == "dense GEMM"
    assert kernel_group("void at::native::(anonymous namespace)::multi_tensor_apply_kernel<FusedAdamMathFunctor>") \
        == "optimizer"
    assert kernel_group("triton_poi_fused__to_copy_3") == "weight/dtype copies"
    assert kernel_group("triton_red_fused__to_copy_mul_rsqrt_sum_1") == "Inductor elementwise/reduction"
    assert kernel_group("_swiglu_bwd_kernel") == "grapefx Triton (SwiGLU / expert combine / loss)"
    assert kernel_group("void at::native::index_elementwise_kernel<128, 4>") == "dispatch: sort / gather / scatter"
    doc = {"spec": "s", "shape": {"tokens_per_step": 8}, "flops_per_token": 1e6, "settings": {"order": list(RUN_ORDER)},
           "peak": {"measured_bf16_matmul_tflops": 700.0, "datasheet_tflops": 989.0}, "ratios": {"grapefx_vs_reference_tokens_per_s": 1.5},
           "ways": {"grapefx": {"status": "ok", "tokens_per_s": 1000.0, "step_ms": 8.0, "mfu_measured": 0.4,
                                "loss_step1": 5.0}, "eager": {"status": "error", "error": "boom"}}}
    table = format_table(doc)
    assert "grapefx" in table and "40.0%" in table and "eager failed: boom" in table and "1.50" in table
