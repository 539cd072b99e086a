"""Megatron-LM per-layer list patterns, parsed safely (never ``eval``) and written back.

Megatron's ``--no-rope-freq``, ``--window-attn-skip-freq`` and ``--moe-layer-freq`` take either
an integer or a Python list expression such as ``([0]*3+[1])*3``; Megatron checks the characters
(digits and ``[ ] ( ) , + *``, no spaces) and then calls ``eval``. We accept the same language
with a small recursive-descent parser over exactly those characters:

    expr   := term ('+' term)*
    term   := factor ('*' factor)*
    factor := INT | '[' [expr (',' expr)* [',']] ']' | '(' expr ')'

with Python's meaning: ``list + list`` concatenates, ``list * int`` (or ``int * list``) repeats,
``int + int`` and ``int * int`` are arithmetic. The result must be a list of integers. Anything
else (a letter, a space, ``__import__``) is rejected at the first bad character. The output is
capped at ``MAX_LEN`` entries so ``[0]*10**9``-style inputs cannot exhaust memory.
"""

from __future__ import annotations

from spec.errors import SpecError

__all__ = ["parse_pattern", "parse_int_or_pattern", "format_pattern", "MAX_LEN", "RECIPE"]

MAX_LEN = 100_000
_MAX_DEPTH = 64
_ALLOWED = set("0123456789[](),+*")
RECIPE = "<megatron flags>"


class _Parser:
    def __init__(self, text: str, flag: str):
        self.text, self.flag, self.i, self.depth = text, flag, 0, 0

    def fail(self, msg: str) -> SpecError:
        return SpecError(RECIPE, self.flag, f"pattern {self.text!r}: {msg}")

    def peek(self) -> str:
        return self.text[self.i] if self.i < len(self.text) else ""

    def eat(self, ch: str) -> None:
        if self.peek() != ch:
            found = repr(self.peek()) if self.peek() else "the end"
            raise self.fail(f"expected {ch!r} at position {self.i + 1}, found {found}")
        self.i += 1

    def expr(self) -> int | list[int]:
        value = self.term()
        while self.peek() == "+":
            self.i += 1
            rhs = self.term()
            if isinstance(value, list) != isinstance(rhs, list):
                raise self.fail(f"cannot add a list and a number (before position {self.i + 1})")
            if isinstance(value, list) and len(value) + len(rhs) > MAX_LEN:
                raise self.fail(f"longer than {MAX_LEN} entries")
            value = value + rhs
        return value

    def term(self) -> int | list[int]:
        value = self.factor()
        while self.peek() == "*":
            self.i += 1
            rhs = self.factor()
            if isinstance(value, list) and isinstance(rhs, list):
                raise self.fail(f"cannot multiply two lists (before position {self.i + 1})")
            seq, n = (value, rhs) if isinstance(value, list) else (rhs, value)
            if isinstance(seq, list):
                if len(seq) * max(n, 0) > MAX_LEN:
                    raise self.fail(f"longer than {MAX_LEN} entries")
                value = seq * n
            else:
                if value * rhs > MAX_LEN:
                    raise self.fail(f"number {value}*{rhs} is larger than {MAX_LEN}")
                value = value * rhs
        return value

    def factor(self) -> int | list[int]:
        ch = self.peek()
        if ch.isdigit():
            start = self.i
            while self.peek().isdigit():
                self.i += 1
            n = int(self.text[start:self.i])
            if n > MAX_LEN:
                raise self.fail(f"number {n} is larger than {MAX_LEN}")
            return n
        self.depth += 1
        if self.depth > _MAX_DEPTH:
            raise self.fail(f"nested deeper than {_MAX_DEPTH} levels")
        try:
            if ch == "[":
                self.i += 1
                items: list[int] = []
                while self.peek() != "]":
                    item = self.expr()
                    if isinstance(item, list):
                        raise self.fail("list entries must be numbers, not lists")
                    items.append(item)
                    if self.peek() == ",":
                        self.i += 1
                    elif self.peek() != "]":
                        break
                self.eat("]")
                return items
            if ch == "(":
                self.i += 1
                value = self.expr()
                if self.peek() == ",":
                    raise self.fail("a comma inside ( ) makes a tuple, not a list; use [ ] for lists")
                self.eat(")")
                return value
        finally:
            self.depth -= 1
        found = repr(ch) if ch else "the end"
        raise self.fail(f"expected a number, '[' or '(' at position {self.i + 1}, found {found}")


def parse_pattern(text: str, flag: str) -> list[int]:
    """The list a Megatron pattern denotes, e.g. ``([0]*3+[1])*2`` -> [0,0,0,1,0,0,0,1]."""
    bad = [(i, c) for i, c in enumerate(text) if c not in _ALLOWED]
    if bad:
        i, c = bad[0]
        why = ("spaces are not allowed (Megatron rejects them too); write e.g. ([0]*3+[1])*6"
               if c.isspace() else "only digits and [ ] ( ) , + * are allowed; the pattern is parsed, never evaluated")
        raise SpecError(RECIPE, flag, f"pattern {text!r}: character {c!r} at position {i + 1}: {why}")
    p = _Parser(text, flag)
    value = p.expr()
    if p.i != len(text):
        raise p.fail(f"unexpected {text[p.i]!r} at position {p.i + 1}")
    if not isinstance(value, list):
        raise p.fail("a pattern must denote a list (e.g. [1,1,1,0]*6); for the integer form pass the bare number")
    return value


def parse_int_or_pattern(text: str, flag: str) -> int | list[int]:
    """Megatron's ``moe_freq_type`` / ``no_rope_freq_type``: a list pattern if it has '[', else an int."""
    if "[" in text:
        return parse_pattern(text, flag)
    try:
        return int(text)
    except ValueError:
        raise SpecError(RECIPE, flag, f"{text!r} is neither an integer nor a list pattern such as "
                                      "([0]*3+[1])*6") from None


def format_pattern(values: list[int]) -> str:
    """The shortest periodic form: [0,0,0,1]*2 -> '([0]*3+[1])*2'; [1]*24 -> '[1]*24'."""
    n = len(values)
    if n == 0:
        return "[]"
    period = next(p for p in range(1, n + 1) if n % p == 0 and values == values[:p] * (n // p))
    unit, reps = values[:period], n // period
    runs: list[tuple[int, int]] = []
    for v in unit:
        if runs and runs[-1][0] == v:
            runs[-1] = (v, runs[-1][1] + 1)
        else:
            runs.append((v, 1))
    if len(runs) == 1:
        return f"[{runs[0][0]}]*{runs[0][1] * reps}" if runs[0][1] * reps > 1 else f"[{runs[0][0]}]"
    body = "+".join(f"[{v}]*{k}" if k > 1 else f"[{v}]" for v, k in runs)
    return f"({body})*{reps}" if reps > 1 else body
