"""Fusion passes: named rewrites of the lowered graphs, run before Dynamo sees them.

| pass                     | graph | file                    | rewrites                                                       | needs               |
| ------------------------ | ----- | ----------------------- | -------------------------------------------------------------- | ------------------- |
| ``tpa_rotation_commute`` | block | tpa_rotation_commute.py | TPA: ``einsum(A, grape_m_rotate(B))`` => ``grape_m_rotate(einsum(A, B))`` (exact) | -  |
| ``attention_formation``  | block | attention_formation.py  | scores -> mask -> softmax -> values => ``grapefx.attention``     | -                   |
| ``bias_softmax``         | block | bias_softmax.py         | dense ALiBi bias of an attention => in-kernel ``slopes``         | attention_formation |
| ``rotary_attention``     | block | rotary_attention.py     | ``grape_m_rotate`` of q and k => in-kernel ``theta``             | attention_formation |
| ``concat_linear``        | block | concat_linear.py        | ``linear(x, W_i)`` for i = 1..n => one ``linear(x, cat(W_i))``, split | -          |
| ``linear_cross_entropy`` | head  | linear_cross_entropy.py | LM head -> cross-entropy => ``grapefx.linear_cross_entropy``     | -                   |

``tpa_rotation_commute`` is a canonicalisation: TPA layers rotate their B factors before the
contraction, and only once it has moved the rotation after it can ``rotary_attention`` fold it.
``concat_linear`` runs after the attention passes: they match from the projections' outputs on,
which it leaves in place (as slices of one GEMM's output). It is the one pass not in the default
``compile.passes`` (``spec.schema.DEFAULT_PASSES``: on an H100 it saved 1% of baseline.yaml's step
for 0.73 GiB more peak memory).

Each pass is ``<name>_pass(gm) -> PassResult``: it rewrites one graph in place (graph module in,
same module out), matching by structure and node metadata, never by node names, and declining
quietly with a ``Reason`` (a sentence with a stable code) when a candidate is not exactly its
pattern. ``PASSES`` is the registry: name, function, the graph it runs on (every ``block``, or
the ``head``) and the pass it needs before it. ``apply_passes`` runs an ordered selection
(``compile.passes`` in the spec, ``--passes``/``--no-passes`` on the command line) and returns a
``PassReport`` with one entry per pass, whatever graph it runs on. A pass whose prerequisite is
not selected before it does nothing, and the report says why.

Every rewrite also bumps ``torch._dynamo.utils.counters["grapefx"][<pass name>]``.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field
from typing import Callable, Literal, Sequence

import torch
from torch import fx

from compiler.passes.attention_formation import attention_formation_pass
from compiler.passes.bias_softmax import bias_softmax_pass
from compiler.passes.concat_linear import concat_linear_pass
from compiler.passes.linear_cross_entropy import linear_cross_entropy_pass
from compiler.passes.match import PassResult, Reason, propagate
from compiler.passes.rotary_attention import rotary_attention_pass
from compiler.passes.tpa_rotation_commute import tpa_rotation_commute_pass
from spec.errors import GrapefxError
from spec.schema import PASS_NAMES

__all__ = ["PASSES", "Pass", "PassResult", "Reason", "PassEntry", "PassReport", "apply_passes", "run_passes",
           "check_pass_names", "block_example_inputs", "layers_text"]


@dataclass(frozen=True)
class Pass:
    """One registered pass: ``run(gm) -> PassResult`` on every block graph or on the head graph."""
    name: str
    run: Callable[[fx.GraphModule], PassResult]
    graph: Literal["block", "head"] = "block"
    needs: str | None = None            # a pass that must run before it (it rewrites that pass's output)


# the registry, in the order the passes run (spec.schema.PASS_NAMES is this order)
PASSES: dict[str, Pass] = {p.name: p for p in (
    Pass("tpa_rotation_commute", tpa_rotation_commute_pass),
    Pass("attention_formation", attention_formation_pass),
    Pass("bias_softmax", bias_softmax_pass, needs="attention_formation"),
    Pass("rotary_attention", rotary_attention_pass, needs="attention_formation"),
    Pass("concat_linear", concat_linear_pass),
    Pass("linear_cross_entropy", linear_cross_entropy_pass, graph="head"),
)}
if tuple(PASSES) != PASS_NAMES:
    raise ImportError("compiler.passes.PASSES and spec.schema.PASS_NAMES must list the same passes in one order")


@dataclass
class PassEntry:
    """One pass over the whole model. Layers are counted from 1 (a head pass has none)."""
    name: str
    enabled: bool
    graph: str = "block"
    matches: int = 0
    layers: list[int] = field(default_factory=list)
    nodes_removed: int = 0
    nodes_added: int = 0
    reasons: dict[Reason, list[int]] = field(default_factory=dict)  # why a candidate / a layer did not match
    skipped: str | None = None                                    # why the pass did not run at all

    def as_dict(self) -> dict:
        return {"graph": self.graph, "matches": self.matches, "layers": self.layers, "enabled": self.enabled,
                "skipped": self.skipped,
                "nodes_removed": self.nodes_removed, "nodes_added": self.nodes_added,
                "reasons": {r: ls for r, ls in self.reasons.items()}}

    def why_nothing(self) -> str | None:
        """A sentence saying why this pass matched nothing (None when it matched)."""
        if self.matches:
            return None
        if not self.enabled:
            return "off (not in compile.passes)"
        if self.skipped:
            return self.skipped
        if self.graph == "head":
            return "; ".join(self.reasons) or "no candidate"
        return "; ".join(f"{layers_text(ls)}: {r}" for r, ls in self.reasons.items()) or "no candidate"

    def codes(self) -> dict[str, list[int]]:
        """The reasons by their codes (what tests compare)."""
        return {r.code: ls for r, ls in self.reasons.items()}


@dataclass
class PassReport:
    """What the passes did to a model: one ``PassEntry`` per known pass, in registry order."""
    order: list[str]                       # the passes that were asked for, in the order they ran
    entries: dict[str, PassEntry]
    n_layers: int

    def as_dict(self) -> dict:
        """``{pass_name: {"matches": n, "layers": [...], ...}}`` (what ``passes.json`` holds)."""
        return {name: e.as_dict() for name, e in self.entries.items()}

    def summary_lines(self) -> list[str]:
        lines = []
        for name, e in self.entries.items():
            if e.matches:
                where = "the head" if e.graph == "head" else layers_text(e.layers)
                lines.append(f"{name}: {e.matches} match{'es' if e.matches != 1 else ''} in {where} "
                             f"(-{e.nodes_removed}/+{e.nodes_added} nodes)")
            else:
                lines.append(f"{name}: nothing — {e.why_nothing()}")
        return lines


def layers_text(layers: Sequence[int]) -> str:
    """[1, 2, 3, 5] -> 'layers 1-3, 5'; [4] -> 'layer 4' (1-based numbers in, text out)."""
    if not layers:
        return "no layer"
    runs, start = [], layers[0]
    for a, b in zip(layers, list(layers[1:]) + [None]):
        if b != a + 1:
            runs.append(f"{start}" if start == a else f"{start}-{a}")
            start = b
    return ("layer " if len(layers) == 1 else "layers ") + ", ".join(runs)


def check_pass_names(names: Sequence[str], where: str = "--passes") -> list[str]:
    """The names, checked against the registry (a ``GrapefxError`` with a did-you-mean otherwise)."""
    for name in names:
        if name not in PASSES:
            close = [n for n in PASSES if n.startswith(name)] or difflib.get_close_matches(name, PASSES, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise GrapefxError(f"{where}: unknown pass {name!r}{hint}; passes: {', '.join(PASSES)}")
    if len(set(names)) != len(names):
        raise GrapefxError(f"{where}: a pass is listed twice: {', '.join(names)}")
    return list(names)


def _prerequisite_missing(name: str, earlier: Sequence[str]) -> Reason | None:
    need = PASSES[name].needs
    if need is None or need in earlier:
        return None
    return Reason("prerequisite_off", f"did nothing: it rewrites the grapefx.attention nodes that {need} makes, and "
                                      f"{need} is off (or listed after it); turn {need} on before {name}")


def run_passes(gm: fx.GraphModule, names: Sequence[str], graph: str = "block") -> list[PassResult]:
    """Run the passes ``names`` that apply to ``graph`` in order on one graph (``meta["val"]`` already propagated)."""
    results = []
    for i, name in enumerate(names):
        if PASSES[name].graph == graph and _prerequisite_missing(name, names[:i]) is None:
            results.append(PASSES[name].run(gm))
    return results


def block_example_inputs(model, index: int, batch: int, seq_len: int) -> list[torch.Tensor]:
    """Meta tensors shaped like layer ``index``'s inputs: x (B, T, C) [, grape_m_log_freq (D/2,)]."""
    C = model.spec.model.d_model
    inputs = [torch.empty(batch, seq_len, C, dtype=model.compute_dtype, device="meta")]
    if model.takes_log_freq[index]:
        inputs.append(torch.empty_like(model.grape_m.log_freq, device="meta"))
    return inputs


