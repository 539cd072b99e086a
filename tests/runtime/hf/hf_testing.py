"""Helpers for the Hugging Face export tests: a grapefx model with non-trivial routing state, its
eager logits, and its export written straight from memory (no training run)."""

from pathlib import Path

import torch

from compiler.lower import lower
from runtime.generate import subgraph
from runtime.hf import write_hf

ROOT = Path(__file__).resolve().parents[3]


def model_with_state(spec, seed: int = 0):
    """``lower(spec)`` in fp32 with expert biases of std 0.1 (large enough to change the experts chosen)
    and GRAPE-M log-frequencies moved off their RoPE start by std 0.5, so both must survive the export."""
    model = lower(spec)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for key, value in model.state_dict().items():
            if key.endswith("expert_bias"):
                value.copy_(torch.randn(value.shape, generator=gen) * 0.1)
            elif key.endswith("log_freq"):
                value.add_(torch.randn(value.shape, generator=gen) * 0.5)
    return model.eval()


@torch.no_grad()
def grapefx_logits(model, tokens):
    """The eager lowered model's logits (B, T, padded V): embed, every layer graph, the head graph cut
    at its logits."""
    x = model.embed(tokens)
    for i, layer in enumerate(model.layers):
        args = (x, model.grape_m.log_freq) if model.takes_log_freq[i] else (x,)
        x = layer(*args)[0] if i in model.moe_layers else layer(*args)
    node = next(n for n in model.head.graph.nodes if n.name == "head_logits")
    head = subgraph(model.head, {}, [node])
    (logits,) = head(x, model.embed.weight) if model.spec.model.tied_embeddings else head(x)
    return logits


def write_export(folder: Path, spec, model, tokenizer):
    """The --format hf files of ``model`` in ``folder`` (created), fp32."""
    folder.mkdir(parents=True)
    stored = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    return write_hf(folder, spec, stored, tokenizer, source={"name": spec.name, "run": "test", "step": 0},
                    stored=lambda tensors: tensors)
