"""KV-cache decoding = the lowered model's full forward; sampling; `grapefx generate` end to end."""

import math

import pytest
import torch
import torch.nn.functional as F
import yaml

from compiler import lower, tagged
from runtime.cli import main
from runtime.generate import Decoder, sample, subgraph
from spec.derive import kv_cache
from spec.schema import Attention, AttentionKinds, GrapeA, GrapeM, Model, MoE, NoPE, Precision, RoPE, Spec

T, W = 19, 4   # past the local window, and past the global cache's first 16 slots (it doubles)


def _spec(local: str, *, moe=True, tied=False) -> Spec:
    """3 local + 1 global layer, C 32, Hq 4 / Hkv 2, D 8, W 4, vocab 64; local GQA-SWA or TPA.

    ``-layer``: a GRAPE-M vector per layer (share: layer); ``-rope``: local RoPE and NoPE global layers.
    """
    kind, _, variant = local.partition("+")
    tpa = {"gqa": {}, "tpa-heads": dict(mechanism="tpa", head_factors="heads"),
           "tpa-kv_groups": dict(mechanism="tpa", head_factors="kv_groups", r_k=3, r_v=1)}[kind]
    local_pos = {"": GrapeM(), "layer": GrapeM(share="layer"), "rope": RoPE()}[variant]
    global_pos = NoPE() if variant == "rope" else GrapeA()
    return Spec(
        model=Model(vocab_size=64, d_model=32, n_layers=4, global_every=4, tied_embeddings=tied),
        attention=AttentionKinds(local=Attention(heads=4, kv_heads=2, head_dim=8, window=W, position=local_pos, **tpa),
                                 global_=Attention(heads=4, kv_heads=2, head_dim=8, position=global_pos)),
        moe=MoE(experts=4, top_k=2, shared_experts=1, expert_hidden=16) if moe else None,
        precision=Precision(compute="fp32"),
    )


def _full_forward(model, tokens):
    """The model's meaning: embed, every layer graph, then the head's norm and LM-head weight.

    Returns the logits (B, T, V) and, per MoE layer, the experts its router picked (B, T, K), read
    from the same layer graph cut at its ``moe.expert_index`` node.
    """
    x = model.embed(tokens)
    routes = {}
    for i, layer in enumerate(model.layers):
        args = (x, model.grape_m.log_freq) if model.takes_log_freq[i] else (x,)
        if i in model.moe_layers:
            index = tagged(layer)["moe.expert_index"]
            (idx,) = subgraph(layer, {}, [index])(*args)
            routes[i] = idx.view(*tokens.shape, -1)
            x = layer(*args)[0]
        else:
            x = layer(*args)
    h = F.rms_norm(x, (x.shape[-1],), model.head.norm.weight, model.spec.model.norm_eps)
    w = model.embed.weight if model.spec.model.tied_embeddings else model.head.lm_head.weight
    return h @ w.T, routes


@pytest.mark.parametrize("local", ["gqa", "tpa-heads", "tpa-kv_groups", "tpa-heads+layer", "gqa+rope"])
def test_incremental_decoding_equals_the_full_forward_fp64(local):
    model = lower(_spec(local)).double()
    tokens = torch.randint(0, 64, (2, T), generator=torch.Generator().manual_seed(0))
    ref, ref_routes = _full_forward(model, tokens)
    decoder = Decoder(model)
    logits, routes = [], {i: [] for i in ref_routes}
    for t in range(T):
        logits.append(decoder.step(tokens[:, t]))
        for i in routes:
            routes[i].append(decoder.routes[i])
    # routing first: a flipped near-tie would change the logits for a reason that is not the cache
    for i, picked in routes.items():
        assert torch.equal(torch.stack(picked, 1), ref_routes[i]), f"layer {i + 1} routed differently"
    inc = torch.stack(logits, 1)                                                    # (B, T, V)
    assert inc.dtype == torch.float64
    assert torch.allclose(inc, ref, rtol=0, atol=1e-12 * ref.abs().max().item())


def test_tied_embeddings_and_dense_ffn_decode_too():
    model = lower(_spec("tpa-heads", moe=False, tied=True)).double()
    tokens = torch.randint(0, 64, (1, 7), generator=torch.Generator().manual_seed(1))
    ref, _ = _full_forward(model, tokens)
    decoder = Decoder(model)
    inc = torch.stack([decoder.step(tokens[:, t]) for t in range(7)], 1)
    assert torch.allclose(inc, ref, rtol=0, atol=1e-12)


@pytest.mark.parametrize("local", ["gqa", "tpa-heads"])
def test_local_caches_are_rings_of_w_tokens_and_bytes_match_describe(local):
    spec = _spec(local)
    decoder = Decoder(lower(spec))
    for t in range(T):
        decoder.step(torch.tensor([t]))
    ring, full = decoder.layers[0].cache, decoder.layers[3].cache
    assert all(t.shape[2] == W for t in ring.tensors)
    assert sorted(ring.pos.tolist()) == [15, 16, 17, 18]                            # the last W positions
    assert full.read()[1].tolist() == list(range(T))
    # fp32 caches: spec.derive's per-layer bytes per cached token x tokens held, summed over layers
    assert decoder.cache_bytes() == kv_cache(spec, T).total_bytes
    # GQA 2*Hkv*D = 32 values; TPA heads (R_K + R_V)(Hq + D) = 4*12 = 48 values; x 4 B;
    # 3 local layers hold W = 4 tokens, the global layer (GQA) all 19
    per_local = {"gqa": 32, "tpa-heads": 48}[local] * 4
    assert decoder.cache_bytes() == 3 * W * per_local + T * 32 * 4


