"""--format hf: the transformers model equals grapefx's eager model logit for logit, generates the
same greedy ids with a (windowed) cache, and keeps the expert biases; unsupported settings are refused."""

import dataclasses
import json

import pytest
import torch
from hf_testing import ROOT, grapefx_logits, model_with_state, write_export

from runtime.cli import main
from runtime.data import ByteTokenizer
from runtime.generate import Decoder, sample
from runtime.hf import check_supported, modeling_version
from runtime.trained import load_run
from spec import load_spec
from tests.runtime.test_generate import _train_tiny_tpa

transformers = pytest.importorskip("transformers")

SPECS = {
    "tiny": [],
    "tiny-tpa": [],
    "nope-global": ["attention.global.position.kind=nope"],
    "group-limited": ["moe.router.num_groups=4", "moe.router.group_topk=2", "moe.top_k=3",
                      "moe.router.topk_scaling_factor=2.5"],
}


def _spec(name):
    file = "tiny-tpa.yaml" if name == "tiny-tpa" else "tiny.yaml"
    return load_spec(ROOT / "examples" / file, SPECS[name])


def _load(folder):
    model, info = transformers.AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True,
                                                                    output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    return model.eval()


@pytest.mark.parametrize("name", list(SPECS))
def test_logits_generation_and_expert_biases_match_grapefx(name, tmp_path):
    spec = _spec(name)
    model = model_with_state(spec)
    write_export(tmp_path / "hf", spec, model, ByteTokenizer())
    hf = _load(tmp_path / "hf")

    # 70 tokens: past the local window (32), both sequences of a batch
    tokens = torch.randint(0, 257, (2, 70), generator=torch.Generator().manual_seed(1))
    ref = grapefx_logits(model, tokens)
    with torch.no_grad():
        got = hf(tokens).logits
    assert got.shape == ref.shape == (2, 70, 320) and got.dtype == torch.float32
    assert (got - ref).abs().max().item() <= 1e-5

    # the expert biases round-trip bit for bit, and they are the non-zero ones set above
    for i in model.moe_layers:
        bias = model.layers[i].moe.expert_bias
        assert bias.abs().min() > 0
        assert torch.equal(hf.model.layers[i].mlp.router.expert_bias, bias)

    # greedy decoding with caches on both sides: grapefx's ring-buffer decoder, transformers' generate
    prompt = tokens[0, :6].tolist()
    want = sample(Decoder(model), prompt, tokens=32, temperature=0, vocab_size=257, stop=256)
    out = hf.generate(torch.tensor([prompt]), max_new_tokens=32, do_sample=False, return_dict_in_generate=True)
    new = out.sequences[0, len(prompt):].tolist()
    assert new[:len(want)] == want and new[len(want):] in ([], [256])
    assert len(want) >= 8                      # a real comparison, not an immediate end-of-document

    # the local layers' cache holds only the window: W - 1 = 31 keys; the global layer every token
    cache = out.get("cache", None) or out.get("past_key_values")
    lengths = [layer.keys.shape[-2] for layer in cache.layers]
    assert lengths == [31, 31, 31, len(prompt) + len(new) - 1]


def test_config_carries_every_architecture_field(tmp_path):
    spec = _spec("group-limited")
    write_export(tmp_path / "hf", spec, model_with_state(spec), ByteTokenizer())
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["model_type"] == "grapefx" and config["grapefx_modeling_version"] == modeling_version() == "1"
    assert config["auto_map"]["AutoModelForCausalLM"] == "modeling_grapefx.GrapefxForCausalLM"
    assert config["layer_kinds"] == ["local", "local", "local", "global"]
    assert config["layer_types"] == ["sliding_attention"] * 3 + ["full_attention"]
    assert config["sliding_window"] == 32 and config["vocab_size"] == 320 and config["tokenizer_vocab_size"] == 257
    local, glob = config["attention"]["local"], config["attention"]["global"]
    assert local["position"] == {"kind": "grape-m", "share": "model", "log_freq_scale": 16.0, "base": 10000.0}
    assert glob["position"] == {"kind": "grape-a", "learnable": False, "slopes": [0.25, 0.0625, 0.015625, 0.00390625]}
    assert (local["heads"], local["kv_heads"], local["head_dim"], glob["window"]) == (4, 2, 32, None)
    assert config["moe"]["router"] == {"kind": "deepseek-v3", "score_function": "sigmoid", "pre_softmax": False, "expert_bias": True,
                                       "topk_scaling_factor": 2.5, "num_groups": 4, "group_topk": 2}
    assert (config["moe"]["top_k"], config["eos_token_id"], config["max_position_embeddings"]) == (3, 256, 128)
    generation = json.loads((tmp_path / "hf" / "generation_config.json").read_text())
    assert generation["suppress_tokens"] == list(range(257, 320)) and generation["eos_token_id"] == 256
    modeling = (tmp_path / "hf" / "modeling_grapefx.py").read_text()
    assert "modeling version 1" in modeling.splitlines()[0]
    assert "import compiler" not in modeling and "triton" not in modeling.lower()

    tpa = json.loads(json.dumps(_attention_of("tiny-tpa", tmp_path)))
    assert tpa["mechanism"] == "tpa" and tpa["tpa"] == {"head_factors": "heads", "r_q": 6, "r_k": 2, "r_v": 2}


