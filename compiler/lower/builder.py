"""A small builder that writes torch.fx graphs with readable, layer-qualified node names.

Lowering emits one node per idea (``layer4_attn_scores``), so the graph a user reads in
``lowered.py`` says what the model means. Tracing plain Python would name nodes after ops
(``matmul_3``); the builder names them after the math instead.

    b = GraphBuilder(prefix="layer4_")
    x = b.input("x")                                   # placeholder `x`
    w = b.param("attn.wq", tensor)                     # get_attr `layer4_attn_wq`, owned by the block
    q = b("attn_q", F.linear, x, w)                    # call_function `layer4_attn_q`
    gm = b.build(outputs=(q,))

Parameters and buffers are registered on the block's root module under their dotted
qualified names (``attn.wq``), so state-dict keys follow PyTorch (``layers.3.attn.wq``).

Roles: a node that code outside the lowering must find (the KV-cache decoder cuts the graphs
there) is tagged ``node.meta["grapefx_role"] = ROLE`` (``tag``) and found with ``tagged(gm)``;
node names are for reading, roles are the contract:

    attention.q        (B, Hq, T, D) q, normalised and rotated, as the chain reads it
    attention.k / .v   (B, Hkv, T, D) k (rotated) and v; TPA: the contractions of the factors
    attention.scores   the fp32 scores times the scale (the scale is its constant argument)
    attention.slopes   (Hq,) fp32 bias slopes (kinds that add a bias)
    attention.out      (B, T, Hq*D) the heads' outputs before W_o
    moe.expert_index   (N, K) int64 the experts the router picked
    head.logits        (B, T, V) the LM head's logits
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import fx, nn

ROLE = "grapefx_role"


def tag(node: fx.Node, role: str) -> fx.Node:
    """Mark ``node`` with ``role`` (see the module docstring); returns it."""
    node.meta[ROLE] = role
    return node


def tagged(gm: fx.GraphModule) -> dict[str, fx.Node]:
    """The tagged nodes of ``gm`` by role."""
    return {n.meta[ROLE]: n for n in gm.graph.nodes if ROLE in n.meta}


class GraphBuilder:
    def __init__(self, prefix: str = ""):
        self.prefix = prefix
        self.graph = fx.Graph()
        self.root = nn.Module()

    # -- inputs and state ------------------------------------------------------------------
    def input(self, name: str) -> fx.Node:
        """A graph input. Names are *not* prefixed: inputs are the block's calling convention."""
        return self.graph.placeholder(name)

    def param(self, qualname: str, value: torch.Tensor, *, trainable: bool = True) -> fx.Node:
        """Register a parameter (or, with ``trainable=False``, a buffer) at ``qualname``."""
        *path, leaf = qualname.split(".")
        owner = self.root
        for part in path:
            if not hasattr(owner, part):
                owner.add_module(part, nn.Module())
            owner = getattr(owner, part)
        if trainable:
            owner.register_parameter(leaf, nn.Parameter(value))
        else:
            owner.register_buffer(leaf, value)
        return self.graph.create_node("get_attr", qualname, name=self._name(qualname.replace(".", "_")))

    # -- computation ---------------------------------------------------------------------------
    def __call__(self, name: str, target: Callable, *args: Any, **kwargs: Any) -> fx.Node:
        """``name = target(*args, **kwargs)`` as a call_function node."""
        return self.graph.create_node("call_function", target, args, kwargs, name=self._name(name))

    def method(self, name: str, method: str, *args: Any, **kwargs: Any) -> fx.Node:
        """``name = args[0].method(*args[1:], **kwargs)`` as a call_method node."""
        return self.graph.create_node("call_method", method, args, kwargs, name=self._name(name))

    def getitem(self, name: str, value: fx.Node, index: Any) -> fx.Node:
        import operator
        return self(name, operator.getitem, value, index)

    def build(self, outputs: tuple[Any, ...], class_name: str = "Block") -> fx.GraphModule:
        self.graph.output(outputs if len(outputs) != 1 else outputs[0])
        self.graph.lint()
        return fx.GraphModule(self.root, self.graph, class_name=class_name)

    def _name(self, name: str) -> str:
        return f"{self.prefix}{name}"
