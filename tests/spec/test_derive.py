"""Derived facts pinned with hand-computed numbers (the arithmetic is in the comments)."""

from pathlib import Path

import pytest

from spec import load_spec, spec_from_dict
from spec.derive import attention_costs, expert_traffic, flops_per_token, kv_cache, layers, param_counts
from spec.report import describe

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"

# C=16, L=4 (global_every 4: layers 1-3 local, 4 global), Hq=4, Hkv=2, D=4, W=8, T=32,
# vocab 100 padded to 128, qk_norm, untied; local GRAPE-M learnable (share: model), global GRAPE-A
# learnable; MoE E=4, K=2, S=1 shared, F=8, first layer dense with Fd=12.
SMALL = {
    "model": {"vocab_size": 100, "pad_vocab_to": 64, "d_model": 16, "n_layers": 4, "global_every": 4,
              "qk_norm": True},
    "attention": {"local": {"heads": 4, "kv_heads": 2, "head_dim": 4, "window": 8,
                            "position": {"kind": "grape-m", "learnable_freq": True}},
                  "global": {"heads": 4, "kv_heads": 2, "head_dim": 4, "position": {"kind": "grape-a",
                                                                                    "learnable": True}}},
    "ffn": {"hidden": 12},
    "moe": {"experts": 4, "top_k": 2, "shared_experts": 1, "expert_hidden": 8, "first_k_dense": 1},
    "data": {"seq_len": 32, "tokenizer": {"kind": "bpe", "path": "tokenizer.json"}},
}


def small(**changes):
    d = {k: (dict(v) if isinstance(v, dict) else v) for k, v in SMALL.items()}
    for k, v in changes.items():
        d[k] = v
    return spec_from_dict(d)


def test_layer_table():
    rows = layers(small())
    assert [(r.index, r.kind, r.window, r.position, r.rotary, r.additive_bias, r.ffn) for r in rows] == [
        (1, "local", 8, "grape-m", True, False, "dense"),
        (2, "local", 8, "grape-m", True, False, "moe"),
        (3, "local", 8, "grape-m", True, False, "moe"),
        (4, "global", None, "grape-a", False, True, "moe"),
    ]


def test_parameter_counts_by_hand():
    pc = param_counts(small())
    # embedding 128*16 = 2048; lm_head 2048
    # attention per layer: wq 16*16 + wk 16*8 + wv 16*8 + wo 16*16 = 768; x4 = 3072
    # norms: per layer 2*16 + q/k-norm 2*4 = 40, x4 = 160, + final 16 = 176
    # positions: GRAPE-M log_freq D/2 = 2 (once, share: model) + ALiBi slope_logit Hq = 4 (layer 4) = 6
    # dense FFN (layer 1): 3*16*12 = 576
    # MoE layers 2-4: router 4*16 = 64 -> 192; experts 3*16*8*4 = 1536 -> 4608; shared 3*16*8 = 384 -> 1152
    assert pc.groups == {"embedding": 2048, "lm_head": 2048, "attention": 3072, "norms": 176, "positions": 6,
                         "router": 192, "routed_experts": 4608, "shared_experts": 1152, "dense_ffn": 576}
    assert pc.total == 13878
    # inactive: 3 MoE layers * (E - K) = 2 experts * 384 = 2304
    assert pc.active == 13878 - 2304 == 11574


def test_tied_and_fixed_positions_drop_parameters():
    pc = param_counts(small(model=dict(SMALL["model"], tied_embeddings=True),
                            attention={"local": {"heads": 4, "kv_heads": 2, "head_dim": 4, "window": 8,
                                                 "position": {"kind": "grape-m", "learnable_freq": False}},
                                       "global": {"heads": 4, "kv_heads": 2, "head_dim": 4}}))
    # no lm_head (tied): -2048; log_freq is a buffer and ALiBi slopes are fixed: -6
    assert pc.total == 13878 - 2048 - 6


