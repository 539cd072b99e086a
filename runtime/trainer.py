"""The training loop: one spec, one run folder, steps until ``train.steps``.

One optimizer step n (from 1):

    batches  = the next global_batch / (micro_batch * ranks) micro-batches of the sampler
    for each micro-batch m:   out = model(x_m, y_m);  (out.loss * W * n_m / N).backward()
                              balancer.add(out.counts)                       (training counts only)
        n_m = target tokens of micro-batch m, N = sum over the step's micro-batches of all W
        ranks; DDP / FSDP2 average the gradients over ranks (hence the W): the step's loss is the
        token-weighted mean, as if the global batch were one forward in one process
    grad_norm = global L2 norm (reported before clipping); clip to train.grad_clip
    logged loss, grad norm and MaxVio are global (summed over ranks); metrics from rank 0 only
    optimizer.step(); scheduler.step(); balancer.step(n)  -> b += rate * sign(mean(c) - c)
    every log_every: a metrics line; every eval_every: validation loss and MaxVio on fixed
    batches; every checkpoint_every and at the end: a checkpoint

No step waits for the GPU: the loss sums and the gradient norm stay on the device, and the host
reads them (one transfer for all the steps since the last read) only where it needs them: a
metrics line, an evaluation, a checkpoint, the end of the run. Batches go through pinned memory
(asynchronous copies), and with one rank the token total is counted on the host. So the host
queues step n + 1 while the GPU runs step n, as ``grapefx bench`` does. The stop on a loss or
gradient norm that is not finite stays exact: at each read every step's values are checked in
order, the first bad step is named (exit code 3), and no checkpoint holds it or any step after it.

Exact resume: everything the next step reads is in the checkpoint (parameters, expert biases,
AdamW moments and step, scheduler, sampler position, RNG states), so on CPU eager, N steps +
resume + N steps give bitwise the losses of 2N steps (tests/runtime/test_trainer.py).

Ctrl-C finishes the current step, saves a checkpoint and exits (a second Ctrl-C exits at once).
With several ranks, every rank stops after the same step: the ranks agree on it after each step.

Several micro-batches in one process (``compiler.compute_weights``): the weights the graphs only use
in bf16 are cast once per optimizer step instead of in every forward, and each micro-batch's bf16
gradient is added into the fp32 ``.grad`` in one pass: bit for bit the gradients autograd would
accumulate, with about half the memory traffic per micro-batch.

Distributed (``runtime.distributed``): ``world`` places this process among the ranks,
``spec.parallel`` picks DDP or FSDP2 and the expert parallelism E; the model is lowered with this
rank's experts and wrapped before compiling.

CUDA graphs (``compile.inductor_options: {triton.cudagraphs: true}``): every forward starts a new
graph step (``torch.compiler.cudagraph_mark_step_begin``), and what the loop keeps of a forward's
outputs (loss sums, expert counts) is copied out before the next forward replays over them. So are
the gradients after the first of several accumulated micro-batches: a parameter's first gradient
IS the backward graph's output memory, which the next micro-batch's replay would overwrite before
it is added to. Once moved, later micro-batches add into it in place (autograd accumulates into an
existing ``.grad``), so one copy per step serves any number of micro-batches. (The gradients of the
weights with a bf16 copy are made outside graph memory, by the copies' hooks: they are not moved.)
Verified for one process without activation checkpointing; elsewhere ``runtime.build.cuda_graphs``
turns them off for the run and the log says why.
"""

from __future__ import annotations

import contextlib
import math
import signal
import threading
import time
from pathlib import Path
from typing import Iterator, Sequence

import torch
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

from runtime.balance import ExpertBalancer
from runtime.build import build_model, cuda_graphs
from runtime.checkpoint import Checkpointer
from runtime.console import device_text, rough_duration, start_summary
from runtime.data import Sampler, prepare
from runtime.device import cpu_matmul_flops, device_peak, memory_gib, pick_device
from runtime.distributed import Parallel
from runtime.metrics import MetricsLogger, plot_loss
from runtime.optim import build_optimizer, build_scheduler, clip_gradients, lr_factor
from runtime.resume import resume_note, spec_changes
from runtime.rng import rng_state, seed_all, set_rng_state
from runtime.run_folder import record_run
from runtime.world import World
from spec import dump_spec
from spec.derive import flops_per_token
from spec.errors import GrapefxError
from spec.report import human
from spec.schema import Spec

