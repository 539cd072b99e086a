"""`prepare(spec)`: corpus -> tokenizer -> train/valid Megatron indexed datasets, cached.

Steps, for `spec.data`:
1. Resolve each source (`runtime.data.sources`) and the tokenizer settings; fail early if
   `model.vocab_size` cannot hold the tokenizer's ids.
2. The cache key is a hash of: this format's version, the tokenizer settings (kind, BPE size, or
   the sha256 of a given tokenizer.json), `valid_fraction`, and per source its kind, absolute
   path and (relative name, size, mtime) of every file (the release id for built-ins). Blend
   weights and seq_len are not in it: they act at sampling time. The data lives in
   CACHE/data/<key>/; if that folder exists it is complete (it is built in a temporary folder and
   renamed), so a re-run only reopens it.
3. Validation split, per source, by whole documents: n_valid = max(1, round(fraction * n)) of
   the n non-empty documents (so fraction 0 still holds out one: evaluation needs data), chosen
   by a fixed-seed permutation (seed 0), so the split depends only on n and never on the run
   seed; each side keeps at least one document.
4. The BPE (if trained) sees only the training documents.
5. Each document is encoded, followed by the end-of-document id, into CACHE/data/<key>/
   {train,valid}-<d>.bin/.idx for source d (Megatron's token dtype rule). Megatron sources are
   copied document by document (EOD appended where a document does not already end with it).
6. manifest.json records the counts, dtype, tokenizer and the held-out document indices.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from runtime.data.blend import Split
from runtime.data.cache import atomic_dir, cache_root, say
from runtime.data.errors import DataError
from runtime.data.indexed import IndexedDataset, IndexedDatasetWriter, optimal_dtype
from runtime.data.sources import ResolvedSource, iter_texts, resolve_source
from runtime.data.tokenizer import BPETokenizer, ByteTokenizer

__all__ = ["PreparedData", "prepare", "FORMAT"]

FORMAT = 1  # bump when tokenisation or layout changes, so old caches are not reused
SPLIT_SEED = 0


@dataclass(frozen=True)
class PreparedData:
    tokenizer: ByteTokenizer | BPETokenizer
    train: Split
    valid: Split
    folder: Path
    manifest: dict


def prepare(spec, *, progress: bool = True) -> PreparedData:
    """Prepare `spec.data` (idempotent, cached) and open it. See the module docstring."""
    data = spec.data
    if not 0.0 <= data.valid_fraction < 1.0:
        raise DataError(f"data.valid_fraction: {data.valid_fraction} must be in [0, 1); the validation split "
                        "holds out at least one whole document of each source (0 = just one)")
    sources = [resolve_source(i, s.path) for i, s in enumerate(data.sources)]
    tok_key, tokenizer = _tokenizer_settings(data.tokenizer)
    _check_vocab(spec, tok_key["vocab_size"] if tokenizer is None else tokenizer.vocab_size, tok_key)
    if tok_key["kind"] == "bpe" and "vocab_size" in tok_key:
        for s in sources:
            if s.kind == "megatron":
                raise DataError(f"data.sources[{s.index}].path: {s.name} is already tokenized; give the tokenizer "
                                "that made it as data.tokenizer.path instead of training a new BPE")
    key_doc = {"format": FORMAT, "tokenizer": tok_key, "valid_fraction": data.valid_fraction,
               "sources": [[s.kind, str(s.path.resolve()) if s.path else s.name, s.fingerprint] for s in sources]}
    key = hashlib.sha256(json.dumps(key_doc, sort_keys=True).encode()).hexdigest()[:16]
    folder = cache_root(data.cache_dir) / "data" / key
    if folder.is_dir():
        say(f"using prepared data in {folder}", progress)
    else:
        say(f"preparing data into {folder}", progress)
        with atomic_dir(folder) as tmp:
            _build(tmp, key, sources, tokenizer, tok_key, data, progress)
    return _open(folder, spec)


def _tokenizer_settings(tok) -> tuple[dict, BPETokenizer | ByteTokenizer | None]:
    """(settings that identify the tokenizer, the tokenizer if it exists already)."""
    if tok.kind == "byte":
        if tok.path is not None or tok.vocab_size is not None:
            raise DataError("data.tokenizer: path and vocab_size apply to kind: bpe only; remove them or set kind: bpe")
        return {"kind": "byte"}, ByteTokenizer()
    if (tok.path is None) == (tok.vocab_size is None):
        raise DataError("data.tokenizer: with kind: bpe set exactly one of vocab_size (train a BPE of that size, "
                        "e.g. 4096) or path (use an existing tokenizer.json)")
    if tok.vocab_size is not None:
        return {"kind": "bpe", "vocab_size": tok.vocab_size}, None
    loaded = BPETokenizer.load(tok.path)
    digest = hashlib.sha256(Path(tok.path).expanduser().read_bytes()).hexdigest()
    return {"kind": "bpe", "sha256": digest}, loaded


def _check_vocab(spec, needed: int, tok_key: dict) -> None:
    if spec.model.vocab_size < needed:
        what = {"byte": "the byte tokenizer (256 bytes + end-of-document)"}.get(tok_key["kind"], "the BPE tokenizer")
        raise DataError(f"model.vocab_size: {spec.model.vocab_size} is smaller than the {needed} ids of {what}; "
                        f"set model.vocab_size to at least {needed}")


def _documents(source: ResolvedSource, cache: Path, progress: bool):
    """The source's non-empty documents: str for text sources, token arrays for Megatron ones."""
    if source.kind == "megatron":
        ds = IndexedDataset(source.path)
        for k in range(ds.num_docs):
            doc = ds.document(k)
            if len(doc):
                yield doc
    else:
        for text in iter_texts(source, cache, progress=progress):
            if text:
                yield text


