"""What the fusion passes share: structural node tests, shape facts, the result of one pass on one graph.

Passes match by structure: an op (``torch.matmul`` as a function, or ``x.matmul`` as a method —
both spellings are the same op), its arguments, the node that produced each argument, and the
fake tensor in ``node.meta["val"]`` (shape, dtype), which ``propagate`` fills in before the passes
run. Node names are never read to decide a match.

Contracts every pass keeps (Inductor's fx_passes invariants, restated for our graphs):
- a pass never changes what a graph computes, only how; a candidate it is unsure of is declined
  with a reason, never an error;
- nodes it inserts get ``meta["val"]`` (``infer_meta``) so later passes can check them;
- it leaves the graph valid: dead code eliminated, ``graph.lint()`` clean, ``gm.recompile()`` done
  (``finish``).
"""

from __future__ import annotations

import operator
import re
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F
from torch import fx
from torch.fx.passes.fake_tensor_prop import FakeTensorProp

import compiler.ops  # noqa: F401  (registers torch.ops.grapefx)
from compiler.ops.attention import ATTENTION_ARGS, ATTENTION_DEFAULTS

# one op, its spellings: the call_function targets; the call_method name is the key itself
_FUNCTIONS: dict[str, tuple[Any, ...]] = {
    "matmul": (torch.matmul, operator.matmul),
    "linear": (F.linear,),
    "mul": (torch.mul, operator.mul),
    "div": (torch.div, operator.truediv),
    "add": (torch.add, operator.add),
    "sub": (torch.sub, operator.sub),
    "softmax": (torch.softmax, F.softmax),
    "masked_fill": (torch.masked_fill,),
    "reshape": (torch.reshape,),
    "view": (),
    "transpose": (torch.transpose,),
    "unsqueeze": (torch.unsqueeze,),
    "repeat": (),
    "lt": (torch.lt, operator.lt),
    "gt": (torch.gt, operator.gt),
    "ge": (torch.ge, operator.ge),
    "logical_or": (torch.logical_or, operator.or_),
    "arange": (torch.arange,),
    "float": (),
    "to": (),
    "size": (),
}

ATTENTION = torch.ops.grapefx.attention


def is_op(node: Any, name: str) -> bool:
    """Whether ``node`` computes op ``name`` (see ``_FUNCTIONS``), as a function or as a method."""
    if not isinstance(node, fx.Node):
        return False
    if node.op == "call_method":
        return node.target == name
    return node.op == "call_function" and node.target in _FUNCTIONS[name]


def is_custom(node: Any, packet: torch._ops.OpOverloadPacket) -> bool:
    """Whether ``node`` calls the custom op ``packet`` (the packet or its default overload)."""
    return (isinstance(node, fx.Node) and node.op == "call_function"
            and (node.target is packet or node.target is getattr(packet, "default", None)))


def arg(node: fx.Node, index: int, name: str, default: Any = None) -> Any:
    """Argument ``index`` (positional) or ``name`` (keyword) of a call."""
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(name, default)


def val(x: Any) -> Any:
    """The fake value of a node (tensor, int, ...) or the constant itself."""
    return x.meta.get("val") if isinstance(x, fx.Node) else x


def shape(x: Any) -> tuple[int, ...] | None:
    v = val(x)
    return tuple(v.shape) if isinstance(v, torch.Tensor) else None


def dtype(x: Any) -> torch.dtype | None:
    v = val(x)
    return v.dtype if isinstance(v, torch.Tensor) else None


def only_user(node: fx.Node, user: fx.Node) -> bool:
    """``node`` feeds ``user`` and nothing else (an intermediate that escapes must stay)."""
    return set(node.users) == {user}


def shape_args(node: fx.Node) -> tuple[Any, ...]:
    """The target sizes of ``x.reshape(a, b, ...)``, ``x.reshape((a, b, ...))`` or ``torch.reshape(x, (a, b))``."""
    rest = node.args[1:]
    if not rest and "shape" in node.kwargs:
        rest = (node.kwargs["shape"],)
    return tuple(rest[0]) if len(rest) == 1 and isinstance(rest[0], (tuple, list)) else tuple(rest)


def attention_args(node: fx.Node) -> dict[str, Any]:
    """The arguments of a ``grapefx.attention`` node by name (q, k, v, theta, slopes, window, scale, bias)."""
    out = dict(ATTENTION_DEFAULTS)
    out.update(zip(ATTENTION_ARGS, node.args))
    out.update(node.kwargs)
    return out


def set_attention_args(node: fx.Node, args: dict[str, Any]) -> None:
    """Rewrite a ``grapefx.attention`` node's arguments in place (positional; bias only when given)."""
    names = ATTENTION_ARGS if args.get("bias") is not None else ATTENTION_ARGS[:-1]
    node.args = tuple(args[n] for n in names)
    node.kwargs = {}


