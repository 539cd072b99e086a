"""`grapefx data prepare SPEC [--set key=value ...]`: prepare the spec's data now (train does it on demand)."""

from __future__ import annotations

import argparse

from runtime.commands import add_overrides


def register(subparsers) -> None:
    data = subparsers.add_parser("data", help="prepare training data (tokenize, split, cache)")
    actions = data.add_subparsers(dest="data_command", metavar="ACTION")
    actions.required = True
    prep = actions.add_parser(
        "prepare", help="download/read the corpus, tokenize it and write the cached train/valid datasets",
        description="Prepare SPEC's data section: fetch or read the sources, train or load the tokenizer, "
                    "write train/valid Megatron indexed datasets into the cache. A re-run reuses the cache.")
    prep.add_argument("spec", help="the spec YAML file")
    add_overrides(prep, "data.tokenizer.kind=bpe")
    prep.set_defaults(func=_prepare)


def _prepare(args: argparse.Namespace) -> int:
    from runtime.data import prepare
    from spec import load_spec

    spec = load_spec(args.spec, args.overrides)
    prepared = prepare(spec, progress=True)
    tok, train, valid = prepared.tokenizer, prepared.train, prepared.valid
    print(f"data:      {prepared.folder}")
    print(f"documents: {train.num_docs + valid.num_docs} ({train.num_docs} train, {valid.num_docs} valid)")
    print(f"tokens:    {train.num_tokens:,} train, {valid.num_tokens:,} valid")
    for s in prepared.manifest["sources"]:
        print(f"split:     {s['path']}: {s['valid']}")
    print(f"tokenizer: {tok.kind}, vocab {tok.vocab_size} (end-of-document id {tok.eod_id})")
    return 0
