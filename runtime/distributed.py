"""Data and expert parallelism on PyTorch's own engine: torchrun's environment, a DeviceMesh, DDP or FSDP2.

Launch (one process per GPU; ``grapefx train SPEC --nproc N`` runs the same torchrun command)::

    torchrun --nproc-per-node N -m runtime.cli train SPEC [--out RUN] [--set ...]

Each process joins the job from torchrun's environment (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``,
``MASTER_ADDR``/``MASTER_PORT``) with ``process_group()``: NCCL with one GPU per local rank on
CUDA, gloo on CPU. It yields this rank's ``World`` (rank, size, a SUM ``all_reduce``, a
``barrier``) and device, and destroys the group at exit. The trainer does the rest:

- data: rank r of W reads the r-th disjoint slice of every global batch (``runtime.data.Sampler``);
  global_batch = micro_batch x accumulation x W, so the batches of a step, and the loss curve,
  do not depend on W;
- the model (``Parallel``, with ``spec.parallel``; nothing with one rank):
    ddp    ``DistributedDataParallel``: gradients averaged over ranks after the last micro-batch
           of a step (``no_sync`` on the others); buffers are not broadcast (the expert biases
           are updated identically on every rank from all-reduced counts, the rest are constants)
    fsdp   FSDP2 ``fully_shard`` on every block (``model.layers[i]``), the embedding and the
           head, then on the root (tied embeddings: embedding and head stay in the root's group,
           since the head reads the embedding's weight outside the embedding's forward).
           Parameters and gradients are DTensors sharded over ranks; gradients are
           reduce-scattered after every micro-batch (sharded accumulation keeps FSDP's memory
           saving). No mixed-precision policy: shards are fp32 masters, the graphs cast as on one
           GPU. Each block's all-gather is prefetched one block ahead (forward and backward); the
           last block stays gathered after the forward. Applied before compiling
           (``build_model(shard=...)``); the compiled block runners run inside each block's FSDP
           hooks (``compiler.pipeline.through_fsdp_hooks``).
    expert ``parallel.expert`` E > 1: a (W/E, E) mesh ("data", "expert"); rank e of an expert
           group holds experts [e*X/E, (e+1)*X/E) (the lowering slices them), tokens travel to
           them through ``grapefx::expert_dispatch`` / ``expert_combine`` (all-to-all over the
           "expert" dimension); those parameters stay outside DDP / FSDP2 and their gradients
           are summed over the "data" dimension (``Parallel.reduce_expert_grads``); checkpoints
           see them as DTensor slices of the whole stacks, so any E resumes any other.
- loss: both wrappers average gradients over ranks, so micro-batch m of rank r with n_rm target
  tokens is back-propagated with weight ``W * n_rm / N``, N the step's target tokens summed over
  all ranks: the average is then ``sum_rm n_rm / N * grad(loss_rm)``, the gradient of the
  token-weighted mean over the global batch, exactly one process's (``Trainer``).
"""

from __future__ import annotations

import contextlib
import inspect
import os
from typing import Iterator

import torch
import torch.distributed as dist
from torch import nn

from compiler import ExpertGroup
from runtime.world import World
from spec.errors import GrapefxError, SpecError
from spec.schema import Parallel as ParallelSpec

__all__ = ["launched_by_torchrun", "process_group", "Parallel", "check_expert_split", "grad_norm", "is_expert"]

TORCHRUN_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


def launched_by_torchrun() -> bool:
    """True in a process that torchrun started (its rendezvous variables are set)."""
    return all(k in os.environ for k in TORCHRUN_ENV)


def _all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def _barrier() -> None:
    dist.barrier()


@contextlib.contextmanager
def process_group(device_type: str | None = None) -> Iterator[tuple[World, torch.device]]:
    """Join the torchrun job; yield ``(World, device)``; leave the group at exit.

    CUDA (the default where there is a GPU): backend NCCL and device ``cuda:LOCAL_RANK``, one GPU
    per process. CPU (``device_type="cpu"`` or no GPU): gloo.
    """
    missing = [k for k in TORCHRUN_ENV if k not in os.environ]
    if missing:
        raise GrapefxError(f"distributed training needs torchrun's environment ({', '.join(missing)} not set); "
                           "launch with `torchrun --nproc-per-node N -m runtime.cli train SPEC` "
                           "or `grapefx train SPEC --nproc N`")
    local_rank = int(os.environ["LOCAL_RANK"])
    if (device_type or ("cuda" if torch.cuda.is_available() else "cpu")) == "cuda":
        if local_rank >= torch.cuda.device_count():
            raise GrapefxError(f"LOCAL_RANK {local_rank} has no GPU: this node has {torch.cuda.device_count()}; "
                               "start at most that many processes per node (--nproc-per-node)")
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", device_id=device)
    else:
        device = torch.device("cpu")
        dist.init_process_group("gloo")
    try:
        yield World(dist.get_rank(), dist.get_world_size(), all_reduce=_all_reduce_sum, barrier=_barrier), device
    finally:
        dist.destroy_process_group()


