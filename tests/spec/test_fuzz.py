"""Spec input never crashes or hangs ``grapefx validate``: the example specs, mutated at random
(values replaced by any YAML value, keys deleted, unknown keys added), give exit 0 with an ``ok``
line or exit 2 with ``FILE: ...`` problem lines, never a traceback, and answer within the deadline."""

import contextlib
import io
import tempfile
from pathlib import Path

import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import runtime.ablate.matrix  # noqa: F401 - imported by `validate` on first use: not inside an example's deadline
from runtime.cli import build_parser, main
from spec.compose import read_spec_file

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
SPECS = sorted(p for p in EXAMPLES.glob("*.yaml") if "variants" not in (yaml.safe_load(p.read_text()) or {}))
MERGED = [read_spec_file(p)[0] for p in SPECS]     # extends resolved: the mutated copy is written alone
build_parser()                                     # every subcommand module imported before the first example

WORDS = ["grape-m", "grape-a", "nope", "rope", "local", "global", "tpa", "gqa", "softmax", "sigmoid", "bpe", "byte",
         "deepseek-v3", "kind", "fsdp", ""]
SCALARS = st.one_of(
    st.none(), st.booleans(), st.sampled_from(WORDS), st.text(max_size=8),
    st.integers(-3, 10), st.integers(-2**70, 2**70), st.sampled_from([2**31, 2**40, 10**7, 4096, 4097, 2**20 + 1]),
    st.floats(allow_nan=True, allow_infinity=True),
)
VALUES = st.one_of(SCALARS, st.lists(SCALARS, max_size=3),
                   st.dictionaries(st.one_of(st.sampled_from(WORDS), st.integers(0, 3)), SCALARS, max_size=2))


def _validate(path: Path) -> tuple[int, io.StringIO, io.StringIO]:
    """``grapefx validate PATH`` in this process: its exit code, stdout and stderr."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(["validate", str(path)])
    return code, out, err


def paths(node, prefix=()):
    """Every key path (through mappings and lists) of a parsed spec."""
    items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
    for k, v in items:
        yield prefix + (k,)
        yield from paths(v, prefix + (k,))


def parent(data, path):
    for k in path[:-1]:
        data = data[k]
    return data


@st.composite
def mutated(draw):
    data = yaml.safe_load(yaml.safe_dump(draw(st.sampled_from(MERGED))))     # a deep copy
    for _ in range(draw(st.integers(1, 3))):
        every = list(paths(data))
        if not every:
            break
        path = draw(st.sampled_from(every))
        node, last = parent(data, path), path[-1]
        action = draw(st.sampled_from(["replace", "replace", "delete", "add"]))
        if action == "replace":
            node[last] = draw(VALUES)
        elif action == "delete" and isinstance(node, dict):
            del node[last]
        elif isinstance(node, dict):
            node[draw(st.sampled_from(WORDS + ["extra", "windows"]))] = draw(VALUES)
    return data


@settings(max_examples=120, deadline=2000, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(mutated())
def test_mutated_specs_exit_0_or_2_with_a_message(data):
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "mutated.yaml"
        path.write_text(yaml.safe_dump(data))
        code, out, err = _validate(path)
    if code == 0:
        assert out.getvalue().startswith(f"ok: {path} (") and err.getvalue() == ""
    else:
        lines = err.getvalue().splitlines()
        assert code == 2 and lines and "Traceback" not in err.getvalue()
        assert all(line.startswith(f"{path}: ") for line in lines), lines


TEXTS = [p.read_text() for p in SPECS]


@st.composite
def edited(draw):
    """An example file with a few characters of YAML punctuation, digits or words spliced in or cut out."""
    text = draw(st.sampled_from(TEXTS))
    for _ in range(draw(st.integers(1, 3))):
        i = draw(st.integers(0, len(text)))
        cut = draw(st.integers(0, 4))
        text = text[:i] + draw(st.text(alphabet=":-?[]{},&*!|>#'\"\n\t 0123456789.e", max_size=4)) + text[i + cut:]
    return text


@settings(max_examples=60, deadline=2000, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(edited())
def test_edited_files_exit_0_or_2_with_a_message(text):
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "edited.yaml"
        path.write_text(text)
        (Path(d) / "baseline.yaml").write_text((EXAMPLES / "baseline.yaml").read_text())   # for `extends`
        code, out, err = _validate(path)
    assert code in (0, 2), (code, err.getvalue())
    first = (out.getvalue() if code == 0 else err.getvalue()).splitlines()[0]
    assert first.startswith(f"ok: {path} (" if code == 0 else d), first     # a problem of `extends` names that file
