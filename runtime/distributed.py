"""Data-parallel training on PyTorch's own engine: torchrun's environment, DDP or FSDP2.

Launch (one process per GPU; ``grapefx train SPEC --nproc N`` runs the same torchrun command)::

    torchrun --nproc-per-node N -m runtime.cli train SPEC [--out RUN] [--set ...]

Each process joins the job from torchrun's environment (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``,
``MASTER_ADDR``/``MASTER_PORT``) with ``process_group()``: NCCL with one GPU per local rank on
CUDA, gloo on CPU. It yields this rank's ``World`` (rank, size, a SUM ``all_reduce``, a
``barrier``) and device, and destroys the group at exit. The trainer does the rest:

- data: rank r of W reads the r-th disjoint slice of every global batch (``runtime.data.Sampler``);
  global_batch = micro_batch x accumulation x W, so the batches of a step, and the loss curve,
  do not depend on W;
- the model (``DataParallel``, with ``spec.parallel.data``; nothing with one rank):
    ddp    ``DistributedDataParallel``: gradients averaged over ranks after the last micro-batch
           of a step (``no_sync`` on the others); buffers are not broadcast (the expert biases
           are updated identically on every rank from all-reduced counts, the rest are constants)
    fsdp   FSDP2 ``fully_shard`` on every block (``model.layers[i]``), the embedding and the
           head, then on the root (tied embeddings: embedding and head stay in the root's group,
           since the head reads the embedding's weight outside the embedding's forward).
           Parameters and gradients are DTensors sharded over ranks; gradients are
           reduce-scattered after every micro-batch (sharded accumulation keeps FSDP's memory
           saving). No mixed-precision policy: shards are fp32 masters, the graphs cast as on one
           GPU. Applied before compiling (``build_model(shard=...)``); the compiled block runners
           run inside each block's FSDP hooks (``compiler.pipeline.through_fsdp_hooks``).
- loss: both wrappers average gradients over ranks, so micro-batch m of rank r with n_rm target
  tokens is back-propagated with weight ``W * n_rm / N``, N the step's target tokens summed over
  all ranks: the average is then ``sum_rm n_rm / N * grad(loss_rm)``, the gradient of the
  token-weighted mean over the global batch, exactly one process's (``Trainer``).
"""

from __future__ import annotations

import contextlib
import inspect
import os
from typing import Iterator, Literal

import torch
import torch.distributed as dist
from torch import nn

from runtime.world import World
from spec.errors import GrapefxError

__all__ = ["launched_by_torchrun", "process_group", "DataParallel", "grad_norm"]

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


class DataParallel:
    """How the model is spread over the ranks of ``world``: not at all (one rank), DDP or FSDP2.

    ``shard(model)`` (FSDP2, in place) runs inside ``build_model`` before compiling; ``ddp(model)``
    returns the DDP wrapper the training forward calls (None without DDP); the model the trainer
    keeps for the optimizer, the balancer, evaluation and state dicts is the unwrapped one.
    """

    def __init__(self, kind: Literal["ddp", "fsdp"], world: World, device: torch.device):
        self.kind = kind if world.size > 1 else None
        self.world, self.device = world, device

    def shard(self, model: nn.Module) -> None:
        """FSDP2: ``fully_shard`` each block, the embedding and the head (untied), then the root."""
        if self.kind != "fsdp":
            return
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh(self.device.type, (self.world.size,))
        last = len(model.layers) - 1
        for i, layer in enumerate(model.layers):
            # the last block runs first in backward: keeping it gathered saves one all-gather
            fully_shard(layer, mesh=mesh, reshard_after_forward=i < last)
        if not model.spec.model.tied_embeddings:
            fully_shard(model.embed, mesh=mesh)
            fully_shard(model.head, mesh=mesh, reshard_after_forward=False)
        fully_shard(model, mesh=mesh)

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
        return DistributedDataParallel(model, device_ids=ids, **no_sync_buffers)

    @staticmethod
    def micro_batch(ddp: nn.Module | None, last: bool) -> contextlib.AbstractContextManager:
        """Context for one micro-batch's forward and backward: DDP skips the all-reduce but on the last."""
        return ddp.no_sync() if ddp is not None and not last else contextlib.nullcontext()


def grad_norm(parameters: Iterator[nn.Parameter] | list[nn.Parameter]) -> torch.Tensor:
    """The global L2 norm of the gradients, a plain tensor on every rank.

    DDP: every rank holds the averaged gradients, the local norm is the global one. FSDP2: the
    gradients are DTensor shards; ``get_total_norm`` returns a DTensor whose ``full_tensor()``
    reduces the shards' contributions (torchtitan's recipe; checked on 2.13 by the CPU tests and
    run on 2.11 by bench/run_multi_gpu.sh). ``clip_grads_with_norm_`` then scales the shards by the
    plain scalar.
    """
    norm = torch.nn.utils.get_total_norm([p.grad for p in parameters if p.grad is not None])
    if dist.is_available() and dist.is_initialized():
        from torch.distributed.tensor import DTensor

        if isinstance(norm, DTensor):
            norm = norm.full_tensor()
    return norm
