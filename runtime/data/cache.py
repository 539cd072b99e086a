"""Where prepared data and downloads live, and how they are written without half-written states."""

from __future__ import annotations

import os
import shutil
import sys
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

__all__ = ["cache_root", "atomic_dir", "say"]


def cache_root(cache_dir: str | None = None) -> Path:
    """`data.cache_dir`, else $GRAPEFX_CACHE, else $XDG_CACHE_HOME/grapefx, else ~/.cache/grapefx.

    The spec wins over the environment because it is the more specific setting (one run vs. a shell).
    """
    if cache_dir:
        return Path(cache_dir).expanduser()
    if os.environ.get("GRAPEFX_CACHE"):
        return Path(os.environ["GRAPEFX_CACHE"]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "grapefx"


@contextmanager
def atomic_dir(final: Path) -> Iterator[Path]:
    """Yield an empty temporary folder beside `final`; rename it to `final` when the block succeeds.

    A folder that exists under its final name is therefore complete. A failure removes the
    temporary folder; a hard crash leaves a `.tmp-*` folder that nothing reads. If another
    process finished the same folder first, its copy is kept and ours is dropped.
    """
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f".tmp-{final.name}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()  # unlike mkdtemp (mode 0700) this honours the umask, so a shared cache stays shared
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    try:
        os.rename(tmp, final)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if not final.is_dir():
            raise


def say(message: str, progress: bool) -> None:
    """A progress line on stderr (stdout stays for the command's result)."""
    if progress:
        print(f"grapefx data: {message}", file=sys.stderr, flush=True)
