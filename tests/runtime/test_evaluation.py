"""Loss by position (runtime/evaluation): the prefix identity, hand-computed buckets, rows, `grapefx eval`."""

import json
import math

import numpy as np
import pytest
import torch
import yaml

from compiler.lower import lower
from runtime.cli import main
from runtime.evaluation import EvalSettings, evaluate, model_logits
from runtime.evaluation.positions import (
    band_edges,
    bucket_edges,
    summarize,
    token_losses,
)
from runtime.evaluation.rows import Stream, select_rows
from spec import spec_from_dict
from spec.errors import GrapefxError

PNG = b"\x89PNG\r\n\x1a\n"


# ---------------------------------------------------------------------- the identity
def test_mean_over_the_first_T_positions_of_a_4T_row_is_the_loss_of_the_T_prefix_alone(tiny_dict):
    spec = spec_from_dict(tiny_dict())                     # local window 4 + global GRAPE-A, MoE, T = 16
    model = lower(spec).eval()
    torch.manual_seed(0)
    for p in model.parameters():                           # random weights, so every position matters
        p.data.normal_(0, 0.3)
    T = spec.data.seq_len
    tokens = torch.randint(0, 257, (3, 4 * T + 1))
    x, y = tokens[:, :-1], tokens[:, 1:]
    with torch.no_grad():
        ell = token_losses(model_logits(model), x, y)      # (3, 4T)
        alone = model(x[:, :T], y[:, :T]).ce_loss           # the head's own mean cross-entropy
        whole = model(x, y).ce_loss
    assert ell.shape == (3, 4 * T)
    torch.testing.assert_close(ell[:, :T].mean(), alone, rtol=2e-6, atol=0)
    torch.testing.assert_close(ell.mean(), whole, rtol=2e-6, atol=0)
    assert not torch.allclose(ell[:, :T].mean(), ell[:, T:].mean(), rtol=1e-3)    # not a constant loss


# ---------------------------------------------------------------------- hand-computed buckets
def _stand_in(x: torch.Tensor) -> torch.Tensor:
    """Logits over V = 4 with the target (always token 1) at logit ln 3 from position 4 on, else all 0."""
    B, L = x.shape
    logits = torch.zeros(B, L, 4)
    logits[:, 4:, 1] = math.log(3.0)
    return logits


def test_a_model_whose_loss_depends_on_position_gives_the_hand_computed_buckets():
    # positions 0..3: uniform over 4 ids, loss ln 4; positions 4..7: p(target) = 3 / (3 + 3), loss ln 2
    y = torch.ones(2, 8, dtype=torch.int64)
    ell = token_losses(_stand_in, torch.zeros_like(y), y)
    ln4, ln2 = math.log(4), math.log(2)
    torch.testing.assert_close(ell, torch.tensor([[ln4] * 4 + [ln2] * 4] * 2))
    edges = bucket_edges(8, 2, [1, 2, 4], n=4, spacing="linear")
    assert edges == [0, 2, 4, 6, 8]
    s = summarize(ell, seq_len=2, contexts=[1, 2, 4], edges=edges)
    assert [b["positions"] for b in s["buckets"]] == [[0, 2], [2, 4], [4, 6], [6, 8]]
    assert [b["loss"] for b in s["buckets"]] == pytest.approx([1.386294, 1.386294, 0.693147, 0.693147], abs=1e-6)
    assert [b["tokens"] for b in s["buckets"]] == [4, 4, 4, 4]
    # bands [0, T), [T, 2T), [2T, 4T) with T = 2
    assert [b["positions"] for b in s["bands"]] == [[0, 2], [2, 4], [4, 8]]
    assert [b["loss"] for b in s["bands"]] == pytest.approx([1.386294, 1.386294, 0.693147], abs=1e-6)
    # contexts 1, 2, 4: positions < 2, < 4, < 8; (ln 4 + ln 2) / 2 = 1.039721
    assert [c["loss"] for c in s["contexts"]] == pytest.approx([1.386294, 1.386294, 1.039721], abs=1e-6)
    assert [c["tokens"] for c in s["contexts"]] == [4, 8, 16]
    assert all(row == pytest.approx([ln4, ln4, (ln4 + ln2) / 2]) for row in s["per_row"]["contexts"])


def test_log_buckets_include_every_context_boundary():
    edges = bucket_edges(512, 128, [1, 2, 4], n=8)
    # round(512 ** (i / 8)) = round(2 ** (9 i / 8)), i = 0..8: 1 2 5 10 23 49 108 235 512, plus 0, 128, 256
    assert edges == [0, 1, 2, 5, 10, 23, 49, 108, 128, 235, 256, 512]
    assert band_edges(512, 128) == [0, 128, 256, 512]
    assert band_edges(384, 128) == [0, 128, 256, 384]


# ---------------------------------------------------------------------- rows
def test_rows_are_distinct_whole_windows_and_never_wrap():
    streams = [Stream("a", np.arange(0, 33)), Stream("b", np.arange(100, 117))]   # 4 + 2 rows of 8 (+1)
    rows = select_rows(streams, 8, 6, seed=0, what="the data", fix="lower it")
    assert sorted((r.stream, r.start) for r in rows) == [(0, 0), (0, 8), (0, 16), (0, 24), (1, 0), (1, 8)]
    assert select_rows(streams, 8, 3, seed=0, what="x", fix="y") == rows[:3]          # a prefix of one order
    with pytest.raises(GrapefxError, match=r"^the data holds 50 tokens: 6 row\(s\) of 8 tokens \(\+1 for the last "
                                           r"target\), fewer than the 7 rows asked for; rows are never repeated or "
                                           r"wrapped around, so lower it$"):
        select_rows(streams, 8, 7, seed=0, what="the data", fix="lower it")