def apply_passes(model, names: Sequence[str], *, batch: int = 2, seq_len: int | None = None) -> PassReport:
    """Run the passes ``names`` (in this order) on the graphs of ``model`` (a ``GrapeModel``), in place:
    block passes on every block, head passes on the head.

    Shapes for the block passes' safety checks come from fake tensors for a (batch, seq_len) input (default
    seq_len: the spec's ``data.seq_len``); nothing runs, so this is cheap at any size.
    """
    names = check_pass_names(names, "compile.passes")
    seq_len = seq_len or model.spec.data.seq_len
    entries = {n: PassEntry(n, enabled=n in names, graph=p.graph) for n, p in PASSES.items()}
    for i, name in enumerate(names):
        entries[name].skipped = _prerequisite_missing(name, names[:i])
    graphs = [(index + 1, "block", layer) for index, layer in enumerate(model.layers)]
    if any(PASSES[n].graph == "head" for n in names):
        graphs.append((None, "head", model.head))
    for layer_number, graph, gm in graphs:
        if graph == "block":
            propagate(gm, *block_example_inputs(model, layer_number - 1, batch, seq_len))
        for result in run_passes(gm, names, graph):
            e = entries[result.name]
            e.matches += result.matches
            e.nodes_removed += result.removed
            e.nodes_added += result.added
            if result.matches and layer_number is not None:
                e.layers.append(layer_number)
            for reason in result.declined + ([result.absent] if result.absent else []):
                e.reasons.setdefault(reason, []).extend([layer_number] if layer_number is not None else [])
    return PassReport(order=list(names), entries=entries, n_layers=len(model.layers))