def _attention_of(name, tmp_path):
    spec = _spec(name)
    write_export(tmp_path / name, spec, model_with_state(spec), ByteTokenizer())
    return json.loads((tmp_path / name / "config.json").read_text())["attention"]["local"]


def test_settings_the_modeling_file_lacks_are_named():
    spec = _spec("tiny")
    local = dataclasses.replace(spec.attention.local, mechanism="mla")
    odd = dataclasses.replace(spec, attention=dataclasses.replace(spec.attention, local=local))
    with pytest.raises(Exception, match=r"--format hf: the Hugging Face modeling file \(version 1\) does not "
                                        r"implement attention\.local\.mechanism: 'mla'; export without --format hf"):
        check_supported(odd)
    check_supported(spec)                                     # the real spec is fine

    @dataclasses.dataclass(frozen=True)
    class Yarn:                                               # a position kind this modeling version lacks
        kind: str = "yarn"

    glob = dataclasses.replace(spec.attention.global_, position=Yarn())
    odd = dataclasses.replace(spec, attention=dataclasses.replace(spec.attention, global_=glob))
    with pytest.raises(Exception, match=r"implement attention\.global\.position\.kind: 'yarn';"):
        check_supported(odd)


def test_a_setting_newer_than_the_modeling_file_is_refused_unless_default(monkeypatch):
    import runtime.hf.config as hf_config

    monkeypatch.setitem(hf_config.KNOWN, "Model", hf_config.KNOWN["Model"] - {"qk_norm"})
    check_supported(load_spec(ROOT / "examples" / "tiny.yaml"))                   # qk_norm: false, the default
    with pytest.raises(Exception, match=r"implement model\.qk_norm: True;"):
        check_supported(load_spec(ROOT / "examples" / "tiny.yaml", ["model.qk_norm=true"]))


def test_export_command_end_to_end_and_its_refusal(tiny_dict, tmp_path, capsys, monkeypatch):
    run = _train_tiny_tpa(tiny_dict, tmp_path, head_factors="kv_groups")
    capsys.readouterr()

    out = tmp_path / "hf"
    assert main(["export", str(run), "--out", str(out), "--format", "hf"]) == 0
    said = capsys.readouterr().out
    assert "exported step 2 of" in said and "Hugging Face format" in said
    assert sorted(p.name for p in out.iterdir()) == [
        "config.json", "configuration_grapefx.py", "generation_config.json", "grapefx.spec.yaml",
        "model.safetensors", "modeling_grapefx.py", "tokenizer.json", "tokenizer_config.json"]
    assert str(tmp_path) not in (out / "config.json").read_text()
    trained = load_run(run, torch.device("cpu"))
    tokens = torch.tensor([trained.tokenizer.encode("the lazy dog and the cat who sleeps all day")])
    with torch.no_grad():
        got = _load(out)(tokens).logits
    assert (got - grapefx_logits(trained.model, tokens)).abs().max().item() <= 1e-5

    # bf16: matrices in bf16, the router (weight and expert bias) and GRAPE-M frequencies kept fp32 and exact
    assert main(["export", str(run), "--out", str(tmp_path / "hf16"), "--format", "hf", "--dtype", "bf16"]) == 0
    half = _load(tmp_path / "hf16")
    layer = half.model.layers[1].mlp
    assert half.model.embed_tokens.weight.dtype == torch.bfloat16
    assert torch.equal(layer.router.weight, trained.model.layers[1].moe.router.weight)
    assert torch.equal(layer.router.expert_bias, trained.model.layers[1].moe.expert_bias)
    assert torch.equal(half.model.grape_m.log_freq, trained.model.grape_m.log_freq)
    with torch.no_grad():
        lo = half(tokens).logits
    assert ((lo - got).norm() / got.norm()).item() < 2e-2

    # a setting the modeling file does not implement: exit 2, the setting named, nothing written
    import runtime.hf.config as hf_config
    monkeypatch.setitem(hf_config.VALUES, "mechanism", ("gqa",))
    assert main(["export", str(run), "--out", str(tmp_path / "refused"), "--format", "hf"]) == 2
    err = capsys.readouterr().err
    assert "does not implement attention.local.mechanism: 'tpa'" in err
    assert not (tmp_path / "refused").exists() and not (tmp_path / ".refused.tmp").exists()
