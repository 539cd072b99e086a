"""`grapefx export`: safetensors + spec + config + tokenizer, loaded back bit for bit."""

import json

import torch
import yaml
from safetensors.torch import load_file

from runtime.cli import main
from runtime.generate import Decoder
from runtime.trained import load_export, load_run

CPU = torch.device("cpu")


def _train_bpe_run(tiny_dict, tmp_path):
    """A 2-step tiny run with a BPE tokenizer (so the export carries tokenizer.json), TPA local layers."""
    d = tiny_dict(steps=2, checkpoint_every=2, eval_every=2)
    d["model"]["vocab_size"] = 300
    d["data"]["tokenizer"] = {"kind": "bpe", "vocab_size": 300}
    d["attention"]["local"].update(mechanism="tpa", head_factors="kv_groups")
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(d, sort_keys=False))
    run = tmp_path / "run"
    assert main(["train", str(path), "--out", str(run), "--no-compile"]) == 0
    return run


def _logits(trained, tokens):
    decoder = Decoder(trained.model)
    return torch.stack([decoder.step(tokens[:, t]) for t in range(tokens.shape[1])], 1)


def test_export_round_trips_exactly_and_generates_the_same_text(tiny_dict, tmp_path, capsys):
    run = _train_bpe_run(tiny_dict, tmp_path)
    out = tmp_path / "export"
    assert main(["export", str(run), "--out", str(out)]) == 0
    assert "exported step 2 of" in capsys.readouterr().out
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors", "spec.yaml", "tokenizer.json"]

    config = json.loads((out / "config.json").read_text())
    assert config["format"] == "grapefx-export" and config["format_version"] == 1
    assert config["source"] == {"run": "run", "step": 2} and config["dtype"] == "fp32"
    assert config["layer_kinds"] == ["local", "global"] and config["attention"]["local"]["mechanism"] == "tpa"
    assert config["tokenizer"]["kind"] == "bpe" and config["tokenizer"]["file"] == "tokenizer.json"
    assert str(tmp_path) not in (out / "config.json").read_text()                  # no machine paths

    original, loaded = load_run(run, CPU), load_export(out, CPU)
    a, b = original.model.state_dict(), loaded.model.state_dict()
    assert a.keys() == b.keys() and "layers.0.attn.wa_k" in a and "layers.1.moe.expert_bias" in a
    for key in a:
        assert torch.equal(a[key], b[key]), key
    tokens = torch.tensor([original.tokenizer.encode("the lazy dog and the cat")])
    assert torch.equal(_logits(original, tokens), _logits(loaded, tokens))
    assert loaded.tokenizer.encode("the lazy dog") == original.tokenizer.encode("the lazy dog")

    # generate reads an export folder like a run folder
    argv = ["--prompt", "the big", "--tokens", "10", "--seed", "1"]
    assert main(["generate", str(run), *argv]) == 0
    from_run = capsys.readouterr().out
    assert main(["generate", str(out), *argv]) == 0
    assert capsys.readouterr().out == from_run

    # bf16: matrices in bf16, vectors (norms, GRAPE-M log-frequencies, expert bias) in fp32
    half = tmp_path / "export-bf16"
    assert main(["export", str(run), "--out", str(half), "--dtype", "bf16"]) == 0
    stored = load_file(half / "model.safetensors")
    assert stored["layers.0.attn.wb_q"].dtype == torch.bfloat16 and stored["embed.weight"].dtype == torch.bfloat16
    assert stored["layers.1.moe.expert_bias"].dtype == torch.float32
    assert stored["grape_m.log_freq"].dtype == torch.float32 and stored["head.norm.weight"].dtype == torch.float32
    lo = _logits(load_export(half, CPU), tokens)
    ref = _logits(original, tokens)
    assert ((lo - ref).norm() / ref.norm()).item() < 2e-2

    # an export folder is not a run, and --out must be new or empty
    assert main(["export", str(out), "--out", str(tmp_path / "again")]) == 2
    assert "is an export folder already" in capsys.readouterr().err
    assert main(["export", str(run), "--out", str(out)]) == 2
    assert "exists and is not an empty folder" in capsys.readouterr().err
