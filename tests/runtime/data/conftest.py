"""Fixtures for the data tests."""

from pathlib import Path

import pytest

from data_helpers import write_folder


@pytest.fixture
def plays(tmp_path) -> Path:
    """A folder of 8 small plays (one nested) for prepare tests."""
    texts = {f"play{i}.txt": f"Act {i}. " + "to be or not to be, " * (i + 3) for i in range(7)}
    texts["more/play7.txt"] = "Exeunt, pursued by a bear. " * 4
    texts["notes.md"] = "not a .txt, ignored"
    return write_folder(tmp_path / "plays", texts)
