"""Helpers shared by the trainer tests: run a Trainer to its end (or a step) and read its losses."""

from runtime.metrics import read_metrics
from runtime.trainer import Trainer


def train(spec, run, *, until=None, resume=False, device=None):
    """Train ``spec`` into ``run`` (to ``until`` or the end); returns (trainer, exit status)."""
    trainer = Trainer(spec, run, resume=resume, device=device, tty=False)
    try:
        status = trainer.fit(until)
    finally:
        trainer.close()
    return trainer, status


def losses(run):
    """(step, loss, grad_norm) of every training line in ``run``'s metrics.jsonl."""
    return [(r["step"], r["loss"], r["grad_norm"]) for r in read_metrics(run) if r["kind"] == "train"]
