"""How a spec becomes fast code: lowering, the op vocabulary, fusion passes, Inductor.

The public API (what ``runtime`` imports; the modules behind it may move):

    model = lower(spec, dtype="fp32")                      # GrapeModel: one fx graph per layer
    report = apply_passes(model, ["attention_formation"])  # block passes by name, in place
    PASSES                                                 # the pass registry: name -> Pass
    model, build = build_model(spec, device)               # lower + passes + compile, as training runs it
    tagged(model.layers[0])["attention.q"]                 # a node by its role in the lowering
    window.blocked(i_minus_j, W)                           # the window rule (query i, key j)
    alibi_slopes(H)                                        # GRAPE-A's per-head slopes (the HF export writes them)
    write_dumps(...)                                       # lowered and fused graph dumps, pass report

Roles (``tagged``) are how code outside the compiler finds nodes: the lowering tags them
(``compiler/lower/builder.py`` lists the roles), so node names stay free for reading.

Importing any part of the compiler registers the Triton kernels with the ops (on CUDA, where triton
is installed; nothing elsewhere): the one place ``compiler.kernels`` is brought in, so the ops
themselves never import their kernels.
"""

import compiler.kernels.register  # noqa: F401  (the kernels register themselves with compiler.ops)

from compiler import window
from compiler.dump import write_dumps, write_inductor_index
from compiler.lower import GrapeModel, ModelOutput, graph_kind, lower
from compiler.lower.ffn import ExpertGroup
from compiler.lower.builder import tagged
from compiler.lower.tpa import TPA_CONTRACTION
from compiler.ops.alibi import alibi_slopes
from compiler.passes import PASSES, PassReport, apply_passes, check_pass_names
from compiler.pipeline import BuildReport, build_model, compute_dtype, warm_up

__all__ = ["GrapeModel", "ModelOutput", "ExpertGroup", "graph_kind", "lower", "tagged", "TPA_CONTRACTION", "alibi_slopes", "PASSES", "PassReport",
           "apply_passes", "check_pass_names", "BuildReport", "build_model", "compute_dtype", "warm_up", "window",
           "write_dumps", "write_inductor_index"]
