"""`prepare(spec)`: corpus -> tokenizer -> train/valid Megatron indexed datasets, cached.

Steps, for `spec.data`:
1. Resolve each source (`runtime.data.sources`) and the tokenizer settings; fail early if
   `model.vocab_size` cannot hold the tokenizer's ids.
2. The cache key is a hash of: this format's version, the tokenizer settings (kind, BPE size, or
   the sha256 of a given tokenizer.json; pretokenized: model.vocab_size and eod_id),
   `valid_fraction`, and per source its kind, split rule, absolute path and (relative name, size,
   mtime) of every file (the release id for built-ins). Blend weights and seq_len are not in it:
   they act at sampling time. The data lives in CACHE/data/<key>/; if that folder exists it is
   complete (it is built in a temporary folder and renamed), so a re-run only reopens it.
3. Validation split, per source, by its `split` rule (`runtime.data.split`): whole documents,
   the tail, or documents cut from the text at blank lines / a separator / every N characters.
4. The BPE (if trained) sees only the training side.
5. Each document is encoded, followed by the end-of-document id, into CACHE/data/<key>/
   {train,valid}-<d>.bin/.idx for source d (Megatron's token dtype rule). Megatron sources are
   copied document by document (EOD appended where a document does not already end with it;
   pretokenized data without an eod_id is copied as stored), every id checked against the
   vocabulary first.
6. manifest.json records the counts, dtype, tokenizer, each source's rule (and a sentence saying
   what was held out) and the held-out document indices.
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
from runtime.data.split import TEXT_RULES, cut, effective_rule, plan
from runtime.data.tokenizer import BPETokenizer, ByteTokenizer, PretokenizedTokenizer, open_tokenizer

__all__ = ["PreparedData", "prepare", "FORMAT"]

FORMAT = 1  # bump when tokenisation or layout changes, so old caches are not reused


@dataclass(frozen=True)
class PreparedData:
    tokenizer: ByteTokenizer | BPETokenizer | PretokenizedTokenizer
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
    tok_key, tokenizer = _tokenizer_settings(data.tokenizer, spec.model.vocab_size)
    _check_vocab(spec, tok_key["vocab_size"] if tokenizer is None else tokenizer.vocab_size, tok_key)
    for s, cfg in zip(sources, data.sources):
        where = f"data.sources[{s.index}]"
        if tok_key["kind"] == "bpe" and "vocab_size" in tok_key and s.kind == "megatron":
            raise DataError(f"{where}.path: {s.name} is already tokenized; give the tokenizer that made it as "
                            "data.tokenizer.path instead of training a new BPE (or data.tokenizer.kind: "
                            "pretokenized when there is no tokenizer.json)")
        if tok_key["kind"] == "pretokenized" and s.kind != "megatron":
            raise DataError(f"{where}.path: {s.name} is text, but data.tokenizer.kind is pretokenized (token ids "
                            "only); give a Megatron PREFIX.bin/.idx, or set data.tokenizer.kind: byte or bpe")
        if s.kind == "megatron" and cfg.split in TEXT_RULES:
            raise DataError(f"{where}.split: {cfg.split} cuts text, but {s.name} holds token ids; use documents, "
                            "tail or auto")
    key_doc = {"format": FORMAT, "tokenizer": tok_key, "valid_fraction": data.valid_fraction,
               "sources": [[s.kind, str(s.path.resolve()) if s.path else s.name, s.fingerprint,
                            [cfg.split, cfg.separator, cfg.chunk_chars]] for s, cfg in zip(sources, data.sources)]}
    key = hashlib.sha256(json.dumps(key_doc, sort_keys=True).encode()).hexdigest()[:16]
    folder = cache_root(data.cache_dir) / "data" / key
    if folder.is_dir():
        say(f"using prepared data in {folder}", progress)
    else:
        say(f"preparing data into {folder}", progress)
        with atomic_dir(folder) as tmp:
            _build(tmp, key, sources, tokenizer, tok_key, data, progress)
    return _open(folder, spec)


def _tokenizer_settings(tok, model_vocab: int) -> tuple[dict, BPETokenizer | ByteTokenizer | PretokenizedTokenizer | None]:
    """(settings that identify the tokenizer, the tokenizer if it exists already)."""
    if tok.kind == "pretokenized":
        return ({"kind": "pretokenized", "vocab_size": model_vocab, "eod_id": tok.eod_id},
                PretokenizedTokenizer(model_vocab, tok.eod_id))
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


def _documents(source: ResolvedSource, cfg, cache: Path, progress: bool):
    """The source's non-empty documents after its cutting rule: str for text, token arrays for Megatron."""
    if source.kind == "megatron":
        ds = IndexedDataset(source.path)
        for k in range(ds.num_docs):
            doc = ds.document(k)
            if len(doc):
                yield doc
    else:
        rule = cfg.split if cfg.split in TEXT_RULES else None
        for text in iter_texts(source, cache, progress=progress):
            yield from cut(text, rule, cfg.separator, cfg.chunk_chars)


