"""Where each value of a merged spec came from, so an error names the file that wrote it.

A spec can be spread over several files (``extends:``) and ``--set`` overrides. ``Origin`` maps
key paths (tuples of YAML key names, e.g. ``("attention", "global", "window")``) to the label
of the last source that wrote them, and to when it wrote them (parents are recorded before the
files that extend them, ``--set`` last). A path nobody wrote (a default) is charged to the
nearest written ancestor, else to the top file.

``latest(paths)``: of several keys that break one rule together (``moe.top_k`` and
``moe.router.group_topk``), the one written last: the value the user most recently changed, so the
error blames that key and the file or ``--set`` that wrote it.
"""

from __future__ import annotations

from typing import Any

__all__ = ["Origin", "dotted"]


def dotted(path: tuple) -> str:
    return ".".join(str(p) for p in path)


class Origin:
    def __init__(self, top: str):
        self.top = top
        self._by_path: dict[tuple, tuple[str, int]] = {}   # path -> (label, write number)
        self._writes = 0

    def record(self, data: Any, label: str, prefix: tuple = ()) -> None:
        """Charge every key path in ``data`` (a parsed YAML mapping) to ``label``."""
        self._writes += 1
        self._record(data, label, prefix, self._writes)

    def _record(self, data: Any, label: str, prefix: tuple, n: int) -> None:
        if isinstance(data, dict):
            for k, v in data.items():
                self._by_path[prefix + (k,)] = (label, n)
                self._record(v, label, prefix + (k,), n)

    def _nearest(self, path: tuple) -> tuple[str, int] | None:
        for n in range(len(path), 0, -1):
            hit = self._by_path.get(tuple(path[:n]))
            if hit is not None:
                return hit
        return None

    def file_of(self, path: tuple) -> str:
        hit = self._nearest(path)
        return hit[0] if hit is not None else self.top

    def latest(self, paths: tuple[tuple, ...]) -> tuple:
        """The path written last; a default (a path nobody wrote) never wins; the first of them on a tie."""
        return max(paths, key=lambda p: self._by_path.get(tuple(p), ("", 0))[1])
