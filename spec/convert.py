"""Raw YAML mapping <-> typed frozen dataclasses (``spec.schema``).

Rules of the conversion (each failure is a ``SpecError`` naming the file that wrote the key; all of
them are collected and raised together as ``SpecProblems``):

- Unknown keys are errors with a did-you-mean (``difflib``) among the keys of that section; when
  the name belongs to another section, the message says where (``window`` -> attention.local).
- Types are checked, never coerced from strings: an ``int`` field takes an integer (not ``true``,
  not ``"8"``); a ``float`` field takes any number; ``Literal`` fields take one of their choices.
- YAML key ``global`` maps to the field ``global_`` (a Python keyword); in general a YAML key
  that is a Python keyword maps to the field with a trailing underscore.
- Positions are a tagged union on ``kind`` over ``schema.POSITION_KINDS`` (grape-m | grape-a |
  nope | rope, and any kind registered with ``@position_kind``). A key that belongs
  to another kind is an error naming the kinds that have it. ``position: nope`` (a bare kind) is
  shorthand for ``position: {kind: nope}``.
- Lists become tuples (the dataclasses are frozen and hashable where possible).
- A partial section fills its missing keys from the *field's* default, not the class's: the
  default of ``attention.local`` is ``Attention(window=128, position=GrapeM())``, so
  ``attention: {local: {heads: 8}}`` keeps the window and GRAPE-M (merged with ``deep_merge``,
  whose tagged-union rule lets ``position: {kind: rope}`` replace the default position whole).

``to_dict`` is the inverse; ``to_dict(from_dict(d))`` is the fully resolved mapping.
"""

from __future__ import annotations

import dataclasses
import difflib
import keyword
import types
import typing
from functools import cache
from typing import Any, Literal, Union

from spec import schema
from spec.compose import deep_merge
from spec.errors import SpecError, SpecProblems
from spec.origin import Origin, dotted

__all__ = ["from_dict", "to_dict", "yaml_key", "POSITION_KINDS"]

POSITION_KINDS = schema.POSITION_KINDS    # kind -> class, filled by ``@schema.position_kind``


def yaml_key(field_name: str) -> str:
    return field_name[:-1] if field_name.endswith("_") and keyword.iskeyword(field_name[:-1]) else field_name


@cache
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


@cache
def _key_index() -> dict[str, list[str]]:
    """Every YAML key name -> the dotted sections that have it (for 'did you mean <section>')."""
    index: dict[str, list[str]] = {}

    def walk(cls: type, prefix: str) -> None:
        for fl in dataclasses.fields(cls):
            k = yaml_key(fl.name)
            where = f"{prefix}{k}"
            index.setdefault(k, []).append(where)
            for sub in _dataclasses_in(_hints(cls)[fl.name]):
                walk(sub, where + ".")
    walk(schema.Spec, "")
    for kind, cls in POSITION_KINDS.items():
        for fl in dataclasses.fields(cls):
            index.setdefault(fl.name, []).append(f"attention.<local|global>.position (kind {kind})")
    return index


def _dataclasses_in(tp: Any) -> list[type]:
    if dataclasses.is_dataclass(tp):
        return [tp]
    return [c for a in typing.get_args(tp) for c in _dataclasses_in(a)]


