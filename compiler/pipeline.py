"""spec -> a model ready to train: lower, fuse, move, compile.

    model, report = build_model(spec, device)               # compile: spec.compile.enabled
    model, report = build_model(spec, device, compile=False, passes=[])   # the unfused eager graphs

1. ``lower`` with the compute dtype of the device (``precision.compute`` on CUDA,
   ``precision.cpu_compute`` on CPU); master weights fp32.
2. The fusion passes (``compile.passes`` or ``passes=``, ``compiler.passes.PASSES``) on every block
   graph and on the head graph, before Dynamo sees them.
3. ``model.to(device)``.
4. When compiling: ``torch.compile`` (Inductor, ``fullgraph=True``, ``dynamic=False``) ONCE per
   distinct block graph, so compile time grows with the number of distinct graphs, not with depth.
5. With ``compile.activation_checkpointing``: a non-reentrant ``torch.utils.checkpoint`` around
   each block runner (activations are recomputed in backward; outputs of the recompute, such as
   expert counts, are discarded by autograd).

How identical blocks share one compiled artifact. The block graphs of one kind are structurally
identical but are separate ``GraphModule``s: their node names differ (``layer1_...``,
``layer5_...``) and each has its own generated ``forward`` code object, so Dynamo, which caches
per code object, would trace and compile every layer. Instead, per distinct graph (``structure_key``)
the pipeline lifts the representative block's parameters and buffers into inputs (``lift_state``):
a stateless ``GraphModule`` ``f(state..., inputs...)``, compiled once. Each layer gets a runner
(``model.runners[i]``) that calls it with THAT layer's own tensors, read from the layer module at
every call. Parameters stay where they were: state-dict keys, the optimizer, the expert-bias
updates and per-block FSDP wrapping see the same modules as in eager mode.

Alternatives tried (torch 2.13, CPU): ``torch.func.functional_call(representative, layer_state,
inputs)`` compiled once gave correct forward values but NO gradients to the parameters of any
layer but the representative; compiling each layer module retraces per layer (one Dynamo frame and
one AOT/Inductor compile per layer, the FX graph cache only saving the codegen). Lifting state into
inputs needs nothing from Dynamo beyond plain tensor inputs, so it behaves the same on 2.11 and 2.13.

The head graph (final norm -> LM head -> cross-entropy) is compiled the same way. The embedding is
one gather and stays eager: nothing to fuse there.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch
from torch import fx, nn
from torch.utils.checkpoint import checkpoint

from compiler.code_version import tag_compile_caches
from compiler.compute_weights import ComputeWeights, cast_weight_inputs
from compiler.lower import GrapeModel, lower
from compiler.lower.ffn import ExpertGroup
from compiler.passes import PassReport, apply_passes, layers_text
from spec.schema import Spec

__all__ = ["build_model", "BuildReport", "BlockGroup", "compute_dtype", "structure_key", "block_groups",
           "lift_state", "StateRunner", "through_fsdp_hooks", "compile_model", "cast_weights_once", "checkpoint_blocks", "warm_up"]


def compute_dtype(spec: Spec, device: torch.device | str) -> str:
    """``precision.compute`` on CUDA, ``precision.cpu_compute`` elsewhere (MATH.md §6)."""
    return spec.precision.compute if torch.device(device).type == "cuda" else spec.precision.cpu_compute


# ----------------------------------------------------------------------------- which blocks are alike
def structure_key(gm: fx.GraphModule) -> tuple:
    """The graph's structure without node names: ops, targets, constants, which node feeds which,
    and the parameter / buffer qualnames. Two blocks with equal keys compute the same function of
    (their own state, their inputs)."""
    index = {node: i for i, node in enumerate(gm.graph.nodes)}

    def canon(a: Any) -> Any:
        return fx.node.map_aggregate(a, lambda x: ("node", index[x]) if isinstance(x, fx.Node) else
                                     (x if isinstance(x, (int, float, bool, str, type(None))) else repr(x)))

    return tuple((n.op, n.target if isinstance(n.target, str) else fx.node._get_qualified_name(n.target),
                  canon(n.args), canon(tuple(sorted(n.kwargs.items())))) for n in gm.graph.nodes)


@dataclass
class BlockGroup:
    """Layers that run one block graph: ``label`` (the lowering's graph kind, e.g. ``local/moe``),
    ``layers`` 0-based (``layers[0]`` is the representative)."""
    label: str
    layers: list[int]

    @property
    def layers_1based(self) -> list[int]:
        return [i + 1 for i in self.layers]


def block_groups(model: GrapeModel) -> list[BlockGroup]:
    """The distinct block graphs of ``model`` in first-use order, with the layers running each."""
    groups: dict[tuple, BlockGroup] = {}
    for i, layer in enumerate(model.layers):
        key = structure_key(layer)
        if key not in groups:
            label = model.graph_kinds[i]
            taken = sum(g.label.split("#")[0] == label for g in groups.values())
            groups[key] = BlockGroup(label if not taken else f"{label}#{taken + 1}", [])
        groups[key].layers.append(i)
    return list(groups.values())


# ----------------------------------------------------------------------------- one compile per graph
def lift_state(gm: fx.GraphModule) -> tuple[fx.GraphModule, list[str]]:
    """``gm`` as a stateless graph ``f(*state, *inputs)``: each ``get_attr`` becomes a leading input.

    Returns the stateless module and the qualnames of the state in input order.
    """
    g = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    state: dict[str, fx.Node] = {}                   # qualname -> its input (one per tensor)
    for node in gm.graph.nodes:
        if node.op == "get_attr":
            if node.target not in state:
                state[node.target] = g.placeholder(node.target.replace(".", "_"))
            env[node] = state[node.target]
    for node in gm.graph.nodes:
        if node.op == "placeholder":
            env[node] = g.node_copy(node, lambda a: env[a])
    for node in gm.graph.nodes:
        if node.op not in ("get_attr", "placeholder"):
            env[node] = g.node_copy(node, lambda a: env[a])
    g.lint()
    return fx.GraphModule(nn.Module(), g, class_name=f"{type(gm).__name__}Stateless"), list(state)


class StateRunner:
    """Runs a shared (compiled) stateless graph with one module's own parameters and buffers.

    The tensors are looked up on the module at every call (``owner._parameters`` /
    ``owner._buffers``), so whatever replaced them since (``.to()``, ``load_state_dict(assign=True)``,
    FSDP's unsharded parameters) is what runs.
    """

    def __init__(self, module: nn.Module, names: Sequence[str], fn: Callable):
        self.module, self.names, self.fn = module, list(names), fn
        self._slots = []
        for name in self.names:
            owner_path, _, leaf = name.rpartition(".")
            self._slots.append((module.get_submodule(owner_path) if owner_path else module, leaf))
        self.substitutes: dict[int, torch.Tensor] = {}     # input position -> passed instead (ComputeWeights)

    def state(self) -> list[torch.Tensor]:
        return [self.substitutes[i] if i in self.substitutes
                else owner._parameters[leaf] if leaf in owner._parameters else owner._buffers[leaf]
                for i, (owner, leaf) in enumerate(self._slots)]

    def substitute(self, positions: Sequence[int], weights: ComputeWeights) -> None:
        """Pass the compute-dtype copies of the parameters at ``positions`` instead of the parameters."""
        for i in positions:
            self.substitutes[i] = weights.copy_of(*self._slots[i])

    def __call__(self, *inputs):
        return self.fn(*self.state(), *inputs)


@dataclass
class CompiledGraph:
    """One compiled stateless graph and the modules (layers or the head) that run it."""
    label: str
    stateless: fx.GraphModule
    names: list[str]
    fn: Callable
    layers: list[int] = field(default_factory=list)     # 0-based; empty for the head


def _compile(gm: fx.GraphModule, options: dict | None) -> Callable:
    return torch.compile(gm.forward, backend="inductor", fullgraph=True, dynamic=False, options=options or None)


def compile_model(model: GrapeModel, *, options: dict | None = None, head: bool = True) -> list[CompiledGraph]:
    """Compile each distinct block graph of ``model`` once (and the head) and install the runners.

    ``options``: ``torch._inductor.config`` patches (the spec's ``compile.inductor_options``).
    Compilation itself happens on the first call (Dynamo is lazy); the compile caches' keys carry this
    compiler's source fingerprint (``compiler.code_version``), so a changed grapefx never reuses code
    compiled from another version.
    """
    tag_compile_caches()
    compiled = []
    for group in block_groups(model):
        stateless, names = lift_state(model.layers[group.layers[0]])
        fn = _compile(stateless, options)
        for i in group.layers:
            model.runners[i] = through_fsdp_hooks(model.layers[i], StateRunner(model.layers[i], names, fn))
        compiled.append(CompiledGraph(group.label, stateless, names, fn, list(group.layers)))
    if head:
        stateless, names = lift_state(model.head)
        fn = _compile(stateless, options)
        model.head_runner = through_fsdp_hooks(model.head, StateRunner(model.head, names, fn))
        compiled.append(CompiledGraph("head", stateless, names, fn))
    model.compiled_graphs = compiled
    return compiled


def through_fsdp_hooks(module: nn.Module, runner: StateRunner) -> Callable:
    """``runner``, made to run inside ``module``'s FSDP2 forward hooks when ``module`` is ``fully_shard``-ed.

    A runner calls the shared compiled graph with the module's tensors without calling the module,
    so FSDP2's hooks (all-gather the parameter shards before, free them after, and the backward
    hooks registered there) would not run: the graph would see the shards.
    ``register_fsdp_forward_method`` runs those hooks around ``module.compiled_forward`` as they run
    around ``forward``; the runner reads the unsharded parameters FSDP2 installs on the module.
    Any other module: the runner itself.
    """
    if not torch.distributed.is_available():
        return runner
    from torch.distributed.fsdp import FSDPModule, register_fsdp_forward_method
    if not isinstance(module, FSDPModule):
        return runner
    module.compiled_forward = runner
    register_fsdp_forward_method(module, "compiled_forward")
    return module.compiled_forward


def cast_weights_once(model: GrapeModel) -> ComputeWeights | None:
    """Run every block and the head with compute-dtype copies of the weights they only cast, re-cast
    when a weight changes instead of in every forward (``compiler.compute_weights``); eager blocks get a
    runner over their lifted graph. None (and nothing changed) when the compute dtype is fp32.
    One process only (the gradients reach the masters through hooks, not through autograd)."""
    if model.compute_dtype == torch.float32:
        return None
    weights = ComputeWeights(model.compute_dtype)
    for i, layer in enumerate(model.layers):
        model.runners[i] = _with_copies(layer, model.runners[i], weights)
    model.head_runner = _with_copies(model.head, model.head_runner or model.head, weights)
    model.compute_weights = weights
    return weights


def _with_copies(module: nn.Module, runner: Callable, weights: ComputeWeights) -> StateRunner:
    stateless, names = lift_state(module)
    if runner is module:                                  # eager: run the lifted graph itself
        runner = StateRunner(module, names, stateless.forward)
    if not isinstance(runner, StateRunner):
        raise TypeError(f"cast_weights_once: a {type(runner).__name__} runner (FSDP2 or checkpointed) cannot take "
                        "weight copies; call it before checkpoint_blocks, in one process")
    runner.substitute(cast_weight_inputs(stateless, names, module, weights.compute), weights)
    return runner


class _Checkpointed:
    """A block runner whose activations are recomputed in backward (non-reentrant checkpoint)."""

    def __init__(self, run: Callable):
        self.run = run

    def __call__(self, *inputs):
        # the graphs draw no random numbers: no RNG state to stash and restore
        return checkpoint(self.run, *inputs, use_reentrant=False, preserve_rng_state=False)


def checkpoint_blocks(model: GrapeModel) -> None:
    """Wrap every block runner (compiled or eager) in activation checkpointing."""
    model.runners = [_Checkpointed(run) for run in model.runners]


# ----------------------------------------------------------------------------- the whole build
@dataclass
class BuildReport:
    """What ``build_model`` did: the pass report, the distinct block graphs, whether it compiled."""
    passes: PassReport
    groups: list[BlockGroup]
    compiled: bool
    device: str
    compute_dtype: str
    activation_checkpointing: bool
    lowered: list[fx.GraphModule] | None = None      # the unfused block graphs (``keep_lowered=True``)
    lowered_groups: list[BlockGroup] | None = None

    def passes_dict(self) -> dict:
        """``passes.json``: each pass's ``{"graph", "matches", "layers", ...}``."""
        return self.passes.as_dict()

    def summary_lines(self) -> list[str]:
        lines = [f"{len(self.groups)} distinct block graph{'s' if len(self.groups) != 1 else ''}"
                 f"{' (each compiled once, plus the head)' if self.compiled else ''}:"]
        for g in self.groups:
            lines.append(f"  {g.label:<14} {layers_text(g.layers_1based)}")
        return lines


def build_model(spec: Spec, device: torch.device | str, *, compile: bool | None = None,
                passes: Sequence[str] | None = None, keep_lowered: bool = False,
                shard: Callable[[GrapeModel], None] | None = None,
                compute: str | None = None,
                experts: ExpertGroup | None = None,
                cast_once: bool = False) -> tuple[GrapeModel, BuildReport]:
    """The model of ``spec`` on ``device``, fused and (by default) compiled; and what was done.

    ``compile``: None follows ``spec.compile.enabled``. ``passes``: None follows
    ``spec.compile.passes``; ``[]`` runs the unfused graphs. ``keep_lowered``: also return the
    block graphs as lowered (before the passes; they share the model's parameters) for dumps.
    ``shard``: applied to the model on ``device`` before compiling (FSDP2 ``fully_shard`` per block,
    ``runtime.distributed``): blocks are compiled after wrapping, as PyTorch recommends.
    ``compute``: the compute dtype ("fp32" / "bf16"); None: ``device``'s (``compute_dtype``). A build
    on the ``meta`` device (graphs and shapes, no weights: dumps) passes the training device's.
    ``experts``: this process's expert group under expert parallelism (``compiler.lower.ffn``);
    None: every expert in this process.
    ``cast_once``: cast the weights to the compute dtype when they change, not in every forward
    (``cast_weights_once``; one process, several micro-batches per optimizer step).
    """
    device = torch.device(device)
    cd = compute or compute_dtype(spec, device)
    model = lower(spec, dtype=cd, experts=experts)
    lowered = None
    if keep_lowered:
        lowered = [fx.GraphModule(layer, copy.deepcopy(layer.graph), class_name=type(layer).__name__)
                   for layer in model.layers]
    lowered_groups = block_groups(model) if keep_lowered else None
    selected = list(spec.compile.passes if passes is None else passes)
    report = apply_passes(model, selected)
    model.to(device)
    for gm in lowered or []:          # model.to replaced its buffers (on meta its parameters too): the copies follow
        gm.to(device)
    if shard is not None:
        shard(model)
    compile = spec.compile.enabled if compile is None else compile
    if compile:
        compile_model(model, options=dict(spec.compile.inductor_options))
    if cast_once:
        cast_weights_once(model)
    if spec.compile.activation_checkpointing:
        checkpoint_blocks(model)
    return model, BuildReport(passes=report, groups=block_groups(model), compiled=compile, device=str(device),
                              compute_dtype=cd, activation_checkpointing=spec.compile.activation_checkpointing,
                              lowered=lowered, lowered_groups=lowered_groups)


def warm_up(model: GrapeModel, batch: int, seq_len: int, device: torch.device | str) -> float:
    """Seconds for one forward + backward on a random batch: the compile, when the model is compiled
    and this is its first call at these shapes. Gradients are cleared afterwards."""
    device = torch.device(device)
    g = torch.Generator().manual_seed(0)
    V = model.spec.model.vocab_size
    tokens = torch.randint(0, V, (batch, seq_len), generator=g).to(device)
    targets = torch.randint(0, V, (batch, seq_len), generator=g).to(device)
    start = time.perf_counter()
    model(tokens, targets).loss.backward()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - start
    model.zero_grad(set_to_none=True)
    return seconds