__all__ = ["Trainer", "NonFiniteLoss", "INTERRUPTED"]

INTERRUPTED = 130  # exit status after Ctrl-C (checkpoint saved), the shell's 128 + SIGINT


class NonFiniteLoss(GrapefxError):
    """The loss or gradient norm became NaN/Inf; the run stopped (exit status 3)."""

    exit_code = 3


class Trainer:
    """Trains ``spec`` into ``run_dir``; ``fit()`` runs it.

    ``resume`` continues from the newest complete checkpoint in ``run_dir/checkpoints``;
    ``world`` places this process among data-parallel ranks (``runtime.world``); ``command`` is
    recorded in ``env.json``; ``tty`` forces the progress bar on or off (default: stdout is a terminal).
    """

    def __init__(self, spec: Spec, run_dir: str | Path, *, resume: bool = False, world: World = World(),
                 device: torch.device | None = None, command: Sequence[str] = ("grapefx", "train"),
                 tty: bool | None = None):
        t = spec.train
        if t.global_batch % (t.micro_batch * world.size):
            raise GrapefxError(f"train.global_batch: {t.global_batch} sequences cannot be split into micro-batches of "
                               f"{t.micro_batch} on {world.size} ranks; make it a multiple of "
                               f"micro_batch x ranks = {t.micro_batch * world.size}")
        self.spec, self.world, self.run_dir = spec, world, Path(run_dir)
        self.accum = t.global_batch // (t.micro_batch * world.size)          # micro-batches per step and rank
        self.device = device or pick_device()
        self.metrics: MetricsLogger | None = None                            # messages go to print until it exists
        self.checkpoints = Checkpointer(self.run_dir / "checkpoints", t.keep_checkpoints, say=self._say,
                                        coordinator=world.coordinator, barrier=world.barrier)
        if not resume and self.checkpoints.complete():
            raise GrapefxError(f"{self.run_dir} already holds checkpoints (newest "
                               f"{self.checkpoints.complete()[-1][1].name}); pass --resume to continue that run "
                               "or --out a new folder")
        seed_all(t.seed)
        self.data = self._prepare_data()
        self.sampler = Sampler(self.data.train, spec.data.seq_len, t.micro_batch, t.seed, world.rank, world.size)
        self.eval_rows = self._eval_rows()
        self.parallel = Parallel(spec.parallel, world, self.device)          # data x expert mesh
        # _graph_outputs: outputs live in CUDA-graph memory that later replays reuse (Inductor's CUDA graphs)
        build_spec, self._graph_outputs, graphs_off = cuda_graphs(spec, self.device, world.size)
        # several micro-batches in one process: the weights are cast to bf16 once per step, and each
        # micro-batch's gradient is added into the fp32 one in one pass (compiler.compute_weights)
        self.model, self.build_report = build_model(build_spec, self.device, compile=spec.compile.enabled,
                                                    shard=self.parallel.shard, experts=self.parallel.expert_group,
                                                    cast_once=self.accum > 1 and world.size == 1)
        self.ddp = self.parallel.ddp(self.model)               # the DDP wrapper training calls, or None
        self.optimizer = build_optimizer(self.model, spec)
        if self.model.compute_weights is not None:             # re-cast the bf16 copies after each step
            self.model.compute_weights.watch(self.optimizer)
        self.scheduler = build_scheduler(self.optimizer, spec)
        self.balancer = (ExpertBalancer(self.model, spec.moe.router, all_reduce=world.all_reduce)
                         if self.model.moe_layers else None)
        self.peak = device_peak(self.device)
        self.flops_per_token = flops_per_token(spec).per_token
        self.step, self.tokens = 0, 0
        self._unread: list[tuple[int, torch.Tensor]] = []   # (step, its loss, ce, aux, grad norm on the device)
        self._latest: dict | None = None                     # the newest values the host has read
        if resume:
            self._resume()
        if world.coordinator:
            record_run(self.run_dir, spec, command=command, device=self.device, peak=self.peak,
                       passes=self.build_report.passes_dict())
        self.metrics = MetricsLogger(self.run_dir, t.steps, start_step=self.step, enabled=world.coordinator, tty=tty,
                                     peak_label=self.peak.label)
        self._stop_requested = False
        r = self.build_report
        if world.coordinator:
            self.metrics.console.lines(start_summary(
                spec, self.data, device=device_text(self.device), peak=self.peak, ranks=world.size, run_dir=self.run_dir,
                compiled=r.compiled, start_step=self.step, eval_tokens=self.eval_rows * spec.data.seq_len))
            self._note_small_validation()
            self._note_slow_cpu()
        if r.compiled:   # the first step (and the first evaluation, under no_grad) waits for Inductor
            self._say(f"compiling {len(r.groups)} distinct block graph{'s' if len(r.groups) != 1 else ''} and the "
                      f"head with Inductor ({r.compute_dtype}) on the first step; a cold compile takes about a "
                      "minute per graph on a small CPU, seconds with a warm cache")
        if graphs_off:
            self._say(f"note: {graphs_off}")
        if self.model.compute_weights is not None:
            weights = self.model.compute_weights
            self._say(f"accumulation: {len(weights.copies)} weights are cast to {r.compute_dtype} once per optimizer "
                      f"step, not in each of its {self.accum} micro-batches (the copies hold {human(weights.nbytes(), 'B')})")

    def _prepare_data(self):
        """Rank 0 prepares (or finds) the data first; the others then open its cache."""
        if self.world.coordinator:
            data = prepare(self.spec, progress=True)
        self.world.barrier()
        return data if self.world.coordinator else prepare(self.spec, progress=False)

    def _eval_rows(self) -> int:
        """Rows per evaluation: train.eval_batches x micro_batch, or every row of the validation split
        once when it holds fewer (rows are never repeated within an evaluation)."""
        t = self.spec.train
        distinct = Sampler(self.data.valid, self.spec.data.seq_len, t.micro_batch, t.seed).distinct_rows
        return min(t.eval_batches * t.micro_batch, distinct)

    def _note_small_validation(self) -> None:
        t, T = self.spec.train, self.spec.data.seq_len
        asked = t.eval_batches * t.micro_batch
        if self.eval_rows < asked:
            self._say(f"note: the validation split has {self.eval_rows} rows of {T} tokens without repeating any "
                      f"({self.eval_rows * T:,} tokens), fewer than train.eval_batches x micro_batch = {asked} rows: "
                      f"each evaluation uses those {self.eval_rows} rows once. For more, raise "
                      "data.valid_fraction (or add validation text)")

    SLOW_CPU_STEP_S = 600     # a step estimated slower than this on a CPU gets a note before anything compiles

    def _note_slow_cpu(self) -> None:
        """On a CPU, a model sized for GPUs would otherwise compile for minutes and then sit in its first step
        for hours without a word: say so, from a lower bound on a step's time (FLOPs at the matmul rate)."""
        if self.device.type != "cpu":
            return
        t, T = self.spec.train, self.spec.data.seq_len
        tokens = t.global_batch * T // self.world.size
        flops = self.flops_per_token * tokens
        rate = cpu_matmul_flops()
        seconds = flops / rate
        if seconds > self.SLOW_CPU_STEP_S:
            self._say(f"note: on this CPU one optimizer step takes at least {rough_duration(seconds)}: {tokens:,} tokens x "
                      f"{self.flops_per_token / 1e9:.2f} GFLOPs per token = {flops:.2e} FLOPs, at the "
                      f"{rate / 1e9:.3g} GFLOP/s of a 1024 x 1024 matmul here. Train this spec on a GPU; on a CPU "
                      "use a small spec (examples/tiny.yaml) or lower train.global_batch and data.seq_len")

    def _say(self, message: str) -> None:
        if self.world.coordinator:
            (self.metrics.say if self.metrics else print)(message)

    # ------------------------------------------------------------------ the loop
    def fit(self, until: int | None = None) -> int:
        """Train to ``train.steps`` (or stop after step ``until``); 0 when done, 130 after Ctrl-C."""
        t = self.spec.train
        last = min(t.steps, until) if until is not None else t.steps
        if self.step >= last:
            self._say(f"nothing to train: the run is at step {self.step} and train.steps is {t.steps}; "
                     "raise --steps to train further")
        start, window_tokens, window_time, status = time.perf_counter(), 0, 0.0, 0
        with self._deterministic(), self._sigint():
            while self.step < last:
                t0 = time.perf_counter()
                record = self._train_step()
                n = self.step
                log, evaluate = n % t.log_every == 0 or n == last, n % t.eval_every == 0 or n == t.steps
                if log or evaluate or n % t.checkpoint_every == 0 or n == last:
                    self._settle()          # the host waits for the GPU here only: inside the timed window
                window_time += time.perf_counter() - t0
                window_tokens += record["tokens_step"]
                if log:
                    self._log(record, window_tokens, window_time, time.perf_counter() - start)
                    window_tokens, window_time = 0, 0.0
                self.metrics.advance(n)
                if evaluate:
                    self.metrics.eval(self.evaluate())
                stop = self._stop_agreed()
                if n % t.checkpoint_every == 0 or n == last or stop:
                    self.save()
                if stop and n < last:
                    self._say(f"interrupted: stopped after step {n}; checkpoint "
                             f"{self.checkpoints.folder / Checkpointer.name(n)} saved; continue with --resume")
                    status = INTERRUPTED
                    break
        if self.world.coordinator:
            self._say(f"loss plot: {plot_loss(self.run_dir)}")
        return status

    def _own_gradients(self) -> None:
        """Move the gradients out of CUDA-graph memory (see the module docstring); those of weights with a
        compute-dtype copy were made outside it, by the copy's gradient hook."""
        hooked = {id(p) for p in self.model.compute_weights.masters()} if self.model.compute_weights else set()
        for p in self.model.parameters():
            if p.grad is not None and id(p) not in hooked:
                p.grad = p.grad.clone()

    def _new_graph_step(self) -> None:
        """A forward begins: Inductor's CUDA graphs may overwrite the outputs of earlier replays."""
        if self._graph_outputs:
            torch.compiler.cudagraph_mark_step_begin()

    def _train_step(self) -> dict:
        n = self.step + 1
        try:
            return self._accumulate_and_step(n)
        except torch.cuda.OutOfMemoryError as e:
            raise self._oom(n) from e

    def _to_device(self, t: torch.Tensor) -> torch.Tensor:
        """A host batch on the device; on CUDA through pinned memory, so the copy does not wait for the GPU
        (a copy from pageable memory first waits for every kernel queued before it)."""
        if self.device.type != "cuda":
            return t.to(self.device)
        return t.pin_memory().to(self.device, non_blocking=True)

    def _accumulate_and_step(self, n: int) -> dict:
        batches = [self.sampler.next_batch() for _ in range(self.accum)]      # each (B, T) inputs, targets
        sizes = [int((y != -100).sum()) for _, y in batches]                   # target tokens per micro-batch
        W = self.world.size
        total = sum(sizes) if W == 1 else int(self.world.all_reduce(
            torch.tensor([sum(sizes)], dtype=torch.int64, device=self.device)).item())
        sums = torch.zeros(4, dtype=torch.float32, device=self.device)       # loss, ce, aux (token-weighted), dropped
        for m, ((x, y), size) in enumerate(zip(batches, sizes)):
            with self.parallel.micro_batch(self.ddp, last=m == len(batches) - 1):
                forward = self.model if self.ddp is None else self.ddp
                self._new_graph_step()
                out = forward(self._to_device(x), self._to_device(y))
                share = size / total                                          # of the global batch's tokens
                (out.loss * (share * W)).backward()                           # DDP / FSDP2 divide by W
                if self._graph_outputs and m == 0 and len(batches) > 1:
                    self._own_gradients()
            sums[:3] += torch.stack([out.loss.detach(), out.ce_loss.detach(), out.aux_loss.detach()]).float() * share
            if out.dropped is not None:                                       # parallel.capacity_factor
                sums[3] += out.dropped.detach()
            if out.counts is not None:
                self.balancer.add(out.counts)
        self.parallel.reduce_expert_grads(self.model)                         # expert parallelism only
        sums = self.world.all_reduce(sums)                                    # global token-weighted means
        norm_t = self.parallel.grad_norm(self.model)                          # global (all ranks' gradients)
        if self.spec.train.grad_clip is not None:
            if self.optimizer.defaults.get("fused"):                          # inside the fused step
                clip_gradients(self.optimizer, self.model.parameters(), self.spec.train.grad_clip, norm_t)
            else:
                self.parallel.clip(self.model, self.spec.train.grad_clip, norm_t)
        lr = self.optimizer.param_groups[0]["lr"]
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        counts = self.balancer.step(n, self.tokens) if self.balancer else None
        self.step, self.tokens = n, self.tokens + total
        # loss, ce, aux, dropped, grad norm: read by the host at the next _settle (module docstring)
        self._unread.append((n, torch.cat([sums, norm_t.detach().reshape(1).float()])))
        return {"step": n, "lr": lr, "tokens_step": total, "counts": counts}

    def _settle(self) -> dict | None:
        """Read the losses and gradient norms of the steps since the last read (one transfer); stop at the
        first step whose loss or gradient norm is not finite. Returns the newest step's values (None
        before the first step)."""
        if self._unread:
            steps = [n for n, _ in self._unread]
            values = torch.stack([v for _, v in self._unread]).tolist()       # (steps, 5)
            self._unread.clear()
            for n, (loss, _, _, _, norm) in zip(steps, values):
                if not (math.isfinite(loss) and math.isfinite(norm)):
                    raise NonFiniteLoss(self._non_finite_message(n, loss, norm))
            loss, ce, aux, dropped, norm = values[-1]
            self._latest = {"loss": loss, "ce_loss": ce, "aux_loss": aux, "grad_norm": norm,
                            "dropped": dropped if self.spec.parallel.capacity_factor is not None else None}
        return self._latest

    def _log(self, record: dict, window_tokens: int, window_time: float, elapsed: float) -> None:
        tps = window_tokens / max(window_time, 1e-9)
        mfu = self.flops_per_token * tps / (self.peak.flops * self.world.size) if self.peak.flops else None
        v = self._settle()
        line = {"step": record["step"], "loss": v["loss"], "ce_loss": v["ce_loss"], "aux_loss": v["aux_loss"],
                "lr": record["lr"], "grad_norm": v["grad_norm"]}
        line.update(tokens=self.tokens, tokens_per_s=tps, mfu=mfu)
        if v["dropped"] is not None:           # assignments over an expert's capacity this step, all ranks
            line.update(dropped_assignments=int(v["dropped"]))
        if self.balancer and record["counts"] is not None:
            line.update(self.balancer.balance(record["counts"]))
            line.update(expert_bias=self.balancer.bias_stats(), zero_token_experts=self.balancer.take_window())
        else:
            line.update(max_vio=None, max_vio_worst=None, max_vio_worst_layer=None, expert_bias=None,
                        zero_token_experts=None)
        line.update(memory_gib=memory_gib(self.device), elapsed_s=elapsed)
        self.metrics.train(line)

    @torch.no_grad()
    def evaluate(self) -> dict:
        """Validation cross-entropy and MaxVio over the first ``self.eval_rows`` rows of the validation order.

        That is ``train.eval_batches`` micro-batches, or every row of a smaller validation split once
        (``_eval_rows``; the rows of the last micro-batch past the list get no targets, so shapes stay
        fixed). The rows come from a fresh validation sampler seeded with ``train.seed``: the same at
        every evaluation, and the training sampler is untouched. Counts here feed the metric only,
        never the expert bias (MaxVio counts every row of a padded last micro-batch). With W ranks,
        rank r evaluates micro-batches r, r + W, ... of that same list, so the result does not depend
        on W; ranks left without one in the last round run a micro-batch past the list and drop it
        (FSDP2's all-gathers need every rank in every forward).
        """
        t, W, rank = self.spec.train, self.world.size, self.world.rank
        B, rows = t.micro_batch, self.eval_rows
        batches = -(-rows // B)
        sampler = Sampler(self.data.valid, self.spec.data.seq_len, B, t.seed)   # one list for any W
        loss_sum = torch.zeros((), dtype=torch.float64, device=self.device)
        tokens = torch.zeros((), dtype=torch.int64, device=self.device)
        counts = None
        self.model.eval()
        try:
            for j in range(-(-batches // W) * W):
                x, y = sampler.next_batch()                                    # micro-batch j of the list
                if j % W != rank:
                    continue
                y[max(0, rows - j * B):] = -100                               # rows past the list: no targets
                n = int((y != -100).sum())
                y = y.to(self.device)
                self._new_graph_step()
                out = self.model(x.to(self.device), y)
                if n == 0:
                    continue
                loss_sum += out.ce_loss.double() * n
                tokens += n
                if out.counts is not None:     # a copy: the next forward may reuse the output's memory
                    counts = out.counts.float().clone() if counts is None else counts + out.counts.float()
        except torch.cuda.OutOfMemoryError as e:
            raise self._oom(self.step, evaluation=True) from e
        finally:
            self.model.train()
        loss_sum, tokens = self.world.all_reduce(loss_sum), self.world.all_reduce(tokens)
        record = {"step": self.step, "val_loss": float(loss_sum / tokens.clamp_min(1)), "tokens": int(tokens)}
        if self.balancer and W > 1:                                            # a rank may have had no batch
            counts = counts if counts is not None else torch.zeros(len(self.balancer.layers), self.spec.moe.experts,
                                                                  device=self.device)
        record.update(self.balancer.balance(self.world.all_reduce(counts)) if counts is not None
                      else {"max_vio": None, "max_vio_worst": None, "max_vio_worst_layer": None})
        return record

    def _stop_agreed(self) -> bool:
        """After a step: whether any rank was interrupted; all ranks stop together (the save is collective)."""
        if self.world.size == 1:
            return self._stop_requested
        flag = torch.tensor([int(self._stop_requested)], dtype=torch.int64, device=self.device)
        return bool(self.world.all_reduce(flag).item())

    # ------------------------------------------------------------------ checkpoints
    def _tensors(self) -> tuple[dict, dict]:
        model_sd, optim_sd = get_state_dict(self.model, self.optimizer)
        rng_tensors, rng_scalars = rng_state(self.device)
        tensors = self.parallel.checkpoint_view({"model": model_sd, "optimizer": optim_sd["state"], "rng": rng_tensors})
        state = {"step": self.step, "tokens": self.tokens, "scheduler": self.scheduler.state_dict(),
                 "optimizer_param_groups": optim_sd["param_groups"], "sampler": self.sampler.state_dict(),
                 "rng": rng_scalars, "spec": dump_spec(self.spec)}
        return tensors, state

    def save(self) -> Path:
        """Checkpoint the state after step ``self.step`` (``RUN/checkpoints/step-NNNNNN``); never one holding
        a step whose loss or gradient norm was not finite (``_settle`` stops the run first)."""
        self._settle()
        tensors, state = self._tensors()
        return self.checkpoints.save(self.step, tensors, state)

    def _resume(self) -> None:
        path = self.checkpoints.latest()
        if path is None:
            self._say(f"no complete checkpoint in {self.checkpoints.folder}; starting at step 0")
            return
        tensors, _ = self._tensors()   # templates: DCP loads into them in place (optimizer state is created first)
        state = self.checkpoints.load(path, tensors)
        tensors = self.parallel.local_view(tensors)
        groups = [{**g, "betas": tuple(g["betas"])} for g in state["optimizer_param_groups"]]
        set_state_dict(self.model, self.optimizer, model_state_dict=tensors["model"],
                       optim_state_dict={"state": tensors["optimizer"], "param_groups": groups})
        self.scheduler.load_state_dict(state["scheduler"])
        self.sampler.load_state_dict(state["sampler"])
        set_rng_state(tensors["rng"], state["rng"], self.device)
        self.step, self.tokens = state["step"], state["tokens"]
        if state["spec"] != dump_spec(self.spec):
            old_lr = self.optimizer.param_groups[0]["lr"]
            self._adopt_optimizer_settings()
            self._say(resume_note(path.name, spec_changes(state["spec"], dump_spec(self.spec)), self.step, old_lr,
                                  self.optimizer.param_groups[0]["lr"]))
        self._say(f"resumed from {path} (step {self.step}, {self.tokens:,} tokens)")

    def _adopt_optimizer_settings(self) -> None:
        """After resuming with a changed spec: its lr schedule, betas, eps and weight decay apply from the
        next step (the checkpoint's param groups carry the old ones; ``runtime.resume``)."""
        t = self.spec.train
        o, peak = t.optimizer, t.optimizer.lr
        self.scheduler.base_lrs = [peak] * len(self.optimizer.param_groups)
        for g in self.optimizer.param_groups:
            g.update(initial_lr=peak, lr=peak * lr_factor(self.step, t.schedule, t.steps), betas=tuple(o.betas),
                     eps=o.eps, weight_decay=o.weight_decay if g["name"] == "decay" else 0.0)
        self.scheduler._last_lr = [g["lr"] for g in self.optimizer.param_groups]

    # ------------------------------------------------------------------ failures
    def _non_finite_message(self, step: int, loss: float, grad_norm: float) -> str:
        what = f"loss is {loss}" if not math.isfinite(loss) else f"gradient norm is {grad_norm}"
        done = self.checkpoints.complete()
        kept = (f"the last good checkpoint is {done[-1][1]} (continue from it with --resume)" if done
                else "no checkpoint was written before it")
        return (f"step {step}: {what}; training stopped, no checkpoint holds this step or any "
                f"after it; {kept}. Lower train.optimizer.lr or set train.grad_clip, and check "
                "precision.compute / precision.cpu_compute (bf16 overflows long before fp32)")

    def _oom(self, step: int, evaluation: bool = False) -> GrapefxError:
        t, where = self.spec.train, "evaluation" if evaluation else "training"
        return GrapefxError(f"step {step}: out of GPU memory during {where}; lower train.micro_batch (now "
                            f"{t.micro_batch}; global_batch stays, more micro-batches are accumulated), "
                            f"data.seq_len (now {self.spec.data.seq_len}), or set compile.activation_checkpointing: true")

    # ------------------------------------------------------------------ process state
    @contextlib.contextmanager
    def _deterministic(self) -> Iterator[None]:
        """Deterministic kernels on CPU (free there); CUDA keeps the fast scatter/index_add (seeded, not bitwise)."""
        before = torch.are_deterministic_algorithms_enabled()
        torch.use_deterministic_algorithms(before or self.device.type == "cpu")
        try:
            yield
        finally:
            torch.use_deterministic_algorithms(before)

    @contextlib.contextmanager
    def _sigint(self) -> Iterator[None]:
        """First Ctrl-C: finish the step, checkpoint, exit 130. Second: KeyboardInterrupt now."""
        if threading.current_thread() is not threading.main_thread():
            yield
            return

        def handler(signum, frame):
            if self._stop_requested:
                raise KeyboardInterrupt
            self._stop_requested = True
            self._say(f"interrupt: finishing step {self.step + 1}, then saving a checkpoint "
                     "(Ctrl-C again to quit without saving)")

        previous = signal.signal(signal.SIGINT, handler)
        try:
            yield
        finally:
            signal.signal(signal.SIGINT, previous)

    def close(self) -> None:
        self.metrics.close()
