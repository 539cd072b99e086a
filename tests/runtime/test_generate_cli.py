"""grapefx generate: --prompt is optional; a model trained on pretokenized data refuses text unless given a tokenizer."""

import json

import numpy as np
import torch

from runtime.cli import main
from runtime.data import write_indexed_dataset
from spec import spec_from_dict
from trainer_testing import train


def test_pretokenized_run_generates_ids_or_text_with_a_tokenizer_file(tiny_dict, corpus, tmp_path, capsys):
    from tokenizers import Tokenizer, models, pre_tokenizers

    docs = [json.loads(line)["text"].rstrip(".").split() for line in (corpus / "corpus.jsonl").read_text().splitlines()]
    words = sorted({w for d in docs for w in d})
    vocab = {"</s>": 0, **{w: i + 1 for i, w in enumerate(words)}}
    write_indexed_dataset(tmp_path / "ids", [np.array([vocab[w] for w in d] + [0]) for d in docs], np.uint16)
    hf = Tokenizer(models.WordLevel(vocab, unk_token="</s>"))
    hf.pre_tokenizer = pre_tokenizers.Whitespace()
    hf.save(str(tmp_path / "tokenizer.json"))
    d = tiny_dict(steps=2, checkpoint_every=2, eval_every=2)
    d["model"]["vocab_size"] = 64
    d["data"].update(sources=[{"path": str(tmp_path / "ids")}], tokenizer={"kind": "pretokenized", "eod_id": 0})
    run = tmp_path / "run"
    train(spec_from_dict(d), run, device=torch.device("cpu"))
    capsys.readouterr()

    assert main(["generate", str(run), "--prompt", "the quick"]) == 2
    assert ("--prompt: " + str(run) + " was trained on pre-tokenised data (data.tokenizer.kind: pretokenized), so it "
            "has no tokenizer to read text; pass --tokenizer FILE") in capsys.readouterr().err
    assert main(["generate", str(run), "--tokens", "6", "--temperature", "0"]) == 0
    ids = [int(i) for i in capsys.readouterr().out.split()]
    assert 1 <= len(ids) <= 6 and all(0 < i < 64 for i in ids)          # never the padding, stops at </s>
    assert main(["generate", str(run), "--tokenizer", str(tmp_path / "tokenizer.json"), "--prompt", "the quick",
                 "--tokens", "6", "--temperature", "0"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("the quick") and set(out.removeprefix("the quick").split()) <= set(words)
    assert main(["generate", str(run), "--tokenizer", str(tmp_path / "none.json")]) == 2
    assert "--tokenizer: " in capsys.readouterr().err


def test_generate_without_a_prompt_starts_a_document(tiny_spec, tmp_path, capsys):
    run = tmp_path / "run"
    train(tiny_spec(steps=2, checkpoint_every=2, eval_every=2), run, device=torch.device("cpu"))
    capsys.readouterr()
    assert main(["generate", str(run), "--tokens", "8", "--seed", "1"]) == 0
    assert len(capsys.readouterr().out) > 1
