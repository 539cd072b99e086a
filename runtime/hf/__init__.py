"""``grapefx export RUN --out DIR --format hf``: a folder Hugging Face ``transformers`` loads.

    DIR/
        config.json               model_type grapefx, every architecture field (``config.py``)
        configuration_grapefx.py  the config class  } copied from this package's one template pair,
        modeling_grapefx.py       the model          } plain PyTorch, no grapefx import
        model.safetensors         the weights under the modeling file's names (``weights.py``)
        generation_config.json    end-of-document as EOS; the padding ids of the vocabulary suppressed
        tokenizer.json, tokenizer_config.json   byte or BPE, as ``PreTrainedTokenizerFast`` (``tokenizer.py``)
        grapefx.spec.yaml         the resolved spec the weights belong to (for people; not read)

    model = AutoModelForCausalLM.from_pretrained(DIR, trust_remote_code=True)
    tokenizer = AutoTokenizer.from_pretrained(DIR)

The modeling files carry ``MODELING_VERSION`` (configuration_grapefx.py); config.json records it
as ``grapefx_modeling_version`` and the config class refuses a config.json of another version.
A model without a tokenizer grapefx can write (pre-tokenised data) is exported without tokenizer
files, and the export says so. Spec settings the modeling file cannot run are refused before
anything is written (``config.unsupported``). docs/hf-export.md has the details.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from runtime.hf.config import hf_config, unsupported
from runtime.hf.tokenizer import write_tokenizer
from runtime.hf.weights import hf_state_dict
from spec.errors import GrapefxError

__all__ = ["TEMPLATES", "HFWritten", "check_supported", "modeling_version", "write_hf"]

HERE = Path(__file__).parent
TEMPLATES = ("configuration_grapefx.py", "modeling_grapefx.py")
TOKENIZER_KINDS = ("byte", "bpe")
FP32_WEIGHTS = (".router.weight", ".router.expert_bias", "grape_m.log_freq", "alibi.slope_logit")


def modeling_version() -> str:
    """The ``MODELING_VERSION`` of the template (read as text: exporting needs no transformers)."""
    m = re.search(r'^MODELING_VERSION = "(\w+)"$', (HERE / TEMPLATES[0]).read_text(), re.MULTILINE)
    return m.group(1)


def check_supported(spec) -> None:
    """GrapefxError naming every setting of ``spec`` the modeling file cannot run."""
    found = unsupported(spec)
    if found:
        raise GrapefxError(f"--format hf: the Hugging Face modeling file (version {modeling_version()}) does not "
                           f"implement {'; '.join(found)}; export without --format hf (grapefx's own format keeps "
                           "every setting) or change the spec")


@dataclass(frozen=True)
class HFWritten:
    tokenizer: str | None        # "byte" | "bpe", or None: no tokenizer files written
    note: str | None             # why there is no tokenizer


def write_hf(folder: Path, spec, state: dict, tokenizer, *, source: dict, stored) -> HFWritten:
    """Write the export files into the (new, empty) ``folder``; ``stored`` casts tensors for --dtype."""
    from safetensors.torch import save_file

    from spec import dump_spec

    check_supported(spec)
    version = modeling_version()
    kind = getattr(tokenizer, "kind", None)
    has_tok = kind in TOKENIZER_KINDS
    eod = tokenizer.eod_id if has_tok else None
    tok_vocab = tokenizer.vocab_size if has_tok else spec.model.vocab_size
    config = hf_config(spec, tokenizer_vocab_size=tok_vocab, eod_id=eod, source=source, modeling_version=version)
    named = hf_state_dict(state)
    tensors = stored(named)
    for key in tensors:                      # the router stays fp32 in a bf16 export too (MATH.md §6)
        if key.endswith(FP32_WEIGHTS):
            tensors[key] = named[key].detach().to("cpu", torch.float32).contiguous()
    if any(t.dtype.is_floating_point and t.dtype.itemsize == 2 for t in tensors.values()):
        config["torch_dtype"] = "bfloat16"
    (folder / "config.json").write_text(json.dumps(config, indent=1) + "\n")
    header = f"# Written by grapefx export --format hf (modeling version {version}); generated, do not edit.\n"
    for name in TEMPLATES:
        (folder / name).write_text(header + (HERE / name).read_text())
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    padding = list(range(tok_vocab, spec.model.padded_vocab_size))
    generation = {"eos_token_id": eod, "pad_token_id": eod, "suppress_tokens": padding or None}
    (folder / "generation_config.json").write_text(json.dumps(generation, indent=1) + "\n")
    (folder / "grapefx.spec.yaml").write_text(dump_spec(spec))
    if not has_tok:
        return HFWritten(None, f"no tokenizer files: the run has no tokenizer grapefx can write "
                               f"({kind or 'none'}; byte and BPE are written); AutoTokenizer will not load this "
                               "folder, feed token ids to the model")
    write_tokenizer(tokenizer, folder)
    return HFWritten(kind, None)