def test_grape_m_per_layer_frequencies():
    pc = param_counts(small(attention={"local": {"heads": 4, "kv_heads": 2, "head_dim": 4, "window": 8,
                                                 "position": {"kind": "grape-m", "share": "layer"}},
                                       "global": {"heads": 4, "kv_heads": 2, "head_dim": 4}}))
    assert pc.groups["positions"] == 3 * 2  # D/2 = 2 on each of the 3 local layers


def test_flops_per_token_by_hand():
    f = flops_per_token(small())
    # N_matmul: lm_head 2048 + attention 3072 + dense 576 + 3 MoE layers * (router 64 + K*384 + shared 384) = 3648
    assert f.matmul_params == 2048 + 3072 + 576 + 3648 == 9344
    # attention: local 3 * 12*4*4*W(8) = 3 * 1536 = 4608; global 12*4*4*(T/2 = 16) = 3072
    assert f.attention == 7680
    assert f.per_token == 6 * 9344 + 7680 == 63744


def test_kv_cache_by_hand():
    # per layer and cached token: K and V, 2 * Hkv(2) * D(4) = 16 values * 2 bytes (bf16) = 32 B
    kv = kv_cache(small(), 32)
    assert [(r.tokens, r.bytes) for r in kv.layers] == [(8, 256)] * 3 + [(32, 1024)]
    assert kv.total_bytes == 1792 and kv.bytes_per_token == 56.0
    short = kv_cache(small(), 4)  # local layers hold min(W, 4) = 4 tokens
    assert short.total_bytes == 3 * 4 * 32 + 4 * 32 == 512 and short.bytes_per_token == 128.0


def test_tpa_counts_by_hand():
    no_qk_norm = {**SMALL["model"], "qk_norm": False}       # TPA pre-rotates B, so QK-norm is refused with it
    s = small(model=no_qk_norm,
              attention={"local": {"mechanism": "tpa", "heads": 4, "kv_heads": 2, "head_dim": 4, "window": 8},
                         "global": {"heads": 4, "kv_heads": 2, "head_dim": 4}})
    # TPA head_factors heads (defaults R_Q 6, R_K = R_V = 2, n = Hq = 4):
    #   C*(R_Q*(Hq+D) + (R_K+R_V)*(n+D)) + Hq*D*C = 16*(6*8 + 4*8) + 256 = 1536 per local layer
    assert param_counts(s).groups["attention"] == 3 * 1536 + 768
    # cache: (R_K+R_V)*(n+D) = 4*8 = 32 values = 64 B per cached token on local layers
    assert kv_cache(s, 32).layers[0].bytes_per_cached_token == 64
    # contraction 6*D*(R_Q*Hq + (R_K+R_V)*n) = 6*4*(24 + 16) = 960 per local layer
    assert flops_per_token(s).tpa_contraction == 3 * 960
    g = small(model=no_qk_norm,
              attention={"local": {"mechanism": "tpa", "head_factors": "kv_groups", "heads": 4, "kv_heads": 2,
                                   "head_dim": 4, "window": 8},
                         "global": {"heads": 4, "kv_heads": 2, "head_dim": 4}})
    # kv_groups: R_Q 4, n = Hkv = 2: 16*(4*8 + 4*6) + 256 = 1152; cache 4*(2+4) = 24 values = 48 B
    assert param_counts(g).groups["attention"] == 3 * 1152 + 768
    assert kv_cache(g, 32).layers[0].bytes_per_cached_token == 48
    # describe puts TPA beside GQA with the same heads: GQA 16*(16 + 2*8) + 256 = 768 params,
    # 2*Hkv*D = 2*2*4 = 16 values = 32 B (bf16)
    local, glob = attention_costs(g)
    assert (local.kind, local.mechanism, local.params_per_layer, local.kv_bytes_per_cached_token) == \
        ("local", "tpa", 1152, 48)
    assert (local.gqa.params_per_layer, local.gqa.kv_bytes_per_cached_token) == (768, 32)
    assert (glob.mechanism, glob.params_per_layer, glob.gqa) == ("gqa", 768, None)
    assert describe(g)["attention"]["local"] == {"mechanism": "tpa", "params_per_layer": 1152,
                                                 "kv_bytes_per_cached_token": 48,
                                                 "gqa": {"params_per_layer": 768, "kv_bytes_per_cached_token": 32}}


