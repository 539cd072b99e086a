"""Fusion passes: named rewrites of each block graph, run before Dynamo sees it.

| pass                  | file                    | rewrites                                                     | needs                 |
| --------------------- | ----------------------- | ------------------------------------------------------------ | --------------------- |
| ``tpa_rotation_commute`` | tpa_rotation_commute.py | TPA: ``einsum(A, grape_m_rotate(B))`` => ``grape_m_rotate(einsum(A, B))`` (exact) | -                     |
| ``attention_formation`` | attention_formation.py | scores -> mask -> softmax -> values chain => ``grapefx.attention`` (window, causal, GQA, dense bias) | -                     |
| ``bias_softmax``      | bias_softmax.py         | dense ALiBi bias of an attention => in-kernel ``slopes``     | attention_formation   |
| ``rotary_attention``  | rotary_attention.py     | ``grape_m_rotate`` of q and k => in-kernel ``theta``         | attention_formation   |

``tpa_rotation_commute`` is a canonicalisation: TPA layers rotate their B factors before the
contraction, and only once it has moved the rotation after it can ``rotary_attention`` fold it.

Each pass is ``<name>_pass(gm) -> PassResult``: it rewrites one block graph in place (graph
module in, same module out), matching by structure and node metadata, never by node names, and
declining quietly with a reason when a candidate is not exactly its pattern. ``apply_passes``
runs an ordered selection (``compile.passes`` in the spec, ``--passes``/``--no-passes`` on the
command line) on every block and returns a ``PassReport``. A pass whose prerequisite is not
selected before it does nothing, and the report says why.

Every rewrite also bumps ``torch._dynamo.utils.counters["grapefx"][<pass name>]``.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch
from torch import fx

from compiler.passes.attention_formation import attention_formation_pass
from compiler.passes.bias_softmax import bias_softmax_pass
from compiler.passes.match import PassResult, propagate
from compiler.passes.rotary_attention import rotary_attention_pass
from compiler.passes.tpa_rotation_commute import tpa_rotation_commute_pass
from spec.errors import GrapefxError
from spec.schema import PASS_NAMES

__all__ = ["PASSES", "PREREQUISITES", "PassResult", "PassEntry", "PassReport", "apply_passes", "run_passes",
           "check_pass_names", "block_example_inputs", "layers_text"]

# the registry, in the default order (spec.schema.PASS_NAMES is this order)
PASSES: dict[str, Callable[[fx.GraphModule], PassResult]] = {
    "tpa_rotation_commute": tpa_rotation_commute_pass,
    "attention_formation": attention_formation_pass,
    "bias_softmax": bias_softmax_pass,
    "rotary_attention": rotary_attention_pass,
}
PREREQUISITES: dict[str, str] = {"bias_softmax": "attention_formation", "rotary_attention": "attention_formation"}
if tuple(PASSES) != PASS_NAMES:
    raise ImportError("compiler.passes.PASSES and spec.schema.PASS_NAMES must list the same passes in one order")


@dataclass
class PassEntry:
    """One pass over the whole model. Layers are counted from 1."""
    name: str
    enabled: bool
    matches: int = 0
    layers: list[int] = field(default_factory=list)
    nodes_removed: int = 0
    nodes_added: int = 0
    reasons: dict[str, list[int]] = field(default_factory=dict)   # why a candidate / a layer did not match
    skipped: str | None = None                                    # why the pass did not run at all

    def as_dict(self) -> dict:
        return {"matches": self.matches, "layers": self.layers, "enabled": self.enabled, "skipped": self.skipped,
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
        return "; ".join(f"{layers_text(ls)}: {r}" for r, ls in self.reasons.items()) or "no candidate"


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
                lines.append(f"{name}: {e.matches} match{'es' if e.matches != 1 else ''} in {layers_text(e.layers)} "
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


def _prerequisite_missing(name: str, earlier: Sequence[str]) -> str | None:
    need = PREREQUISITES.get(name)
    if need is None or need in earlier:
        return None
    return (f"did nothing: it rewrites the grapefx.attention nodes that {need} makes, and {need} is off "
            f"(or listed after it); turn {need} on before {name}")


def run_passes(gm: fx.GraphModule, names: Sequence[str]) -> list[PassResult]:
    """Run the passes ``names`` in order on one block graph (``meta["val"]`` already propagated)."""
    results = []
    for i, name in enumerate(names):
        if _prerequisite_missing(name, names[:i]) is None:
            results.append(PASSES[name](gm))
    return results


def block_example_inputs(model, index: int, batch: int, seq_len: int) -> list[torch.Tensor]:
    """Meta tensors shaped like layer ``index``'s inputs: x (B, T, C) [, grape_m_log_freq (D/2,)]."""
    C = model.spec.model.d_model
    inputs = [torch.empty(batch, seq_len, C, dtype=model.compute_dtype, device="meta")]
    if model.takes_log_freq[index]:
        inputs.append(torch.empty_like(model.grape_m.log_freq, device="meta"))
    return inputs


def apply_passes(model, names: Sequence[str], *, batch: int = 2, seq_len: int | None = None) -> PassReport:
    """Run the passes ``names`` (in this order) on every block of ``model`` (a ``GrapeModel``), in place.

    Shapes for the safety checks come from fake tensors for a (batch, seq_len) input (default
    seq_len: the spec's ``data.seq_len``); nothing runs, so this is cheap at any size.
    """
    names = check_pass_names(names, "compile.passes")
    seq_len = seq_len or model.spec.data.seq_len
    entries = {n: PassEntry(n, enabled=n in names) for n in PASSES}
    for i, name in enumerate(names):
        entries[name].skipped = _prerequisite_missing(name, names[:i])
    for index, layer in enumerate(model.layers):
        propagate(layer, *block_example_inputs(model, index, batch, seq_len))
        for result in run_passes(layer, names):
            e = entries[result.name]
            e.matches += result.matches
            e.nodes_removed += result.removed
            e.nodes_added += result.added
            if result.matches:
                e.layers.append(index + 1)
            for reason in result.declined + ([result.absent] if result.absent else []):
                e.reasons.setdefault(reason, []).append(index + 1)
    return PassReport(order=list(names), entries=entries, n_layers=len(model.layers))
