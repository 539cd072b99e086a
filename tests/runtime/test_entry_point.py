"""The entry point itself (runtime/cli.py): how a command ends when its reader goes away."""

import subprocess
import sys
from pathlib import Path

EXAMPLES = sorted(str(p) for p in (Path(__file__).parents[2] / "examples").glob("*.yaml"))


def test_a_reader_that_stops_early_ends_the_command_quietly():
    """`grapefx validate examples/*.yaml | head -1`: status 141 (128 + SIGPIPE), no traceback."""
    p = subprocess.Popen([sys.executable, "-m", "runtime.cli", "validate", *EXAMPLES],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=Path(__file__).parents[2])
    first = p.stdout.readline()
    p.stdout.close()                                                  # as head does after its line
    err = p.stderr.read()
    assert p.wait(timeout=120) == 141
    assert first.startswith(b"ok: ") and err == b""
