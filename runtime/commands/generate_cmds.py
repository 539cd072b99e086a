"""`grapefx generate SOURCE [--prompt TEXT] [--tokens N] [--temperature T] [--top-k K] [--seed S] [--tokenizer FILE] [--stats]`.

SOURCE is a run folder (its newest complete checkpoint) or an export folder (`grapefx export`).
Decoding is eager with per-layer KV caches (`runtime/generate.py`); the prompt and the text after
it are printed to stdout, `--stats` adds cache and speed figures on stderr. Without --prompt the
text starts a new document (after the end-of-document id, as in training).

A model trained on pre-tokenised data (`data.tokenizer.kind: pretokenized`) has no tokenizer:
`--tokenizer FILE` (the tokenizer.json that made the data) reads the prompt and writes text;
without it a text prompt is refused and, with no prompt, the sampled token ids are printed.
"""

from __future__ import annotations

import argparse
import sys


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "generate", help="sample text from a trained run or an export folder",
        description="Load SOURCE (a run folder: its newest complete checkpoint; or an export folder), feed the "
                    "prompt after an end-of-document token, and sample up to --tokens tokens with KV caches "
                    "(local layers keep the last W tokens, global layers all of them). Prints the new text.")
    p.add_argument("source", metavar="SOURCE", help="run folder (grapefx train --out) or export folder")
    p.add_argument("--prompt", default="", help="the text to continue (default: none, a new document)")
    p.add_argument("--tokens", type=int, default=200, metavar="N", help="new tokens to draw at most (default 200)")
    p.add_argument("--temperature", type=float, default=1.0, metavar="T", help="sampling temperature; 0 = greedy "
                                                                              "(default 1.0)")
    p.add_argument("--top-k", type=int, default=None, metavar="K", help="sample among the K most likely tokens only")
    p.add_argument("--seed", type=int, default=0, metavar="S", help="sampling seed (default 0)")
    p.add_argument("--tokenizer", metavar="FILE", help="a tokenizer.json to read the prompt and write text with "
                                                       "(for a model trained on pretokenized data)")
    p.add_argument("--stats", action="store_true", help="also print KV-cache bytes per token and speed (stderr)")
    p.set_defaults(func=_generate)


def _generate(args: argparse.Namespace) -> int:
    from runtime.device import pick_device
    from runtime.generate import Decoder, generate_text, sample
    from runtime.trained import load_trained
    from spec.derive import kv_cache
    from spec.errors import GrapefxError

    if args.tokens < 0:
        raise GrapefxError(f"--tokens: {args.tokens} is negative; give the number of new tokens, e.g. 200")
    if args.temperature < 0:
        raise GrapefxError(f"--temperature: {args.temperature} is negative; use 0 (greedy) or more (1.0 = as trained)")
    if args.top_k is not None and args.top_k < 1:
        raise GrapefxError(f"--top-k: {args.top_k} keeps no token; use K >= 1 or leave it out")
    trained = load_trained(args.source, pick_device())
    tokenizer = _tokenizer(args, trained)
    decoder = Decoder(trained.model)
    if tokenizer.kind == "pretokenized":                          # no text: print the sampled ids
        ids = sample(decoder, [tokenizer.eod_id], tokens=args.tokens, temperature=args.temperature,
                     top_k=args.top_k, seed=args.seed, vocab_size=tokenizer.vocab_size, stop=tokenizer.eod_id)
        print(" ".join(map(str, ids)))
        return 0
    g = generate_text(decoder, tokenizer, args.prompt, tokens=args.tokens, temperature=args.temperature,
                      top_k=args.top_k, seed=args.seed)
    print(args.prompt + g.text)
    if args.stats:
        fed = g.prompt_tokens + g.new_tokens                     # every drawn token is fed back
        dtype = str(trained.model.compute_dtype).removeprefix("torch.")
        derived = kv_cache(trained.spec, fed)
        say = lambda line: print(line, file=sys.stderr)       # noqa: E731
        say(f"source: {trained.source} (step {trained.step})")
        say(f"tokens: {g.prompt_tokens} prompt (with the end-of-document id) + {g.new_tokens} new"
            + (" (stopped at end-of-document)" if g.stopped else "")
            + f", {g.new_tokens / max(g.seconds, 1e-9):.1f} tokens/s incl. the prompt, eager")
        say(f"KV cache after {fed} tokens: {g.cache_bytes:,} B ({dtype}), {g.cache_bytes / max(fed, 1):,.1f} B/token; "
            f"spec.derive at context {fed} ({trained.spec.precision.compute}): {derived.total_bytes:,} B, "
            f"{derived.bytes_per_token:,.1f} B/token")
        per = ", ".join(f"{layer.index}:{layer.kind[0]}{layer.tokens}" for layer in derived.layers)
        say(f"tokens cached per layer (l = local ring of W, g = global): {per}")
    return 0


def _tokenizer(args: argparse.Namespace, trained):
    """The run's tokenizer, or --tokenizer FILE; a pretokenized run without one takes no text prompt."""
    from runtime.data import BPETokenizer
    from spec.errors import GrapefxError

    if args.tokenizer:
        tok = BPETokenizer.load(args.tokenizer, key="--tokenizer")
        if tok.vocab_size > trained.spec.model.vocab_size:
            raise GrapefxError(f"--tokenizer: {args.tokenizer} has {tok.vocab_size} ids but the model's vocabulary "
                               f"is {trained.spec.model.vocab_size}; give the tokenizer that made the training data")
        return tok
    tok = trained.tokenizer
    if tok.kind == "pretokenized":
        if args.prompt:
            raise GrapefxError(f"--prompt: {args.source} was trained on pre-tokenised data (data.tokenizer.kind: "
                               "pretokenized), so it has no tokenizer to read text; pass --tokenizer FILE (the "
                               "tokenizer.json that made the data), or leave --prompt out to print sampled token ids")
        if tok.eod_id is None:
            raise GrapefxError(f"{args.source}: the data has no end-of-document id (data.tokenizer.eod_id is null) to "
                               "start a sample from; pass --tokenizer FILE and --prompt TEXT")
    return tok