EXPERT_WEIGHTS = ".moe.experts."    # state-dict keys of the routed experts' weights contain this


def is_expert(name: str) -> bool:
    """Whether parameter ``name`` (a state-dict key) is a routed expert's weight stack."""
    return EXPERT_WEIGHTS in f".{name}"


def check_expert_split(expert: int, ranks: int, file: str | None = None) -> None:
    """Refuse ``parallel.expert`` E that does not divide the job's ``ranks`` (before anything starts);
    ``file``: the spec file to name in the message."""
    if ranks % expert:
        rule = (f"{expert} does not divide the {ranks} process{'es' if ranks > 1 else ''} of this run: the experts "
                f"are split over groups of E ranks, and the W / E groups are data-parallel replicas; launch a "
                f"multiple of {expert} processes (--nproc) or lower parallel.expert")
        raise SpecError(file, "parallel.expert", rule) if file else GrapefxError(f"parallel.expert: {rule}")


class Parallel:
    """How the model is spread over the ranks of ``world`` (``spec.parallel``): data x expert.

    The mesh is (D, E) with dimension names ("data", "expert"), D = W / E, rank = d * E + e: an
    expert group is E consecutive ranks (one machine's GPUs first). ``expert_group`` is what the
    lowering needs (``compiler.lower.ffn.ExpertGroup``: the expert dimension's process group and
    rank e). Non-expert parameters: DDP or FSDP2 over all W ranks (``shard``, ``ddp``); expert
    parameters: each rank holds its group's X/E experts, replicated over the D ranks that hold
    the same ones, outside DDP / FSDP2 (DDP ignores them, FSDP2 is given them as
    ``ignored_params``); ``reduce_expert_grads`` sums their gradients over the data dimension
    and divides by W, as the wrappers do for the rest (see the module docstring's loss weights).
    """

    def __init__(self, parallel: ParallelSpec, world: World, device: torch.device):
        E = parallel.expert
        check_expert_split(E, world.size)
        self.kind = parallel.data if world.size > 1 else None
        self.world, self.device, self.expert = world, device, E
        self.mesh = self.data_group = None
        self.expert_group: ExpertGroup | None = None          # what the lowering splits the experts by
        if E > 1:
            from torch.distributed.device_mesh import init_device_mesh

            self.mesh = init_device_mesh(device.type, (world.size // E, E), mesh_dim_names=("data", "expert"))
            group = self.mesh.get_group("expert")
            self.expert_group = ExpertGroup(group.group_name, dist.get_rank(group))
            self.data_group = self.mesh.get_group("data") if world.size > E else None

    def experts_of(self, model: nn.Module) -> list[tuple[str, nn.Parameter]]:
        """The routed experts' parameters when they are split over ranks (empty otherwise)."""
        return [(n, p) for n, p in model.named_parameters() if is_expert(n)] if self.expert > 1 else []

    def shard(self, model: nn.Module) -> None:
        """FSDP2: ``fully_shard`` each block, the embedding and the head (untied), then the root.

        Each block is all-gathered when the one before it starts (forward) or the one after it
        (backward): explicit prefetch, one block ahead, so the gather overlaps compute. The last
        block stays gathered after the forward: the backward starts with it.
        """
        if self.kind != "fsdp":
            return
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh(self.device.type, (self.world.size,))
        ignored = {p for _, p in self.experts_of(model)}
        layers, last = list(model.layers), len(model.layers) - 1
        for i, layer in enumerate(layers):
            fully_shard(layer, mesh=mesh, reshard_after_forward=i < last, ignored_params=ignored or None)
        for a, b in zip(layers, layers[1:]):
            a.set_modules_to_forward_prefetch([b])
            b.set_modules_to_backward_prefetch([a])
        if not model.spec.model.tied_embeddings:
            fully_shard(model.embed, mesh=mesh)
            fully_shard(model.head, mesh=mesh, reshard_after_forward=False)
        fully_shard(model, mesh=mesh, ignored_params=ignored or None)

    def ddp(self, model: nn.Module) -> nn.Module | None:
        if self.kind != "ddp":
            return None
        import torch._dynamo
        from torch.nn.parallel import DistributedDataParallel

        # Dynamo's DDPOptimizer would split every graph compiled inside DDP's forward at gradient
        # bucket boundaries (for overlap when a whole model is one graph); the blocks are compiled
        # one by one, so their gradients already arrive block by block: keep each graph whole (and
        # the same graph as on one GPU, so the compile cache is shared)
        torch._dynamo.config.optimize_ddp = False
        ids = [self.device.index] if self.device.type == "cuda" else None
        # no buffer broadcast before each forward (torch 2.13 renamed the switch; 2.11 has the old name)
        no_sync_buffers = ({"forward_sync_buffers": False}
                           if "forward_sync_buffers" in inspect.signature(DistributedDataParallel).parameters
                           else {"broadcast_buffers": False})
        experts = [n for n, _ in self.experts_of(model)]
        if experts:        # reduced over the data dimension only, by reduce_expert_grads
            DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, experts)
        return DistributedDataParallel(model, device_ids=ids, **no_sync_buffers)

    @staticmethod
    def micro_batch(ddp: nn.Module | None, last: bool) -> contextlib.AbstractContextManager:
        """Context for one micro-batch's forward and backward: DDP skips the all-reduce but on the last."""
        return ddp.no_sync() if ddp is not None and not last else contextlib.nullcontext()

    def reduce_expert_grads(self, model: nn.Module) -> None:
        """After a step's backward: expert gradients summed over the data dimension, divided by W.

        Rank (d, e)'s gradient of expert j sums the terms of the tokens of the E ranks of replica d
        (the exchanges brought them there), each weighted W * n / N like every loss term; the sum
        over the D replicas, / W, is the one-process gradient.
        """
        grads = [p.grad for _, p in self.experts_of(model) if p.grad is not None]
        if not grads:
            return
        if self.data_group is not None:
            flat = torch.cat([g.reshape(-1) for g in grads])
            dist.all_reduce(flat, group=self.data_group)
            for g, part in zip(grads, flat.split([g.numel() for g in grads])):
                g.copy_(part.view_as(g))
        torch._foreach_div_(grads, float(self.world.size))

    def grad_norm(self, model: nn.Module) -> torch.Tensor:
        """The global L2 norm of all gradients: the wrapped parameters' (``grad_norm``) and the experts',
        whose squares are summed over the expert dimension (each group of E ranks holds every expert once)."""
        experts = {id(p) for _, p in self.experts_of(model)}
        rest = grad_norm([p for p in model.parameters() if id(p) not in experts])
        if not experts:
            return rest
        own = torch.nn.utils.get_total_norm([p.grad for _, p in self.experts_of(model) if p.grad is not None])
        squares = own.to(torch.float32).square().reshape(1)
        dist.all_reduce(squares, group=self.mesh.get_group("expert"))
        return (rest.to(torch.float32).square() + squares[0]).sqrt()

    def clip(self, model: nn.Module, max_norm: float, norm: torch.Tensor) -> None:
        """Scale every gradient by min(1, max_norm / norm); the experts' (plain tensors) apart from
        FSDP2's DTensors, which one foreach call cannot mix."""
        experts = {id(p) for _, p in self.experts_of(model)}
        for group in ([p for p in model.parameters() if id(p) not in experts],
                      [p for p in model.parameters() if id(p) in experts]):
            if group:
                torch.nn.utils.clip_grads_with_norm_(group, max_norm, norm)

    def checkpoint_view(self, tensors: dict) -> dict:
        """``tensors`` (model and optimizer state by parameter name) with each split expert tensor
        (X/E, ...) seen as the whole (X, ...) DTensor it is a slice of, placed [Replicate over
        data, Shard(0) over expert]: DCP then saves and loads any E's slices (``local_view``)."""
        if self.expert == 1:
            return tensors
        from torch.distributed.tensor import DTensor, Replicate, Shard

        def whole(name: str, t):
            if not (is_expert(name) and isinstance(t, torch.Tensor) and t.dim() > 0):
                return t
            shape = (t.shape[0] * self.expert,) + tuple(t.shape[1:])
            return DTensor.from_local(t, self.mesh, [Replicate(), Shard(0)], run_check=False, shape=shape,
                                      stride=torch.empty(shape, device="meta").stride())

        model = {k: whole(k, v) for k, v in tensors["model"].items()}
        optim = {k: {s: whole(k, v) for s, v in state.items()} for k, state in tensors["optimizer"].items()}
        return {**tensors, "model": model, "optimizer": optim}

    def local_view(self, tensors: dict) -> dict:
        """The inverse of ``checkpoint_view`` after a load: each expert DTensor back to this rank's slice."""
        if self.expert == 1:
            return tensors
        from torch.distributed.tensor import DTensor

        def local(name: str, t):
            return t.to_local() if is_expert(name) and isinstance(t, DTensor) else t

        return {**tensors, "model": {k: local(k, v) for k, v in tensors["model"].items()},
                "optimizer": {k: {s: local(k, v) for s, v in st.items()} for k, st in tensors["optimizer"].items()}}


def grad_norm(parameters: Iterator[nn.Parameter] | list[nn.Parameter]) -> torch.Tensor:
    """The global L2 norm of the gradients, a plain tensor on every rank.

    DDP: every rank holds the averaged gradients, the local norm is the global one. FSDP2: the
    gradients are DTensor shards; ``get_total_norm`` returns a DTensor whose ``full_tensor()``
    reduces the shards' contributions (torchtitan's recipe; checked on 2.13 by the CPU tests and
    run on 2.11 by the two-GPU runs of bench/RESULTS.md). ``clip_grads_with_norm_`` then scales the shards by the
    plain scalar.
    """
    norm = torch.nn.utils.get_total_norm([p.grad for p in parameters if p.grad is not None])
    if dist.is_available() and dist.is_initialized():
        from torch.distributed.tensor import DTensor

        if isinstance(norm, DTensor):
            norm = norm.full_tensor()
    return norm