def test_sampling_is_greedy_at_zero_temperature_and_never_draws_padding():
    model = lower(_spec("gqa"))
    decoder = Decoder(model)
    greedy = sample(decoder, [1, 2, 3], tokens=5, temperature=0.0, vocab_size=60)
    decoder.reset()
    tokens, expected = torch.tensor([[1, 2, 3]]), []
    for _ in range(5):                                                              # argmax of the full forward
        logits, _ = _full_forward(model, tokens)
        expected.append(int(logits[0, -1, :60].argmax()))
        tokens = torch.cat([tokens, torch.tensor([[expected[-1]]])], 1)
    assert greedy == expected
    for seed in range(3):
        decoder.reset()
        drawn = sample(decoder, [5], tokens=8, temperature=2.0, top_k=50, seed=seed, vocab_size=50)
        assert len(drawn) == 8 and max(drawn) < 50
    decoder.reset()
    a = sample(decoder, [5], tokens=6, seed=7)
    decoder.reset()
    assert sample(decoder, [5], tokens=6, seed=7) == a


def _train_tiny_tpa(tiny_dict, tmp_path, head_factors="heads"):
    """A 2-step run of the tiny spec with TPA on the local layers; its directory."""
    d = tiny_dict(steps=2, checkpoint_every=2, eval_every=2)
    d["attention"]["local"].update(mechanism="tpa", head_factors=head_factors)
    path = tmp_path / "tiny-tpa.yaml"
    path.write_text(yaml.safe_dump(d, sort_keys=False))
    run = tmp_path / "run"
    assert main(["train", str(path), "--out", str(run), "--no-compile"]) == 0
    return run


def test_generate_command_prints_text_from_a_tiny_tpa_run(tiny_dict, tmp_path, capsys):
    run = _train_tiny_tpa(tiny_dict, tmp_path)
    capsys.readouterr()
    assert main(["generate", str(run), "--prompt", "the quick", "--tokens", "12", "--seed", "3", "--stats"]) == 0
    out, err = capsys.readouterr()
    assert out.startswith("the quick") and len(out) > len("the quick\n")
    assert f"source: {run / 'checkpoints' / 'step-000002'} (step 2)" in err
    assert "KV cache after " in err and "B/token; spec.derive at context" in err
    assert main(["generate", str(run), "--prompt", "the quick", "--tokens", "12", "--seed", "3"]) == 0
    assert capsys.readouterr().out == out                                           # same seed, same text


def test_generate_user_errors(tmp_path, capsys):
    assert main(["generate", str(tmp_path), "--prompt", "x"]) == 2
    assert "neither a run folder" in capsys.readouterr().err
    (tmp_path / "spec.resolved.yaml").write_text(yaml.safe_dump({"name": "empty"}))
    assert main(["generate", str(tmp_path), "--prompt", "x"]) == 2
    assert "no complete checkpoint" in capsys.readouterr().err
    assert main(["generate", str(tmp_path), "--prompt", "x", "--top-k", "0"]) == 2
    assert "--top-k: 0 keeps no token" in capsys.readouterr().err


def test_decoder_follows_the_model_parameters_it_shares():
    """The slices share the model's tensors: a weight changed in place changes the decoder's output."""
    model = lower(_spec("tpa-heads", moe=False)).double()
    decoder = Decoder(model)
    before = decoder.step(torch.tensor([3]))
    with torch.no_grad():
        model.layers[0].attn.wb_k.mul_(2.0)
        model.head.lm_head.weight.mul_(-1.0)
    decoder.reset()
    after = decoder.step(torch.tensor([3]))
    ref, _ = _full_forward(model, torch.tensor([[3]]))
    assert not torch.allclose(before, after) and torch.allclose(after, ref[:, 0], atol=1e-12)
    assert math.isfinite(after.abs().max().item())



def test_decoder_reads_the_scale_and_its_cuts_from_the_graph_not_from_names():
    """A lowering with another scale (here 0.7 instead of 1/sqrt(8) = 0.354) and other node names
    still decodes exactly: the decoder finds the nodes by their roles and reads the scale there."""
    model = lower(_spec("gqa", moe=False)).double()
    for layer in model.layers:
        tagged(layer)["attention.scores"].args = (tagged(layer)["attention.scores"].args[0], 0.7)
        for n in layer.graph.nodes:
            if n.op != "placeholder":
                n.name = f"renamed_{n.name}"
        layer.recompile()
    decoder = Decoder(model)
    assert {layer.scale for layer in decoder.layers} == {0.7}
    tokens = torch.randint(0, 64, (1, 6), generator=torch.Generator().manual_seed(2))
    ref, _ = _full_forward(model, tokens)
    inc = torch.stack([decoder.step(tokens[:, t]) for t in range(6)], 1)
    assert torch.allclose(inc, ref, rtol=0, atol=1e-12 * ref.abs().max().item())
