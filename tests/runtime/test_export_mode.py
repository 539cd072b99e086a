"""model.safetensors gets the user's umask like every other file of an export (safetensors itself writes 0600)."""

import os
import stat

import torch

from runtime.export import export
from trainer_testing import train


def test_exported_weights_follow_the_umask(tiny_spec, tmp_path):
    run = tmp_path / "run"
    train(tiny_spec(steps=1, checkpoint_every=1, eval_every=10), run, device=torch.device("cpu"))
    before = os.umask(0o027)
    try:
        export(run, tmp_path / "a")
        os.umask(0o022)
        export(run, tmp_path / "b")
        export(run, tmp_path / "c", format="hf")
    finally:
        os.umask(before)
    assert stat.S_IMODE((tmp_path / "a" / "model.safetensors").stat().st_mode) == 0o640
    assert stat.S_IMODE((tmp_path / "b" / "model.safetensors").stat().st_mode) == 0o644
    assert stat.S_IMODE((tmp_path / "b" / "config.json").stat().st_mode) == 0o644
    assert stat.S_IMODE((tmp_path / "c" / "model.safetensors").stat().st_mode) == 0o644    # the HF folder too
