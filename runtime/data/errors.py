"""The one error type of the data pipeline."""

from __future__ import annotations

from spec.errors import GrapefxError


class DataError(GrapefxError):
    """A corpus, tokenizer or indexed-dataset problem the user can fix (message says how)."""
