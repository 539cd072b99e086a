"""Lowering: spec -> per-layer torch.fx graphs of reference math (see model.py)."""

from compiler.lower.model import GrapeModel, ModelOutput, graph_kind, lower

__all__ = ["GrapeModel", "ModelOutput", "graph_kind", "lower"]
