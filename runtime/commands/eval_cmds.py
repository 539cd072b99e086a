"""`grapefx eval SOURCE --out DIR [--contexts 1,2,4] [--data SPEC_OR_PREFIX] [--batches N] ...`.

SOURCE is a run folder (its newest complete checkpoint) or an export folder (`grapefx export`).
Writes DIR/eval.json and DIR/loss_by_position.png (``runtime/evaluation``) and prints the loss at
each context and band. Exit status 2 for a bad input (no checkpoint, a context below 1, a
validation split too small for the rows asked for), with the fix in the message.
"""

from __future__ import annotations

import argparse

from spec.errors import GrapefxError


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "eval", help="loss by token position on fixed rows, at and beyond the training length",
        description="Score rows of max(contexts) x data.seq_len tokens once and report the loss at every position: "
                    "the loss at context c is the mean over positions < c x seq_len of the same rows. Rows are "
                    "distinct windows of the validation split (or of --data), chosen by --seed, never repeated.")
    p.add_argument("source", metavar="RUN|EXPORT", help="run folder (grapefx train --out) or export folder")
    p.add_argument("--out", required=True, metavar="DIR", help="folder for eval.json and loss_by_position.png")
    p.add_argument("--contexts", default="1,2,4", metavar="C,C,...",
                   help="contexts as multiples of data.seq_len, whole numbers >= 1 (default 1,2,4)")
    p.add_argument("--data", metavar="SPEC_OR_PREFIX", help="evaluate on this instead of the validation split: a spec "
                   "(its validation split), a Megatron prefix, a text file, a .jsonl or a folder of .txt files")
    p.add_argument("--batches", type=int, default=8, metavar="N", help="batches of rows (default 8)")
    p.add_argument("--batch-size", type=int, default=None, metavar="B", help="rows per batch (default "
                   "train.micro_batch)")
    p.add_argument("--seed", type=int, default=0, help="which rows (default 0; the same rows for every model)")
    p.add_argument("--buckets", type=int, default=48, metavar="N", help="position buckets, at most (default 48)")
    p.add_argument("--spacing", choices=("log", "linear"), default="log", help="bucket spacing (default log)")
    p.set_defaults(func=_eval)


def parse_contexts(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(c) for c in text.split(","))
    except ValueError:
        raise GrapefxError(f"--contexts: {text!r} is not a list of whole numbers; write e.g. 1,2,4,8") from None
    if not values or min(values) < 1:
        raise GrapefxError(f"--contexts: {text}: every context must be >= 1 (a multiple of the training length "
                           "data.seq_len; 1 = the training length itself), e.g. 1,2,4,8")
    if len(set(values)) != len(values):
        raise GrapefxError(f"--contexts: {text}: a context is listed twice")
    return tuple(sorted(values))


def _eval(args: argparse.Namespace) -> int:
    from runtime.evaluation import EvalSettings, evaluate_folder

    settings = EvalSettings(parse_contexts(args.contexts), args.batches, args.batch_size, args.seed, args.buckets,
                            args.spacing)
    record, paths = evaluate_folder(args.source, settings, args.out, data=args.data)
    s, d = record["settings"], record["data"]
    print(f"{args.source} (step {record['step']}): {d['rows_used']} rows of {s['length']} tokens from {d['label']} "
          f"({d['rows_available']} available), {record['device']} {record['dtype']}; loss in nats/token")
    for c in record["contexts"]:
        print(f"  context {c['context']}x ({c['positions'][1]} tokens): {c['loss']:.4f}   (positions < {c['positions'][1]})")
    for b in record["bands"]:
        print(f"  positions [{b['positions'][0]}, {b['positions'][1]}): {b['loss']:.4f}")
    t = record["training_context"]
    print(f"  check: the {s['seq_len']}-token prefixes alone {t['loss_of_prefixes_alone']:.6f} vs within the long rows "
          f"{t['loss_of_prefixes_in_long_rows']:.6f}")
    for path in paths:
        print(f"wrote {path}")
    return 0