# ---------------------------------------------------------------------- the command
@pytest.fixture(scope="module")
def trained_run(tmp_path_factory, tiny_dict):
    """A 2-step run of the conftest tiny spec, trained once for this file's tests."""
    root = tmp_path_factory.mktemp("trained")
    (root / "tiny.yaml").write_text(yaml.safe_dump(tiny_dict(steps=2, eval_every=2), sort_keys=False))
    assert main(["train", str(root / "tiny.yaml"), "--out", str(root / "run")]) == 0
    return root / "run"


def test_eval_on_a_run_folder_and_on_its_export(trained_run, tmp_path, capsys):
    out = tmp_path / "eval"
    assert main(["eval", str(trained_run), "--contexts", "1,2", "--batches", "2", "--batch-size", "2",
                 "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "(step 2): 4 rows of 32 tokens from the validation split of" in printed
    record = json.loads((out / "eval.json").read_text())
    assert (out / "loss_by_position.png").read_bytes().startswith(PNG)
    assert record["settings"]["length"] == 32 and record["data"]["rows_used"] == 4
    assert len(record["per_row"]["contexts"]) == 4 and [b["positions"] for b in record["bands"]] == [[0, 16], [16, 32]]
    check = record["training_context"]
    assert check["loss_of_prefixes_alone"] == pytest.approx(check["loss_of_prefixes_in_long_rows"], rel=1e-5)
    assert sum(b["tokens"] for b in record["buckets"]) == 4 * 32

    export = tmp_path / "export"
    assert main(["export", str(trained_run), "--out", str(export)]) == 0
    out2 = tmp_path / "eval2"
    assert main(["eval", str(export), "--contexts", "1,2", "--batches", "2", "--batch-size", "2",
                 "--out", str(out2)]) == 0
    again = json.loads((out2 / "eval.json").read_text())
    assert again["data"]["rows_sha256"] == record["data"]["rows_sha256"]          # the same tokens scored
    assert [c["loss"] for c in again["contexts"]] == pytest.approx([c["loss"] for c in record["contexts"]], rel=1e-6)


def test_eval_on_a_named_text_source(trained_run, tmp_path, corpus, capsys):
    out = tmp_path / "eval"
    assert main(["eval", str(trained_run), "--data", str(corpus / "corpus.jsonl"), "--contexts", "2",
                 "--batches", "1", "--batch-size", "3", "--out", str(out)]) == 0
    record = json.loads((out / "eval.json").read_text())
    assert record["data"]["label"].endswith("corpus.jsonl (60 documents)") and record["data"]["rows_used"] == 3


def test_eval_on_a_megatron_prefix_scores_its_rows(trained_run, tmp_path):
    from runtime.data import write_indexed_dataset

    docs = [np.arange(k, k + 40, dtype=np.uint16) % 256 for k in range(3)]          # 120 tokens: 3 rows of 32 (+1)
    write_indexed_dataset(tmp_path / "mg", docs, np.dtype(np.uint16))
    out = tmp_path / "eval"
    assert main(["eval", str(trained_run), "--data", str(tmp_path / "mg"), "--contexts", "2", "--batches", "1",
                 "--batch-size", "3", "--out", str(out)]) == 0
    record = json.loads((out / "eval.json").read_text())
    assert sorted(record["data"]["rows"]) == [[0, 0], [0, 32], [0, 64]] and record["data"]["rows_available"] == 3


@pytest.mark.parametrize("args, message", [
    (["--contexts", "0,2"], "--contexts: 0,2: every context must be >= 1"),
    (["--contexts", "1,x"], "--contexts: '1,x' is not a list of whole numbers; write e.g. 1,2,4,8"),
    (["--contexts", "64", "--batches", "50"], "rows are never repeated or wrapped around, so lower --batches, "
                                              "--batch-size or the largest context, raise data.valid_fraction"),
])
def test_eval_refuses_bad_input_with_the_fix(trained_run, tmp_path, capsys, args, message):
    assert main(["eval", str(trained_run), "--out", str(tmp_path / "e")] + args) == 2
    assert message in capsys.readouterr().err


def test_eval_refuses_a_run_without_a_checkpoint(tmp_path, tiny_yaml, capsys):
    run = tmp_path / "empty"
    run.mkdir()
    (run / "spec.resolved.yaml").write_text(tiny_yaml().read_text())
    assert main(["eval", str(run), "--out", str(tmp_path / "e")]) == 2
    assert "no complete checkpoint in" in capsys.readouterr().err


def test_evaluate_checks_its_settings(tiny_dict):
    spec = spec_from_dict(tiny_dict())
    with pytest.raises(GrapefxError, match="every context must be a whole number >= 1"):
        evaluate(lower(spec), spec, [], EvalSettings(contexts=(0,)), torch.device("cpu"), data_label="x", fix="y")
