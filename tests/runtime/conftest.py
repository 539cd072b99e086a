"""A tiny local corpus and a tiny spec for the trainer tests (no network, eager, small shapes)."""

import json
import random
from pathlib import Path

import pytest
import yaml

from spec import spec_from_dict

WORDS = ("the quick brown fox jumps over a lazy dog and then runs away from the big cat who sleeps "
         "all day in the warm sun by the old river").split()


@pytest.fixture(scope="session")
def corpus(tmp_path_factory) -> Path:
    """60 short English-like documents as JSONL (one document per line), the data cache beside it."""
    root = tmp_path_factory.mktemp("corpus")
    rng = random.Random(0)
    with open(root / "corpus.jsonl", "w") as fh:
        for _ in range(60):
            fh.write(json.dumps({"text": " ".join(rng.choice(WORDS) for _ in range(50)) + "."}) + "\n")
    return root


def _tiny_dict(corpus: Path, **train) -> dict:
    """2 layers (local GRAPE-M + global GRAPE-A), C=16, 4 experts top-2, byte tokenizer, T=16."""
    t = {"steps": 6, "micro_batch": 2, "global_batch": 4, "log_every": 1, "eval_every": 3, "eval_batches": 2,
         "checkpoint_every": 100, "keep_checkpoints": 3, "schedule": {"warmup_steps": 2}}
    t.update(train)
    return {
        "name": "tiny",
        "model": {"vocab_size": 257, "d_model": 16, "n_layers": 2, "global_every": 2},
        "attention": {"local": {"heads": 2, "kv_heads": 1, "head_dim": 8, "window": 4, "position": {"kind": "grape-m"}},
                      "global": {"heads": 2, "kv_heads": 1, "head_dim": 8, "position": {"kind": "grape-a"}}},
        "moe": {"experts": 4, "top_k": 2, "shared_experts": 1, "expert_hidden": 16},
        "compile": {"enabled": False},
        "data": {"sources": [{"path": str(corpus / "corpus.jsonl")}], "seq_len": 16, "valid_fraction": 0.1,
                 "cache_dir": str(corpus / "cache")},
        "train": t,
    }


@pytest.fixture(scope="session")
def tiny_dict(corpus):
    """``tiny_dict(**train_overrides) -> dict`` (the spec as plain data, to change other sections)."""
    return lambda **train: _tiny_dict(corpus, **train)


@pytest.fixture
def tiny_spec(corpus):
    """``tiny_spec(**train_overrides) -> Spec``."""
    return lambda **train: spec_from_dict(_tiny_dict(corpus, **train))


@pytest.fixture
def tiny_yaml(corpus, tmp_path):
    """``tiny_yaml(**train_overrides) -> Path`` of a spec file."""
    def write(**train):
        path = tmp_path / "tiny.yaml"
        path.write_text(yaml.safe_dump(_tiny_dict(corpus, **train), sort_keys=False))
        return path
    return write
