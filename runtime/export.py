"""``grapefx export RUN --out DIR [--format grapefx|hf]``: a run's newest checkpoint as a self-contained folder.

``--format hf`` writes a folder for Hugging Face ``transformers`` instead (``runtime/hf``,
docs/hf-export.md). The default, grapefx's own format:

    DIR/
        model.safetensors   the model's state dict (every parameter and buffer, PyTorch key names:
                            ``layers.3.attn.wq``, ``layers.0.attn.wa_q``, ``layers.3.moe.expert_bias``)
        spec.yaml           the resolved spec (``spec.dump_spec``): the model is ``compiler.lower`` of it
        config.json         a summary for people and other tools (below); spec.yaml is the authority
        tokenizer.json      the BPE tokenizer (absent for the byte tokenizer, which needs no file)

``--dtype bf16`` stores the matrices (embedding, projections, experts, LM head) in bf16 and keeps
the vectors in fp32: norm weights, GRAPE-M log-frequencies, ALiBi slopes and the expert bias
(MATH.md §6 keeps those in fp32). Loading casts everything back into the fp32 master weights.

config.json: format, format_version, name, grapefx_version, source {run (folder name), step},
dtype, vocab_size, padded_vocab_size, d_model, n_layers, layer_kinds, ffn_kinds, tied_embeddings,
attention {local, global: the spec's attention sections}, moe (or null), params, tokenizer
{kind, vocab_size, eod_id, file}. No machine paths.

``runtime.trained.load_export`` loads it back (``grapefx generate DIR`` accepts it).
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from runtime.run_folder import package_version
from runtime.trained import is_export, load_run
from spec import dump_spec
from spec.convert import to_dict
from spec.derive import param_counts
from spec.errors import GrapefxError

__all__ = ["export", "Exported", "FORMAT_VERSION", "FORMATS"]

FORMAT_VERSION = 1
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
FORMATS = ("grapefx", "hf")


@dataclass(frozen=True)
class Exported:
    folder: Path
    step: int | None
    bytes: int                   # size of model.safetensors
    note: str | None = None      # something the user should know about the folder (hf: no tokenizer files)


def _stored(tensors: dict[str, torch.Tensor], dtype: str) -> dict[str, torch.Tensor]:
    """Contiguous CPU copies; with bf16, matrices in bf16 and vectors in fp32."""
    out = {}
    for key, t in tensors.items():
        t = t.detach().to("cpu")
        if dtype == "bf16" and t.is_floating_point() and t.dim() >= 2:
            t = t.to(torch.bfloat16)
        out[key] = t.contiguous().clone()
    return out


def export(run: str | Path, out: str | Path, *, dtype: str = "fp32", format: str = "grapefx") -> Exported:
    """Write the export folder ``out`` (``format``: grapefx or hf) from the newest complete checkpoint of ``run``."""
    from safetensors.torch import save_file

    run, out = Path(run), Path(out)
    if dtype not in DTYPES:
        raise GrapefxError(f"--dtype: {dtype!r} is not an export dtype; use fp32 or bf16")
    if format not in FORMATS:
        raise GrapefxError(f"--format: {format!r} is not an export format; use grapefx or hf")
    if run.is_dir() and is_export(run):
        raise GrapefxError(f"{run}: this is an export folder already; export from the run folder it came from")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise GrapefxError(f"--out: {out} exists and is not an empty folder; choose a new folder or delete it")
    trained = load_run(run, torch.device("cpu"))
    spec, tok = trained.spec, trained.tokenizer
    tmp = out.parent / f".{out.name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    if format == "hf":
        return _finish(tmp, out, trained.step, _write_hf(tmp, trained, run, dtype))
    save_file(_stored(trained.model.state_dict(), dtype), tmp / "model.safetensors",
              metadata={"format": "grapefx", "dtype": dtype})
    (tmp / "spec.yaml").write_text(dump_spec(spec))
    tok_file = None
    if tok.kind == "bpe":
        tok_file = "tokenizer.json"
        tok.save(tmp / tok_file)
    m = spec.model
    config = {
        "format": "grapefx-export", "format_version": FORMAT_VERSION, "name": spec.name,
        "grapefx_version": package_version("grapefx"), "source": {"run": run.resolve().name, "step": trained.step},
        "dtype": dtype, "vocab_size": m.vocab_size, "padded_vocab_size": m.padded_vocab_size,
        "d_model": m.d_model, "n_layers": m.n_layers, "layer_kinds": list(spec.layer_kinds()),
        "ffn_kinds": [spec.ffn_kind(i) for i in range(m.n_layers)], "tied_embeddings": m.tied_embeddings,
        "attention": {"local": to_dict(spec.attention.local), "global": to_dict(spec.attention.global_)},
        "moe": to_dict(spec.moe) if spec.moe is not None else None, "params": param_counts(spec).total,
        "tokenizer": {"kind": tok.kind, "vocab_size": tok.vocab_size, "eod_id": tok.eod_id, "file": tok_file},
    }
    (tmp / "config.json").write_text(json.dumps(config, indent=1) + "\n")
    return _finish(tmp, out, trained.step, None)


def _write_hf(tmp: Path, trained, run: Path, dtype: str) -> str | None:
    """The Hugging Face files (``runtime.hf.write_hf``); returns the note to show, if any."""
    from runtime.hf import write_hf

    spec = trained.spec
    source = {"name": spec.name, "version": package_version("grapefx"), "run": run.resolve().name, "step": trained.step}
    try:
        done = write_hf(tmp, spec, trained.model.state_dict(), trained.tokenizer, source=source,
                        stored=lambda tensors: _stored(tensors, dtype))
    except GrapefxError:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return done.note


def _finish(tmp: Path, out: Path, step: int | None, note: str | None) -> Exported:
    """Move the finished temporary folder to ``out`` (atomic: a rename)."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp / "model.safetensors", 0o666 & ~umask)    # safetensors writes 0600; give it the user's umask
    if out.exists():
        out.rmdir()                              # empty (checked above)
    os.replace(tmp, out)
    return Exported(out, step, (out / "model.safetensors").stat().st_size, note)
