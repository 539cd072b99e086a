"""User-facing errors.

Every error a user can cause (a spec, a recipe, a data file, a checkpoint) is a
``GrapefxError``. The command line prints its message as the first line of stderr and exits
with status 2, never a traceback. Messages name the file, the key, the rule and the fix.
"""

from __future__ import annotations


class GrapefxError(Exception):
    """An error caused by the user's input, with a message that says how to fix it."""

    exit_code = 2


class SpecError(GrapefxError):
    """A spec (YAML) or recipe error: ``FILE: key.path: message``."""

    def __init__(self, file: str | None, key: str | None, message: str):
        self.file, self.key, self.message = file, key, message
        super().__init__(self.format())

    def format(self) -> str:
        where = [p for p in (self.file or "<spec>", self.key) if p]
        return ": ".join(where + [self.message])


class SpecProblems(SpecError):
    """One or more problems of one spec; ``str()`` lists them, one per line, first problem first."""

    def __init__(self, problems: list[SpecError]):
        self.problems = problems
        first = problems[0]
        super().__init__(first.file, first.key, first.message)

    def format(self) -> str:
        return "\n".join(p.format() for p in self.problems)
