"""Safe YAML reading and writing for specs.

Reading uses ``yaml.SafeLoader`` (plain mappings, lists and scalars; no Python objects), with
three repairs over PyYAML's YAML 1.1 defaults:

- ``1e-3`` is a float. YAML 1.1 wants a dot (``1.0e-3``) and PyYAML would otherwise give the
  *string* "1e-3", which then fails a type check far from its cause.
- A key written twice in one mapping is an error (PyYAML silently keeps the last one).
- Syntax errors and unsafe tags (``!!python/object/apply:os.system``) become ``SpecError`` with
  the line and column, never a traceback.

Writing uses ``yaml.SafeDumper`` with keys in schema order and short scalar lists in flow style
(``[local, local, local, global]``), so a dumped spec reads like a hand-written one.
"""

from __future__ import annotations

import re
from typing import Any

import yaml

from spec.errors import SpecError

__all__ = ["parse_yaml", "parse_scalar", "dump_yaml"]

# YAML 1.2-style floats: a dot is optional when an exponent is present ("1e-3", "5E4").
_FLOAT = re.compile(
    r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
        |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
        |\.[0-9_]+(?:[eE][-+]?[0-9]+)?
        |[-+]?\.(?:inf|Inf|INF)
        |\.(?:nan|NaN|NAN))$""",
    re.X,
)


class _Loader(yaml.SafeLoader):
    """SafeLoader with YAML 1.2 floats and duplicate-key detection."""


# Replace the float resolver (the first-character table is shared, so copy before editing).
_Loader.yaml_implicit_resolvers = {
    ch: [(tag, rx) for tag, rx in rs if tag != "tag:yaml.org,2002:float"]
    for ch, rs in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_Loader.add_implicit_resolver("tag:yaml.org,2002:float", _FLOAT, list("-+0123456789."))


def _construct_mapping(loader: _Loader, node: yaml.MappingNode, deep: bool = False) -> dict:
    loader.flatten_mapping(node)
    seen: dict[Any, yaml.Node] = {}
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if isinstance(key, (list, dict)):
            raise yaml.constructor.ConstructorError(
                None, None, f"a key must be a name, not a {'list' if isinstance(key, list) else 'mapping'} "
                            "(`? [...]` or `? {...}`): write `name: value`", key_node.start_mark)
        if key in seen:
            first = seen[key].start_mark
            raise yaml.constructor.ConstructorError(
                None, None,
                f"duplicate key {key!r} (first written at line {first.line + 1}); "
                "a key may appear once per section: delete one of them",
                key_node.start_mark,
            )
        seen[key] = key_node
    return loader.construct_mapping(node, deep=deep)


_Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def _where(mark: Any) -> str:
    return f"line {mark.line + 1}, column {mark.column + 1}" if mark is not None else "unknown position"


def parse_yaml(text: str, file: str) -> Any:
    """Parse one YAML document safely; errors name ``file`` and the line and column."""
    try:
        return yaml.load(text, Loader=_Loader)  # noqa: S506 - _Loader is a SafeLoader subclass
    except yaml.constructor.ConstructorError as e:
        mark = e.problem_mark
        problem = e.problem or ""
        if "could not determine a constructor for the tag" in problem:
            tag = problem.split("tag", 1)[1].strip(" '")
            raise SpecError(file, _where(mark),
                            f"tag {tag} is not allowed: specs are loaded with yaml.safe_load, which builds only "
                            "plain mappings, lists, strings and numbers; write the value without the tag") from None
        raise SpecError(file, _where(mark), problem) from None
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        detail = e.problem or "invalid YAML"
        if e.context:
            ctx_mark = e.context_mark
            detail += f" ({e.context}" + (f" at {_where(ctx_mark)}" if ctx_mark is not None else "") + ")"
        raise SpecError(file, _where(mark),
                        f"YAML syntax error: {detail}; check indentation (spaces, not tabs) and that "
                        "every `key: value` has a space after the colon") from None
    except yaml.YAMLError as e:  # reader errors (bad bytes) have no problem_mark
        raise SpecError(file, None, f"not readable as YAML: {e}") from None


def parse_scalar(text: str, file: str, key: str) -> Any:
    """Parse the value of ``--set key=value`` as a YAML flow value (number, bool, null, string, list)."""
    try:
        return yaml.load(text, Loader=_Loader) if text.strip() else None  # noqa: S506
    except yaml.YAMLError as e:
        raise SpecError(file, key, f"--set value {text!r} is not a YAML value ({getattr(e, 'problem', e)}); "
                                   "quote strings that contain ':' or '#', e.g. --set 'name=\"a: b\"'") from None


class _Dumper(yaml.SafeDumper):
    """SafeDumper: short lists of scalars in flow style, everything else in block style."""


def _represent_list(dumper: _Dumper, data: list) -> yaml.Node:
    flow = len(data) <= 32 and all(isinstance(x, (str, int, float, bool)) or x is None for x in data)
    return dumper.represent_sequence("tag:yaml.org,2002:seq", data, flow_style=flow)


_Dumper.add_representer(list, _represent_list)


def dump_yaml(data: Any) -> str:
    return yaml.dump(data, Dumper=_Dumper, sort_keys=False, default_flow_style=False, allow_unicode=True, width=100)
