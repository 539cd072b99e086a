"""The packages ``spec``, ``compiler`` and ``runtime`` import each other in one direction only.

Every module imports, and the module graph drawn from the source has no cycle. The graph is read
from each file's syntax tree (no code runs), one node per module, an edge A -> B when A names B in

- ``import B`` or ``from B import name``, and ``from P import B`` where ``P.B`` is a module
  (then the edge goes to ``P.B``, not to the package ``P``); relative imports are resolved;
- ``importlib.import_module("B")`` with a literal name, so the string form cannot hide a dependency.

What counts: every such statement anywhere in the file, at module level, inside a function, or under
``if TYPE_CHECKING:``. A function-local import only postpones the loop past Python's import
machinery, and a type-only import still makes one module know the other's classes: either way the
two modules can no longer be read, tested or changed apart, which is what the rule protects.
What does not count: the implicit import of parent packages (``import a.b.c`` runs ``a/__init__``
and ``a/b/__init__``); otherwise every package whose ``__init__`` re-exports a submodule that
imports a sibling would count as a cycle. Modules outside the three packages are ignored.

To fix a reported cycle, move what both modules need into a third module both import, or turn one
direction into a registration (see ``compiler/kernels/register.py``).
"""

import ast
import importlib
from pathlib import Path

import networkx as nx
import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("spec", "compiler", "runtime")
OPTIONAL = {"triton", "tensorboard"}   # modules that need these are skipped where they are missing


def module_files(root: Path = ROOT, packages=PACKAGES) -> dict[str, Path]:
    """Dotted module name -> file, for every module of the packages under root."""
    files = {}
    for package in packages:
        for path in sorted((root / package).rglob("*.py")):
            parts = list(path.relative_to(root).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            files[".".join(parts)] = path
    return files


def imports(module: str, path: Path, files: dict[str, Path]) -> list[tuple[str, int]]:
    """(module of ``files`` that ``module`` imports, line) for every import in its file (module docstring)."""
    package = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(alias.name, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:                                            # relative: from .x / from .. import y
                anchor = package[:len(package) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                found.append((sub if sub in files else base, node.lineno))
        elif (isinstance(node, ast.Call) and isinstance(node.func, (ast.Attribute, ast.Name))
              and getattr(node.func, "attr", getattr(node.func, "id", None)) == "import_module"
              and node.args and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str)):
            found.append((node.args[0].value, node.lineno))
    return [(name, line) for name, line in found if name in files and name != module]


def import_graph(files: dict[str, Path]) -> nx.DiGraph:
    """Edges A -> B between the modules of ``files``, each with the lines of A that import B."""
    graph = nx.DiGraph()
    graph.add_nodes_from(files)
    for module, path in files.items():
        for name, line in imports(module, path, files):
            graph.add_edge(module, name)
            graph.edges[module, name].setdefault("lines", []).append(line)
    return graph


def describe(cycle: list[str], graph: nx.DiGraph, files: dict[str, Path], root: Path = ROOT) -> str:
    """``a (a.py:12) -> b (b.py:40) -> a``: each module with the lines where it imports the next."""
    steps = []
    for a, b in zip(cycle, cycle[1:] + cycle[:1]):
        where = ", ".join(str(n) for n in sorted(set(graph.edges[a, b]["lines"])))
        steps.append(f"{a} ({files[a].relative_to(root).as_posix()}:{where})")
    return " -> ".join(steps + [cycle[0]])


def test_the_module_graph_has_no_cycle():
    files = module_files()
    graph = import_graph(files)
    cycles = sorted(sorted_cycle(c) for c in nx.simple_cycles(graph))
    report = "\n".join("  " + describe(c, graph, files) for c in cycles[:20])
    more = f"\n  ... and {len(cycles) - 20} more" if len(cycles) > 20 else ""
    assert not cycles, (f"{len(cycles)} import cycle(s) among spec, compiler and runtime "
                        f"(module (file:lines importing the next) -> ...):\n{report}{more}\n"
                        "Move what both sides need into a module both import (this file's docstring).")


def sorted_cycle(cycle: list[str]) -> list[str]:
    """The cycle rotated to start at its smallest module, so reports are stable."""
    start = cycle.index(min(cycle))
    return cycle[start:] + cycle[:start]


def test_the_graph_follows_the_documented_rules(tmp_path):
    """A toy package: which statements make edges (module docstring), pinned edge by edge."""
    sources = {
        "pkg/__init__.py": "from pkg.a import thing\n",                      # parent package: re-export
        "pkg/a.py": "thing = 1\n",
        "pkg/b.py": "def f():\n    from pkg import c\n",                    # function-local, submodule
        "pkg/c.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from .d import D\n",
        "pkg/d.py": "import importlib\nimportlib.import_module('pkg.b')\nimport os.path\n",
        "pkg/e.py": "from pkg import thing\nfrom . import a\n",               # a name of pkg; relative submodule
    }
    for name, text in sources.items():
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).write_text(text)
    files = module_files(tmp_path, ("pkg",))
    graph = import_graph(files)
    assert sorted(graph.edges) == [("pkg", "pkg.a"), ("pkg.b", "pkg.c"), ("pkg.c", "pkg.d"), ("pkg.d", "pkg.b"),
                                   ("pkg.e", "pkg"), ("pkg.e", "pkg.a")]
    (cycle,) = [sorted_cycle(c) for c in nx.simple_cycles(graph)]
    assert describe(cycle, graph, files, tmp_path) == ("pkg.b (pkg/b.py:2) -> pkg.c (pkg/c.py:3) -> "
                                                       "pkg.d (pkg/d.py:2) -> pkg.b")


@pytest.mark.parametrize("module", sorted(module_files()))
def test_every_module_imports(module):
    try:
        importlib.import_module(module)
    except ModuleNotFoundError as e:
        if e.name is None or e.name.split(".")[0] not in OPTIONAL:
            raise
        pytest.skip(f"{module} needs {e.name}, not installed here")