# ----------------------------------------------------------------------------- shape facts
class _Prop(FakeTensorProp):
    """FakeTensorProp whose parameters and buffers become fake tensors too (no real data is read)."""

    def get_attr(self, target, args, kwargs):
        return self._mode.from_tensor(super().get_attr(target, args, kwargs), static_shapes=True)

    def run_node(self, n: fx.Node) -> Any:
        result = super().run_node(n)
        # torch 2.11 records no meta["val"] for plain Python results (x.size(1), x.device); the
        # passes read sizes from there, so record them on every version.
        if isinstance(result, (int, float, bool, torch.Size, torch.device)):
            n.meta["val"] = result
        return result


def propagate(gm: fx.GraphModule, *inputs: torch.Tensor) -> None:
    """Fill ``node.meta["val"]`` of every node with a fake value, for inputs shaped like ``inputs``.

    The inputs may be real or meta tensors (meta ones stand for tensors on the device of ``gm``'s
    parameters); only their shapes and dtypes are used. Nothing runs: ``FakeTensorMode`` computes
    shapes and dtypes only, so this is cheap at any model size.
    """
    from torch._subclasses.fake_tensor import FakeTensorMode

    state = next(iter([*gm.parameters(), *gm.buffers()]), None)
    device = state.device if state is not None else torch.device("cpu")
    mode = FakeTensorMode(allow_non_fake_inputs=True)

    def fake(x):
        if not isinstance(x, torch.Tensor):
            return x
        if x.is_meta:
            with mode:
                return torch.empty(x.shape, dtype=x.dtype, device=device)
        return mode.from_tensor(x, static_shapes=True)

    fake = [fake(x) for x in inputs]
    _Prop(gm, mode).propagate_dont_convert_inputs(*fake)


def infer_meta(node: fx.Node) -> None:
    """``meta["val"]`` of a node a pass inserted: its target run on its arguments' fake values."""
    from torch._guards import detect_fake_mode

    args = fx.node.map_arg(node.args, val)
    kwargs = fx.node.map_arg(node.kwargs, val)
    mode = detect_fake_mode(_tensors((args, kwargs)))
    with mode:
        if node.op == "call_method":
            node.meta["val"] = getattr(args[0], node.target)(*args[1:], **kwargs)
        else:
            node.meta["val"] = node.target(*args, **kwargs)


def _tensors(tree: Any) -> list[torch.Tensor]:
    found: list[torch.Tensor] = []
    fx.node.map_aggregate(tree, lambda a: found.append(a) if isinstance(a, torch.Tensor) else None)
    return found


# ----------------------------------------------------------------------------- results
class Reason(str):
    """Why a pass left a candidate alone: the sentence people read, with a stable ``code``.

    A ``str`` (reports, ``passes.json`` and messages show the sentence); tests and tools compare
    ``code`` (``"probs_escape"``), which does not change when the wording does.
    """
    code: str

    def __new__(cls, code: str, text: str) -> Reason:
        reason = super().__new__(cls, text)
        reason.code = code
        return reason


@dataclass
class PassResult:
    """What one pass did to one graph.

    ``matches``: rewrites made; ``removed`` / ``added``: node counts before vs after (dead code
    included); ``declined``: why each candidate that looked like the pattern was left alone;
    ``absent``: why there was no candidate at all (None when there was one).
    """
    name: str
    matches: int = 0
    removed: int = 0
    added: int = 0
    declined: list[Reason] = field(default_factory=list)
    absent: Reason | None = None


def layer_prefix(gm: fx.GraphModule) -> str:
    """``layer4_`` for the block the lowering built as class ``Layer4``: names for inserted nodes only."""
    m = re.fullmatch(r"Layer(\d+)", type(gm).__name__)
    return f"layer{m.group(1)}_" if m else ""


def finish(gm: fx.GraphModule, result: PassResult, before: Sequence[fx.Node]) -> PassResult:
    """Dead-code elimination, lint, recompile; count the nodes that went and came."""
    gm.graph.eliminate_dead_code()
    gm.graph.lint()
    gm.recompile()
    old, new = set(before), set(gm.graph.nodes)
    result.removed, result.added = len(old - new), len(new - old)
    return result


def count(name: str) -> None:
    """One rewrite of pass ``name``: ``torch._dynamo.utils.counters["grapefx"][name]``."""
    from torch._dynamo.utils import counters

    counters["grapefx"][name] += 1


def fold_into_attention(gm: fx.GraphModule, name: str,
                        fold: Callable[[fx.Node, dict[str, Any]], "dict[str, Any] | Reason"]) -> PassResult:
    """The driver of a pass that folds something into each ``grapefx.attention`` node of ``gm``.

    ``fold(node, args)`` gets the node's arguments by name and returns the new arguments, or a
    ``Reason`` saying why this node is left alone (the pass declines quietly). Each rewrite marks the
    node as fused by ``name`` and counts; the graph is then cleaned, linted and recompiled.
    """
    result = PassResult(name)
    before = list(gm.graph.nodes)
    attentions = [n for n in before if is_custom(n, ATTENTION)]
    if not attentions:
        result.absent = Reason("absent", "no grapefx.attention node (attention_formation makes them)")
    for node in attentions:
        new = fold(node, attention_args(node))
        if isinstance(new, str):
            result.declined.append(new)
            continue
        set_attention_args(node, new)
        node.meta.setdefault("grapefx_fused", []).append(name)
        result.matches += 1
        count(name)
    return finish(gm, result, before)
