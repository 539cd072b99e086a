"""Where each value of a merged spec came from, so an error names the file that wrote it.

A spec can be spread over several files (``extends:``) and ``--set`` overrides. ``Origin`` maps
key paths (tuples of YAML key names, e.g. ``("attention", "global", "window")``) to the label
of the last source that wrote them. A path nobody wrote (a default) is charged to the nearest
written ancestor, else to the top file.
"""

from __future__ import annotations

from typing import Any

__all__ = ["Origin", "dotted"]


def dotted(path: tuple) -> str:
    return ".".join(str(p) for p in path)


class Origin:
    def __init__(self, top: str):
        self.top = top
        self._by_path: dict[tuple, str] = {}

    def record(self, data: Any, label: str, prefix: tuple = ()) -> None:
        """Charge every key path in ``data`` (a parsed YAML mapping) to ``label``."""
        if isinstance(data, dict):
            for k, v in data.items():
                self._by_path[prefix + (k,)] = label
                self.record(v, label, prefix + (k,))

    def file_of(self, path: tuple) -> str:
        for n in range(len(path), 0, -1):
            label = self._by_path.get(tuple(path[:n]))
            if label is not None:
                return label
        return self.top