def _plan(source: ResolvedSource, cfg, cache: Path, fraction: float, progress: bool):
    lengths = [len(d) for d in _documents(source, cfg, cache, progress)]
    rule = cfg.split
    if rule == "auto":                   # one document as stored (a single text file): hold out its tail
        rule = effective_rule(rule, len(lengths))
    unit = "tokens" if source.kind == "megatron" else "characters"
    return plan(rule, lengths, fraction, f"data.sources[{source.index}] ({source.name})", unit)


def _build(tmp: Path, key: str, sources: list[ResolvedSource], tokenizer, tok_key: dict, data,
           progress: bool) -> None:
    cache = cache_root(data.cache_dir)
    cfgs = data.sources
    plans = [_plan(s, cfg, cache, data.valid_fraction, progress) for s, cfg in zip(sources, cfgs)]
    if tokenizer is None:  # train a BPE on the training side of every source
        say(f"training a byte-level BPE of {tok_key['vocab_size']} ids on the training documents", progress)
        texts = (t for s, cfg, pl in zip(sources, cfgs, plans)
                 for t, v in pl.assign(_documents(s, cfg, cache, False)) if not v)
        tokenizer = BPETokenizer.train(texts, tok_key["vocab_size"], progress=progress)
    if isinstance(tokenizer, BPETokenizer):
        tokenizer.save(tmp / "tokenizer.json")
    dtype = optimal_dtype(tokenizer.vocab_size)
    eod = tokenizer.eod_id
    entries = []
    for s, cfg, pl in zip(sources, cfgs, plans):
        if s.kind == "megatron":      # every id must fit the vocabulary
            fix = ("set model.vocab_size to at least {need} (the data's largest id + 1)"
                   if tokenizer.kind == "pretokenized" else None)
            IndexedDataset(s.path).check_vocab(tokenizer.vocab_size, fix=fix)
        with IndexedDatasetWriter(tmp / f"train-{s.index}", dtype) as wt, \
                IndexedDatasetWriter(tmp / f"valid-{s.index}", dtype) as wv:
            for doc, is_valid in pl.assign(_documents(s, cfg, cache, progress)):
                ids = tokenizer.encode_array(doc) if isinstance(doc, str) else np.asarray(doc)
                if eod is not None and not (s.kind == "megatron" and len(ids) and ids[-1] == eod):
                    ids = np.concatenate([ids, np.asarray([eod])])
                if len(ids):
                    (wv if is_valid else wt).add(ids)
        held = np.flatnonzero(pl.valid_mask).tolist() if pl.valid_mask is not None else []
        entries.append({"path": s.name, "kind": s.kind, "split": pl.rule, "valid": pl.says,
                        "docs": {"train": wt.num_docs, "valid": wv.num_docs},
                        "tokens": {"train": wt.num_tokens, "valid": wv.num_tokens}, "valid_docs": held})
        say(f"source {s.index} ({s.name}): {wt.num_docs} + {wv.num_docs} documents, "
            f"{wt.num_tokens:,} + {wv.num_tokens:,} tokens (train + valid); {pl.says}", progress)
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
    tokenizer = open_tokenizer(t, folder)
    _check_vocab(spec, tokenizer.vocab_size, t)
    weights = [s.weight for s in spec.data.sources]
    names = [s["path"] for s in manifest["sources"]]
    splits = []
    for split in ("train", "valid"):
        parts = [IndexedDataset(folder / f"{split}-{d}", vocab_size=tokenizer.vocab_size) for d in range(len(names))]
        splits.append(Split(split, parts, weights, names))
    return PreparedData(tokenizer, splits[0], splits[1], folder, manifest)
