"""The run folder's record of what ran: ``spec.resolved.yaml`` and ``env.json``.

    RUN/
        spec.resolved.yaml   the spec after extends/overrides, every default filled in (spec.dump_spec)
        env.json             versions (Python, torch, grapefx), the project's git commit, the
                             command line, the device and the MFU peak used (or why there is none),
                             the Inductor cache folder; no host name, no user name
        metrics.jsonl, loss.png, tb/, checkpoints/   (written by the trainer)

Both files are rewritten on every start, so after a resume they describe the latest session.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
from importlib import metadata
from pathlib import Path
from typing import Sequence

import torch

from runtime.device import Peak
from spec import dump_spec
from spec.schema import Spec

__all__ = ["record_run", "git_commit", "inductor_cache_dir"]

PROJECT_ROOT = Path(__file__).resolve().parents[1]


def git_commit(folder: Path = PROJECT_ROOT) -> str | None:
    """``git rev-parse HEAD`` of the grapefx source tree; None outside a git checkout or without git."""
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=folder, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    if out.returncode != 0:
        return None
    return out.stdout.strip() or None


def inductor_cache_dir() -> str:
    """Where Inductor caches compiled code for this process (``TORCHINDUCTOR_CACHE_DIR`` or its default)."""
    from torch._inductor.runtime.cache_dir_utils import cache_dir
    return cache_dir()


def package_version(package: str) -> str | None:
    """The installed version of ``package`` (None when it is not installed, e.g. run from a checkout)."""
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def record_run(run_dir: str | Path, spec: Spec, *, command: Sequence[str], device: torch.device, peak: Peak,
               passes: dict | None = None) -> None:
    """Write ``spec.resolved.yaml``, ``env.json`` and (given the pipeline's pass report, as
    ``PassReport.as_dict()``) ``passes.json`` into ``run_dir`` (created if needed)."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "spec.resolved.yaml").write_text(dump_spec(spec))
    if passes is not None:
        (run_dir / "passes.json").write_text(json.dumps(passes, indent=2) + "\n")
    env = {
        "command": list(command),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "grapefx": package_version("grapefx"),
        "git_commit": git_commit(),
        "os": f"{platform.system()} {platform.release()} {platform.machine()}",
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "cuda": torch.version.cuda,
        "cpu_threads": torch.get_num_threads(),
        "mfu": peak.as_dict(),
        "inductor_cache_dir": inductor_cache_dir() if spec.compile.enabled else None,
        "env": {k: os.environ[k] for k in ("TORCHINDUCTOR_CACHE_DIR", "GRAPEFX_CACHE", "CUDA_VISIBLE_DEVICES")
                if k in os.environ},
    }
    (run_dir / "env.json").write_text(json.dumps(env, indent=1) + "\n")
