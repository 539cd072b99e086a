"""The trainer's periodic evaluation never repeats validation rows; the start summary is printed."""

import numpy as np
import torch

from runtime.data import IndexedDataset, Sampler, Split, write_indexed_dataset
from runtime.trainer import Trainer
from spec import spec_from_dict

CPU = torch.device("cpu")


def test_distinct_rows_stop_where_an_upsampled_source_repeats(tmp_path):
    for name in ("a", "b"):                                  # 9 tokens at T = 2: (9 - 1) // 2 = 4 rows each
        write_indexed_dataset(tmp_path / name, [np.arange(9)], np.uint16)
    parts = [IndexedDataset(tmp_path / n) for n in ("a", "b")]
    assert Sampler(Split("valid", parts, [1.0, 1.0]), 2, 1, 0).distinct_rows == 8
    # weights 3:1: source a's k-th draw is due at (k + 0.5) / 0.75, b's at (k + 0.5) / 0.25, ties to a:
    # a0 (0.67), a1 (2), b0 (2), a2 (3.33), a3 (4.67), a4 (6) <- a's 5th draw, a row it already gave
    assert Sampler(Split("valid", parts, [3.0, 1.0]), 2, 1, 0).distinct_rows == 5


def test_a_small_validation_split_is_evaluated_once_and_said(tiny_dict, tmp_path, capsys):
    d = tiny_dict(eval_batches=1000)                         # asks 1000 x 2 rows, far more than the split has
    spec = spec_from_dict(d)
    trainer = Trainer(spec, tmp_path / "run", device=CPU, tty=False)
    try:
        rows = (trainer.data.valid.num_tokens - 1) // 16     # one source: every row of the split, T = 16
        assert trainer.eval_rows == rows < 2000
        record = trainer.evaluate()
        assert record["tokens"] == rows * 16                 # each row's 16 targets once
        out = capsys.readouterr().out
        assert (f"note: the validation split has {rows} rows of 16 tokens without repeating any ({rows * 16:,} "
                "tokens), fewer than train.eval_batches x micro_batch = 2000 rows") in out
        assert f"eval every 3 steps on {rows * 16:,} tokens" in out
        assert out.startswith("model  tiny: 2 layers") or "\nmodel  tiny: 2 layers" in out
    finally:
        trainer.close()


def test_a_full_evaluation_is_eval_batches_micro_batches(tiny_spec, tmp_path, capsys):
    trainer = Trainer(tiny_spec(eval_batches=2), tmp_path / "run", device=CPU, tty=False)
    try:
        assert trainer.eval_rows == 4 and trainer.evaluate()["tokens"] == 4 * 16
        assert "note: the validation split" not in capsys.readouterr().out
    finally:
        trainer.close()
