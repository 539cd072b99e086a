"""The compiler's source fingerprint in torch.compile's cache keys (compiler/code_version.py)."""

import hashlib

import torch

from compiler import code_version
from compiler.code_version import source_fingerprint, tag_compile_caches
from compiler.pipeline import build_model


def test_fingerprint_is_the_sha256_of_paths_and_bytes_and_follows_any_change(tmp_path):
    (tmp_path / "ops").mkdir()
    (tmp_path / "ops" / "a.py").write_bytes(b"x = 1\n")
    (tmp_path / "b.py").write_bytes(b"y = 2\n")
    (tmp_path / "notes.txt").write_bytes(b"not source")
    by_hand = hashlib.sha256(b"b.py\0y = 2\n\0" + b"ops/a.py\0x = 1\n\0").hexdigest()[:16]
    assert source_fingerprint(tmp_path) == by_hand
    (tmp_path / "ops" / "a.py").write_bytes(b"x = 2\n")                 # one byte of one kernel file
    assert source_fingerprint(tmp_path) != by_hand


def test_the_tag_keeps_the_users_and_is_added_once():
    ours = f"grapefx-{source_fingerprint()}"
    with torch.compiler.config.patch(cache_key_tag="mine"):
        assert tag_compile_caches() == f"mine+{ours}"
        assert tag_compile_caches() == f"mine+{ours}"
    assert code_version._tag() == ours


def test_compiling_a_model_tags_the_caches(make_spec):
    with torch.compiler.config.patch(cache_key_tag=""):
        build_model(make_spec(), "cpu", compile=True)                   # Dynamo is lazy: nothing compiles here
        assert torch.compiler.config.cache_key_tag == f"grapefx-{source_fingerprint()}"