def _valid_mask(source: ResolvedSource, n: int, fraction: float) -> np.ndarray:
    where = f"data.sources[{source.index}] ({source.name})"
    if n == 0:
        raise DataError(f"{where}: empty corpus: no non-empty documents")
    n_valid = max(1, round(fraction * n))
    if n < 2:
        raise DataError(f"{where}: only 1 document; the validation split holds out whole documents, so each source "
                        "needs at least 2 (split the text into several .txt files in a folder, or use JSONL with "
                        "one document per line)")
    if n_valid >= n:
        raise DataError(f"data.valid_fraction: {fraction} of the {n} documents of {source.name} leaves none for "
                        "training; lower it")
    mask = np.zeros(n, dtype=bool)
    mask[np.random.Generator(np.random.PCG64(SPLIT_SEED)).permutation(n)[:n_valid]] = True
    return mask


def _build(tmp: Path, key: str, sources: list[ResolvedSource], tokenizer, tok_key: dict, data,
           progress: bool) -> None:
    cache = cache_root(data.cache_dir)
    masks = [_valid_mask(s, sum(1 for _ in _documents(s, cache, progress)), data.valid_fraction) for s in sources]
    if tokenizer is None:  # train a BPE on the training documents of every source
        say(f"training a byte-level BPE of {tok_key['vocab_size']} ids on the training documents", progress)
        texts = (t for s, m in zip(sources, masks) for t, v in zip(_documents(s, cache, False), m) if not v)
        tokenizer = BPETokenizer.train(texts, tok_key["vocab_size"], progress=progress)
    if isinstance(tokenizer, BPETokenizer):
        tokenizer.save(tmp / "tokenizer.json")
    dtype = optimal_dtype(tokenizer.vocab_size)
    eod = np.asarray([tokenizer.eod_id])
    entries = []
    for s, mask in zip(sources, masks):
        if s.kind == "megatron":
            IndexedDataset(s.path, vocab_size=tokenizer.vocab_size)  # every id must fit the tokenizer
        with IndexedDatasetWriter(tmp / f"train-{s.index}", dtype) as wt, \
                IndexedDatasetWriter(tmp / f"valid-{s.index}", dtype) as wv:
            for doc, is_valid in zip(_documents(s, cache, progress), mask):
                ids = tokenizer.encode_array(doc) if isinstance(doc, str) else np.asarray(doc)
                if not (s.kind == "megatron" and ids[-1] == tokenizer.eod_id):
                    ids = np.concatenate([ids, eod])
                (wv if is_valid else wt).add(ids)
        entries.append({"path": s.name, "kind": s.kind, "docs": {"train": wt.num_docs, "valid": wv.num_docs},
                        "tokens": {"train": wt.num_tokens, "valid": wv.num_tokens},
                        "valid_docs": np.flatnonzero(mask).tolist()})
        say(f"source {s.index} ({s.name}): {wt.num_docs} + {wv.num_docs} documents, "
            f"{wt.num_tokens:,} + {wv.num_tokens:,} tokens (train + valid)", progress)
    manifest = {"format": FORMAT, "key": key, "dtype": dtype.name, "sources": entries,
                "tokenizer": {"kind": tokenizer.kind, "vocab_size": tokenizer.vocab_size, "eod_id": tokenizer.eod_id,
                              "file": "tokenizer.json" if tokenizer.kind == "bpe" else None}}
    (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")


def _open(folder: Path, spec) -> PreparedData:
    manifest_path = folder / "manifest.json"
    try:
        manifest = json.loads(manifest_path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise DataError(f"{manifest_path}: unreadable ({e}); delete {folder} to prepare the data again") from e
    t = manifest["tokenizer"]
    tokenizer = BPETokenizer.load(folder / t["file"]) if t["kind"] == "bpe" else ByteTokenizer()
    _check_vocab(spec, tokenizer.vocab_size, t)
    weights = [s.weight for s in spec.data.sources]
    names = [s["path"] for s in manifest["sources"]]
    splits = []
    for split in ("train", "valid"):
        parts = [IndexedDataset(folder / f"{split}-{d}", vocab_size=tokenizer.vocab_size) for d in range(len(names))]
        splits.append(Split(split, parts, weights, names))
    return PreparedData(tokenizer, splits[0], splits[1], folder, manifest)
