"""How a source becomes documents and a validation split: `data.sources[i].split`.

    documents    hold out whole documents: n_valid = max(1, round(valid_fraction * n)) of the n
                 documents, chosen by a fixed-seed permutation (seed 0), so the split depends only
                 on n, never on the run seed; each side keeps at least one document
    tail         hold out the end: the last max(1, round(valid_fraction * total)) characters of a
                 text source (tokens of a Megatron one), its documents taken in order; the
                 document the cut falls in is split in two (nanoGPT's 90/10 split of input.txt)
    paragraphs   cut every text document at blank lines (lines of only spaces or tabs count),
                 then as `documents`; whitespace-only pieces are dropped
    separator    cut every text document at each `separator` (removed), then as `documents`
    chunks       cut every text document into pieces of `chunk_chars` characters (the last one
                 shorter), then as `documents`
    auto         tail when the source is one document (a single text file), documents otherwise

The rule acts before tokenisation, on characters, so a BPE is trained on the training side only.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np

from runtime.data.errors import DataError

__all__ = ["TEXT_RULES", "effective_rule", "cut", "Plan", "plan"]

SPLIT_SEED = 0
TEXT_RULES = ("paragraphs", "separator", "chunks")          # rules that cut text into documents
_BLANK_LINES = re.compile(r"\n(?:[^\S\n]*\n)+")               # a newline, then one or more blank lines


def effective_rule(rule: str, n_docs: int) -> str:
    """`auto` resolved against the source's document count (as stored, before any cutting)."""
    if rule == "auto":
        return "tail" if n_docs == 1 else "documents"
    return rule


def cut(text: str, rule: str, separator: str | None = None, chunk_chars: int | None = None) -> list[str]:
    """The documents one text document becomes under a cutting rule (others: the text itself)."""
    if rule == "paragraphs":
        return [p for p in _BLANK_LINES.split(text) if p.strip()]
    if rule == "separator":
        return [p for p in text.split(separator) if p]
    if rule == "chunks":
        return [text[i:i + chunk_chars] for i in range(0, len(text), chunk_chars)]
    return [text] if text else []


@dataclass(frozen=True)
class Plan:
    """Which documents (or which tail) of a source go to validation, and a sentence saying so."""
    rule: str                        # documents | tail | paragraphs | separator | chunks
    valid_mask: np.ndarray | None    # bool[n] for whole-document rules
    cut_at: int | None               # tail: the first held-out character (token) of the source's stream
    says: str                        # for the data summary

    def assign(self, docs: Iterable) -> Iterator[tuple[object, bool]]:
        """(document or part of one, held out?) in order; str or 1-D arrays alike."""
        if self.valid_mask is not None:
            yield from zip(docs, self.valid_mask)
            return
        start = 0
        for doc in docs:
            end = start + len(doc)
            if end <= self.cut_at:
                yield doc, False
            elif start >= self.cut_at:
                yield doc, True
            else:
                yield doc[:self.cut_at - start], False
                yield doc[self.cut_at - start:], True
            start = end


def plan(rule: str, lengths: Sequence[int], fraction: float, where: str, unit: str) -> Plan:
    """The validation plan of a source whose documents (after cutting) have `lengths` (`unit`s each)."""
    n = len(lengths)
    if n == 0:
        raise DataError(f"{where}: empty corpus: no non-empty documents")
    share = f"{100 * fraction:g}%"
    if rule == "tail":
        total = int(sum(lengths))
        n_valid = max(1, round(fraction * total))
        if n_valid >= total:
            raise DataError(f"data.valid_fraction: {fraction} of the {total:,} {unit} of {where} leaves none for "
                            "training; lower it")
        return Plan(rule, None, total - n_valid,
                    f"validation = the last {share} of the text in order: {n_valid:,} of {total:,} {unit} "
                    "(split: tail)")
    n_valid = max(1, round(fraction * n))
    if n < 2:
        raise DataError(f"{where}: only 1 document; split: {rule} holds out whole documents, so it needs at least "
                        "2: use split: tail (hold out the end of the text), or cut a text into documents with "
                        "split: paragraphs, separator or chunks")
    if n_valid >= n:
        raise DataError(f"data.valid_fraction: {fraction} of the {n} documents of {where} leaves none for "
                        "training; lower it")
    mask = np.zeros(n, dtype=bool)
    mask[np.random.Generator(np.random.PCG64(SPLIT_SEED)).permutation(n)[:n_valid]] = True
    made = {"documents": "documents", "paragraphs": "paragraphs (cut at blank lines)",
            "separator": "documents (cut at the separator)", "chunks": "chunks"}[rule]
    return Plan(rule, mask, None, f"validation = {n_valid:,} of {n:,} {made}, held out whole (split: {rule})")