def test_baseline_tpa_attention_beside_gqa():
    local = attention_costs(load_spec(EXAMPLES / "baseline-tpa.yaml"))[0]
    # C = 1024, Hq 16, D 64, R 6/2/2, heads: 1024*(6*80 + 4*80) + 16*64*1024 = 1,867,776; cache 4*80*2 B = 640
    # GQA Hkv 4: 1024*(1024 + 2*256) + 1024*1024 = 2,621,440; cache 2*4*64*2 B = 1024
    assert (local.mechanism, local.params_per_layer, local.kv_bytes_per_cached_token) == ("tpa", 1_867_776, 640)
    assert (local.gqa.params_per_layer, local.gqa.kv_bytes_per_cached_token) == (2_621_440, 1024)


def test_bench_small_matches_benchmarks_md():
    s = load_spec(EXAMPLES / "bench-small.yaml")
    f = flops_per_token(s)
    # per layer: attention 768*64*(12+8) + 768*768 = 1,572,864; router 16*768 = 12,288;
    # 3 active experts (top-2 + shared) * 3*768*1024 = 7,077,888 -> 8,663,040 * 12 = 103,956,480
    # + LM head 32768*768 = 25,165,824 -> N = 129,122,304; 6N = 774,733,824
    # attention: 9 local * 12*12*64*128 = 10,616,832 + 3 global * 12*12*64*1024 = 28,311,552
    assert f.matmul_params == 129_122_304 and f.attention == 38_928_384
    assert f.per_token == 813_662_208  # BENCHMARKS.md: 813 M


def test_bench_medium_is_about_two_billion():
    pc = param_counts(load_spec(EXAMPLES / "bench-medium.yaml"))
    assert 1.8e9 < pc.total < 2.2e9
    assert pc.total * 16 < 40 * 2**30  # AdamW state leaves room for activations on an 80 GB card


def test_describe_json_keys():
    d = describe(small(), context=32)
    assert list(d) == ["name", "summary", "layers", "params", "training_state_bytes", "flops_per_token", "flops",
                       "kv_cache_bytes_per_token", "kv_cache", "router", "attention", "expert_parallel",
                       "spec"]
    assert set(d["layers"][0]) == {"index", "kind", "mechanism", "window", "position", "rotary", "additive_bias",
                                   "ffn", "kv_tokens", "kv_bytes"}
    assert d["params"]["total"] == 13878 and d["params"]["active"] == 11574
    assert sum(d["params"]["groups"].values()) == 13878 and d["training_state_bytes"] == 16 * 13878
    assert d["flops_per_token"] == 63744 and d["kv_cache_bytes_per_token"] == 56.0
    assert d["router"]["score_function"] == "sigmoid" and d["router"]["expert_bias"] is True


@pytest.mark.parametrize("name", ["baseline.yaml", "tiny.yaml", "baseline-tpa.yaml"])
def test_examples_have_a_global_layer(name):
    s = load_spec(EXAMPLES / name)
    assert "global" in s.layer_kinds() and "local" in s.layer_kinds()
    assert s.data.seq_len >= 4 * s.attention.local.window


def test_expert_traffic_per_token_and_moe_layer():
    # C = 16, K = 2; bf16 rows (2 B) with E = 4: 3 in 4 assignments leave the rank, there and back
    t = expert_traffic(small(parallel={"expert": 4}))
    assert (t.expert, t.forward, t.training) == (4, 2 * 2 * 16 * 2 * 3 / 4, 192.0)            # 96 B forward
    fp32 = expert_traffic(small(parallel={"expert": 2}, precision={"compute": "fp32"}))
    assert (fp32.forward, fp32.training) == (2 * 2 * 16 * 4 / 2, 256.0)                         # 128 B forward
    assert expert_traffic(small()).forward == 0 and expert_traffic(small(moe=None)) is None
