"""Helpers for the compiled pipeline tests (imported by name: the test folders have no __init__.py)."""

import contextlib

import torch

from spec import spec_from_dict
from spec.schema import Spec


def compile_spec(**compile_section) -> Spec:
    """The trainer tests' tiny model (tests/runtime/conftest.py: C=16, Hq=2/Hkv=1, D=8, W=4, 4 experts
    top-2, vocab 257, T=16, micro-batch 2) with 4 layers, local/global/local/global, so each block
    graph runs twice. Same graphs and shapes as the trainer's: Inductor's cache serves both."""
    return spec_from_dict({
        "name": "compile-tiny",
        "model": {"vocab_size": 257, "d_model": 16, "n_layers": 4, "global_every": 2},
        "attention": {"local": {"heads": 2, "kv_heads": 1, "head_dim": 8, "window": 4, "position": {"kind": "grape-m"}},
                      "global": {"heads": 2, "kv_heads": 1, "head_dim": 8, "position": {"kind": "grape-a"}}},
        "moe": {"experts": 4, "top_k": 2, "shared_experts": 1, "expert_hidden": 16},
        "compile": {"enabled": True, **compile_section},
        "data": {"seq_len": 16},
        "train": {"micro_batch": 2, "global_batch": 2},
    })


def graph_counts() -> dict:
    """Dynamo's compile counters: graphs compiled so far, and Inductor's FX graph cache hits / misses."""
    from torch._dynamo.utils import counters
    return {"graphs": counters["stats"]["unique_graphs"], "hits": counters["inductor"]["fxgraph_cache_hit"],
            "misses": counters["inductor"]["fxgraph_cache_miss"]}


def batches(spec, n: int, seed: int = 0) -> list:
    g = torch.Generator().manual_seed(seed)
    shape = (spec.train.micro_batch, spec.data.seq_len)
    return [(torch.randint(0, 257, shape, generator=g), torch.randint(0, 257, shape, generator=g)) for _ in range(n)]


@contextlib.contextmanager
def as_the_trainer():
    """Deterministic algorithms on, as the trainer runs on CPU. Dynamo guards on this global flag:
    calls with it off would compile every graph again."""
    before = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before)


def sgd_step(model, lr: float = 0.1) -> None:
    with torch.no_grad():
        for p in model.parameters():
            if p.grad is not None:
                p -= lr * p.grad
                p.grad = None
