"""`grapefx generate SOURCE --prompt TEXT [--tokens N] [--temperature T] [--top-k K] [--seed S] [--stats]`.

SOURCE is a run folder (its newest complete checkpoint) or an export folder (`grapefx export`).
Decoding is eager with per-layer KV caches (`runtime/generate.py`); the text after the prompt is
printed to stdout, `--stats` adds cache and speed figures on stderr.
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
    p.add_argument("--prompt", required=True, help="the text to continue")
    p.add_argument("--tokens", type=int, default=200, metavar="N", help="new tokens to draw at most (default 200)")
    p.add_argument("--temperature", type=float, default=1.0, metavar="T", help="sampling temperature; 0 = greedy "
                                                                              "(default 1.0)")
    p.add_argument("--top-k", type=int, default=None, metavar="K", help="sample among the K most likely tokens only")
    p.add_argument("--seed", type=int, default=0, metavar="S", help="sampling seed (default 0)")
    p.add_argument("--stats", action="store_true", help="also print KV-cache bytes per token and speed (stderr)")
    p.set_defaults(func=_generate)


def _generate(args: argparse.Namespace) -> int:
    from runtime.device import pick_device
    from runtime.generate import Decoder, generate_text
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
    decoder = Decoder(trained.model)
    g = generate_text(decoder, trained.tokenizer, args.prompt, tokens=args.tokens, temperature=args.temperature,
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
