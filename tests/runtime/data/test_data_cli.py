"""`grapefx data prepare SPEC`: what it prints."""

import argparse

import spec as spec_pkg
from runtime.commands import data_cmds

from data_helpers import data_spec


def test_data_prepare_prints_where_and_how_much(tmp_path, plays, monkeypatch, capsys):
    loaded = []

    def fake_load_spec(path, overrides=()):
        loaded.append((path, list(overrides)))
        return data_spec(tmp_path, plays)

    monkeypatch.setattr(spec_pkg, "load_spec", fake_load_spec, raising=False)
    parser = argparse.ArgumentParser(prog="grapefx")
    data_cmds.register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["data", "prepare", "tiny.yaml", "--set", "data.seq_len=64", "--set", "name=x"])
    assert args.func(args) == 0
    assert loaded == [("tiny.yaml", ["data.seq_len=64", "name=x"])]
    out = capsys.readouterr().out.splitlines()
    (folder,) = (tmp_path / "cache" / "data").iterdir()
    assert out[0] == f"data:      {folder}"
    assert out[1] == "documents: 8 (6 train, 2 valid)"
    counts = out[2].removeprefix("tokens:    ").removesuffix(" valid").split(" train, ")
    train, valid = (int(n.replace(",", "")) for n in counts)
    assert train + valid == sum(len(p.read_bytes()) + 1 for p in plays.rglob("*.txt"))  # bytes + one EOD each
    assert out[3] == f"split:     {plays}: validation = 2 of 8 documents, held out whole (split: documents)"
    assert out[4] == "tokenizer: byte, vocab 257 (end-of-document id 256)"