class _Converter:
    def __init__(self, origin: Origin):
        self.origin = origin
        self.problems: list[SpecError] = []   # one per bad key; the rest of the spec is still converted

    def error(self, path: tuple, message: str) -> SpecError:
        return SpecError(self.origin.file_of(path), dotted(path) or None, message)

    # ------------------------------------------------------------------ dispatch on the annotation
    def value(self, value: Any, tp: Any, path: tuple) -> Any:
        origin = typing.get_origin(tp)
        if tp is Any:
            return value
        if tp is schema.PositionKind:
            return self.position(value, path)
        if origin in (Union, types.UnionType):
            return self.union(value, tp, path)
        if origin is Literal:
            return self.literal(value, typing.get_args(tp), path)
        if dataclasses.is_dataclass(tp):
            return self.dataclass(value, tp, path)
        if origin is tuple:
            return self.sequence(value, typing.get_args(tp), path)
        if origin is dict or tp is dict:
            if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
                raise self.error(path, f"expected a mapping of option names to values, got {_show(value)}")
            return dict(value)
        if tp is bool:
            if not isinstance(value, bool):
                raise self.error(path, f"expected true or false, got {_show(value)}")
            return value
        if tp is int:
            if isinstance(value, bool) or not isinstance(value, int):
                hint = " (write it without a decimal point)" if isinstance(value, float) and value.is_integer() else ""
                raise self.error(path, f"expected an integer, got {_show(value)}{hint}")
            return value
        if tp is float:
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise self.error(path, f"expected a number, got {_show(value)}")
            return float(value)
        if tp is str:
            if not isinstance(value, str):
                raise self.error(path, f"expected a string, got {_show(value)}; quote it if it should be text")
            return value
        raise TypeError(f"spec.convert: unsupported annotation {tp!r} at {dotted(path)}")  # schema bug, not user input

    def union(self, value: Any, tp: Any, path: tuple) -> Any:
        args = typing.get_args(tp)
        if value is None:
            if type(None) in args:
                return None
            raise self.error(path, "must not be null; give a value or delete the key to take the default")
        members = [a for a in args if a is not type(None)]
        if len(members) == 1:
            return self.value(value, members[0], path)
        raise TypeError(f"spec.convert: untagged union {tp!r} at {dotted(path)}")

    def literal(self, value: Any, choices: tuple, path: tuple) -> Any:
        if value in choices and type(value) is type(choices[0]):
            return value
        msg = f"expected one of {', '.join(map(str, choices))}; got {_show(value)}"
        if isinstance(value, str):
            close = difflib.get_close_matches(value, [str(c) for c in choices], n=1)
            if close:
                msg += f" - did you mean {close[0]!r}?"
        raise self.error(path, msg)

    def sequence(self, value: Any, args: tuple, path: tuple) -> tuple:
        if not isinstance(value, (list, tuple)):
            raise self.error(path, f"expected a list, got {_show(value)}")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(self.value(v, args[0], path + (i,)) for i, v in enumerate(value))
        if len(value) != len(args):
            raise self.error(path, f"expected a list of {len(args)} values, got {len(value)}: {_show(value)}")
        return tuple(self.value(v, a, path + (i,)) for i, (v, a) in enumerate(zip(value, args, strict=False)))

    def position(self, value: Any, path: tuple) -> Any:
        if isinstance(value, str):
            value = {"kind": value}
        if not isinstance(value, dict):
            raise self.error(path, f"expected a position mapping like {{kind: grape-m}}, got {_show(value)}")
        kind = value.get("kind")
        if not isinstance(kind, str) or kind not in POSITION_KINDS:
            msg = f"position kind must be one of {', '.join(POSITION_KINDS)}; got {_show(kind)}"
            close = difflib.get_close_matches(kind, list(POSITION_KINDS), n=1) if isinstance(kind, str) else []
            if close:
                msg += f" - did you mean {close[0]!r}?"
            raise self.error(path + ("kind",), msg)
        cls = POSITION_KINDS[kind]
        own = {fl.name for fl in dataclasses.fields(cls)}
        for k in value:
            if k not in own:
                having = [kd for kd, c in POSITION_KINDS.items() if k in {fl.name for fl in dataclasses.fields(c)}]
                if having:
                    raise self.error(path + (k,), f"`{k}` does not apply to position kind {kind} (its keys: "
                                                  f"{', '.join(sorted(own))}); it belongs to kind "
                                                  f"{' / '.join(having)}: remove it or change `kind`")
        return self.dataclass(value, cls, path)

    def dataclass(self, value: Any, cls: type, path: tuple) -> Any:
        if not isinstance(value, dict):
            raise self.error(path, f"expected a section (a mapping of keys to values), got {_show(value)}")
        fields = {yaml_key(fl.name): fl for fl in dataclasses.fields(cls)}
        kwargs = {}
        for key, v in value.items():
            try:
                if not isinstance(key, str):
                    raise self.error(path, f"keys must be strings, got {_show(key)}")
                if key not in fields:
                    raise self.error(path + (key,), self.unknown(key, list(fields), path))
                default = _field_default(fields[key])
                if isinstance(v, dict) and dataclasses.is_dataclass(default):
                    v = deep_merge(to_dict(default), v, key)
                kwargs[fields[key].name] = self.value(v, _hints(cls)[fields[key].name], path + (key,))
            except SpecError as e:   # reported with the others; the key keeps its default meanwhile
                self.problems.append(e)
        return cls(**kwargs)

    @staticmethod
    def unknown(key: str, valid: list[str], path: tuple) -> str:
        section = dotted(path) or "the top level"
        msg = f"unknown key `{key}` in {section}"
        close = difflib.get_close_matches(key, valid, n=1, cutoff=0.6)
        if close:
            msg += f" - did you mean `{close[0]}`?"
        else:
            elsewhere = _key_index().get(key)
            if elsewhere:
                msg += f"; `{key}` is a key of {', '.join(elsewhere[:3])}"
        return msg + f" (valid keys: {', '.join(valid)})"


def _field_default(fl: dataclasses.Field) -> Any:
    if fl.default is not dataclasses.MISSING:
        return fl.default
    if fl.default_factory is not dataclasses.MISSING:
        return fl.default_factory()
    return None


def _show(value: Any) -> str:
    if isinstance(value, str):
        return f"the string {value!r}"
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, list):
        return f"a list {value!r}" if len(repr(value)) < 60 else "a list"
    return repr(value)


def from_dict(data: Any, origin: Origin) -> schema.Spec:
    """Typed ``Spec`` from a merged raw mapping (no cross-field validation: see spec.validate).

    Raises ``SpecProblems`` listing every unknown key and every value of the wrong type."""
    conv = _Converter(origin)
    spec = conv.dataclass(data if data is not None else {}, schema.Spec, ())
    if conv.problems:
        raise SpecProblems(conv.problems)
    return spec


def to_dict(obj: Any) -> Any:
    """The YAML-shaped mapping of a dataclass tree (``global_`` -> ``global``, tuples -> lists)."""
    if dataclasses.is_dataclass(obj):
        return {yaml_key(fl.name): to_dict(getattr(obj, fl.name)) for fl in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    return obj
