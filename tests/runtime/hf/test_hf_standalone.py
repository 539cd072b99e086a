"""The export loads and runs in a Python where no grapefx package can be imported."""

import json
import os
import subprocess
import sys

import pytest
import torch
from hf_testing import ROOT, grapefx_logits, model_with_state, write_export

from runtime.data import ByteTokenizer
from spec import load_spec

pytest.importorskip("transformers")

TEXT = "ROMEO: But soft, what light through yonder window breaks?"

# Run isolated (-I: no PYTHONPATH, no script folder on sys.path), then drop what an editable
# install of grapefx adds (a path entry for the checkout, or its import finder); prove that
# spec, compiler and runtime are not importable; then load with transformers alone.
LOADER = """
import importlib.util, json, os, sys
root = os.path.realpath(sys.argv[3])
sys.path[:] = [p for p in sys.path if os.path.realpath(p or ".") != root]
sys.meta_path[:] = [f for f in sys.meta_path if "__editable__" not in getattr(f, "__module__", "")
                    and "__editable__" not in type(f).__module__]
sys.path_hooks[:] = [h for h in sys.path_hooks if "__editable__" not in getattr(h, "__module__", "")]
sys.path_importer_cache.clear()
blocked = [name for name in ("spec", "compiler", "runtime") if importlib.util.find_spec(name) is None]
from transformers import AutoModelForCausalLM, AutoTokenizer
tok = AutoTokenizer.from_pretrained(sys.argv[1])
model = AutoModelForCausalLM.from_pretrained(sys.argv[1], trust_remote_code=True)
ids = tok(sys.argv[4], return_tensors="pt").input_ids
logits = model(ids).logits
grapefx = sorted(m for m in sys.modules if m.split(".")[0] in ("spec", "compiler", "runtime"))
json.dump({"blocked": blocked, "grapefx_modules": grapefx, "ids": ids[0].tolist(), "logits": logits[0].tolist()},
          open(sys.argv[2], "w"))
"""


def test_the_export_loads_without_grapefx(tmp_path):
    spec = load_spec(ROOT / "examples" / "tiny.yaml")
    model = model_with_state(spec)
    write_export(tmp_path / "hf", spec, model, ByteTokenizer())
    (tmp_path / "load.py").write_text(LOADER)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["HF_HOME"] = str(tmp_path / "hf-home")               # a fresh modules cache for the remote code
    done = subprocess.run([sys.executable, "-I", str(tmp_path / "load.py"), str(tmp_path / "hf"),
                           str(tmp_path / "out.json"), str(ROOT), TEXT], check=False, cwd=tmp_path, env=env,
                          stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    got = json.loads((tmp_path / "out.json").read_text())
    assert got["blocked"] == ["spec", "compiler", "runtime"] and got["grapefx_modules"] == []
    assert got["ids"] == [256] + ByteTokenizer().encode(TEXT)          # after an end-of-document id
    ref = grapefx_logits(model, torch.tensor([got["ids"]]))[0]
    assert (torch.tensor(got["logits"]) - ref).abs().max().item() <= 1e-5
