"""The wheel, installed as users install it (not editable), carries everything the CLI uses.

The wheel is built from a copy of the sources without build isolation (no download), installed
with ``--no-deps --no-index`` into a fresh virtual environment that sees this interpreter's
packages (torch and the other dependencies) through a ``.pth`` line, and run from a folder
outside the repository, so no module can come from the checkout. About 30 s on 2 cores; it needs
setuptools >= 70.1 (the test extra) to build the wheel.
"""

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import venv
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SOURCES = ("pyproject.toml", "README.md", "spec", "compiler", "runtime")
TINY = ROOT / "examples" / "tiny.yaml"
pytestmark = pytest.mark.timeout(300)
SMALL = ["model.d_model=32", "attention.local.head_dim=8", "attention.local.window=4", "attention.global.head_dim=8",
         "moe.experts=4", "moe.expert_hidden=16", "ffn.hidden=24", "data.seq_len=12", "train.micro_batch=2"]


def run(cmd: list[str], cwd: Path, env: dict) -> subprocess.CompletedProcess:
    done = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, f"{' '.join(map(str, cmd))} exited {done.returncode}:\n{done.stdout}\n{done.stderr}"
    return done


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> tuple[Path, dict]:
    """(the venv's bin folder, the environment to run it in) with the wheel installed."""
    tmp = tmp_path_factory.mktemp("packaging")
    src, wheels, env_dir, work = tmp / "src", tmp / "wheels", tmp / "venv", tmp / "work"
    work.mkdir()
    for name in SOURCES:
        path = ROOT / name
        if path.is_dir():
            shutil.copytree(path, src / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            src.mkdir(exist_ok=True)
            shutil.copy2(path, src / name)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
    run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-q",
         "-w", str(wheels), str(src)], tmp, env)
    (wheel,) = wheels.glob("grapefx-*.whl")
    venv.create(env_dir, with_pip=False)
    python = env_dir / "bin" / "python"
    purelib = Path(run([str(python), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"], tmp,
                       env).stdout.strip())
    # this interpreter's packages (torch, ...) as plain path lines: .pth files inside them (an
    # editable grapefx) are not processed, so grapefx itself can only come from the wheel
    here = dict.fromkeys([sysconfig.get_path("purelib"), sysconfig.get_path("platlib")])
    (purelib / "dependencies.pth").write_text("".join(p + "\n" for p in here))
    run([sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "--no-index", "-q",
         str(wheel)], tmp, env)
    return env_dir / "bin", env | {"VIRTUAL_ENV": str(env_dir)}, work


def test_the_installed_modules_come_from_the_wheel(installed):
    bin_dir, env, work = installed
    where = run([str(bin_dir / "python"), "-c",
                 "import runtime.bench.reference_model as m, runtime.bench.flex as f; print(m.__file__); print(f.__file__)"],
                work, env).stdout.split()
    venv_dir = bin_dir.parent.resolve()
    assert all(Path(p).resolve().is_relative_to(venv_dir) for p in where), where


def test_bench_help_and_validate_run_from_the_install(installed):
    bin_dir, env, work = installed
    assert "--ways" in run([str(bin_dir / "grapefx"), "bench", "--help"], work, env).stdout
    out = run([str(bin_dir / "grapefx"), "validate", str(TINY)], work, env).stdout
    assert out.startswith("ok: ") and "4 layers" in out


def test_the_reference_way_runs_from_the_install(installed):
    """The reference model is part of the package: ``--ways reference`` works outside a checkout."""
    bin_dir, env, work = installed
    sets = [a for o in SMALL for a in ("--set", o)]
    run([str(bin_dir / "grapefx"), "bench", str(TINY), "--out", "bench.json", "--ways", "reference", "--steps", "1",
         "--warmup", "1", *sets], work, env)
    rec = json.loads((work / "bench.json").read_text())["ways"]["reference"]
    assert rec["status"] == "ok", rec
