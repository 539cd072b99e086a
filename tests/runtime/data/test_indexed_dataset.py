"""Megatron MMIDIDX .bin/.idx: byte-exact layout, round trip, and every corruption error."""

import struct

import numpy as np
import pytest

from runtime.data import DataError, IndexedDataset, optimal_dtype, write_indexed_dataset

MAGIC = b"MMIDIDX\x00\x00"


def hand_idx(code: int, sizes: list[int], pointers: list[int], doc_idx: list[int], version: int = 1) -> bytes:
    """The .idx layout written out by hand (research note ecosystem §2.1), little-endian."""
    return (MAGIC + struct.pack("<Q", version) + struct.pack("<B", code)
            + struct.pack("<Q", len(sizes)) + struct.pack("<Q", len(doc_idx))
            + struct.pack(f"<{len(sizes)}i", *sizes) + struct.pack(f"<{len(pointers)}q", *pointers)
            + struct.pack(f"<{len(doc_idx)}q", *doc_idx))


def write_pair(tmp_path, idx: bytes, bin_: bytes, name="ds"):
    (tmp_path / f"{name}.idx").write_bytes(idx)
    (tmp_path / f"{name}.bin").write_bytes(bin_)
    return tmp_path / name


def test_written_bytes_match_the_megatron_layout(tmp_path):
    write_indexed_dataset(tmp_path / "ds", [np.array([1, 2, 3]), np.array([4, 256])], np.uint16)
    # 2 sequences of 3 and 2 uint16 tokens: pointers 0 and 3*2 = 6 bytes; one sequence per document
    assert (tmp_path / "ds.idx").read_bytes() == hand_idx(8, [3, 2], [0, 6], [0, 1, 2])
    assert (tmp_path / "ds.bin").read_bytes() == struct.pack("<5H", 1, 2, 3, 4, 256)
    assert len((tmp_path / "ds.idx").read_bytes()) == 34 + 12 * 2 + 8 * 3


def test_reads_hand_built_megatron_data_with_several_sequences_per_document(tmp_path):
    # int32 tokens (code 4), --split-sentences style: document 0 = sequences 0 and 1, document 1 = sequence 2
    idx = hand_idx(4, [2, 1, 3], [0, 8, 12], [0, 2, 3]) + bytes([0, 0, 0])  # + optional sequence_modes
    prefix = write_pair(tmp_path, idx, struct.pack("<6i", 70000, 1, 2, 3, 4, 5))
    ds = IndexedDataset(prefix, vocab_size=70001)
    assert ds.dtype == np.int32 and len(ds) == 3 and ds.num_docs == 2 and ds.num_tokens == 6
    assert ds[1].tolist() == [2]
    assert ds.document(0).tolist() == [70000, 1, 2]
    assert ds.document(1).tolist() == [3, 4, 5]


def test_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    docs = [rng.integers(0, 1000, rng.integers(1, 50)) for _ in range(20)]
    assert write_indexed_dataset(tmp_path / "rt", docs, np.uint16) == (20, sum(len(d) for d in docs))
    ds = IndexedDataset(tmp_path / "rt", vocab_size=1000)
    assert [ds[i].tolist() for i in range(len(ds))] == [d.tolist() for d in docs]
    assert ds.tokens.tolist() == np.concatenate(docs).tolist()


def test_optimal_dtype_is_megatrons_rule():
    assert optimal_dtype(257) == np.uint16 and optimal_dtype(65499) == np.uint16
    assert optimal_dtype(65500) == np.int32 and optimal_dtype(128256) == np.int32


GOOD_IDX = hand_idx(8, [3, 2], [0, 6], [0, 1, 2])
GOOD_BIN = struct.pack("<5H", 1, 2, 3, 4, 5)


@pytest.mark.parametrize("idx, bin_, match", [
    (b"MMIDIDY\x00\x00" + GOOD_IDX[9:], GOOD_BIN, "does not start with the magic"),
    (b"TNTIDX\x00\x00" + GOOD_IDX[8:], GOOD_BIN, "does not start with the magic"),  # the old non-mmap format
    (hand_idx(8, [3, 2], [0, 6], [0, 1, 2], version=2), GOOD_BIN, "version 2 is not supported"),
    (hand_idx(7, [3, 2], [0, 12], [0, 1, 2]), struct.pack("<5f", 1, 2, 3, 4, 5), "dtype code 7 is not a token dtype"),
    (hand_idx(99, [3, 2], [0, 6], [0, 1, 2]), GOOD_BIN, "dtype code 99"),
    (GOOD_IDX[:-8], GOOD_BIN, "size mismatch: the header declares 2 sequences"),
    (GOOD_IDX[:20], GOOD_BIN, "size mismatch"),
    (GOOD_IDX, GOOD_BIN[:-2], r"size mismatch: ds.idx describes 5 tokens of uint16 \(10 bytes\) but the .bin has 8"),
    (GOOD_IDX, GOOD_BIN + b"\x00\x00", "but the .bin has 12 bytes"),
    (hand_idx(8, [3, 2], [0, 4], [0, 1, 2]), GOOD_BIN, r"sequence_pointers\[1\] = 4 but .* gives 6"),
    (hand_idx(8, [3, 2], [0, 6], [0, 1]), GOOD_BIN, "document_indices must rise from 0"),
    (hand_idx(8, [0], [0], [0, 1]), b"", "empty corpus"),
])
def test_corrupt_index_or_data_is_refused(tmp_path, idx, bin_, match):
    prefix = write_pair(tmp_path, idx, bin_)
    with pytest.raises(DataError, match=match):
        IndexedDataset(prefix)


def test_tokens_outside_the_vocabulary_are_refused_with_their_position(tmp_path):
    prefix = write_pair(tmp_path, GOOD_IDX, struct.pack("<5H", 1, 2, 3, 300, 5))
    IndexedDataset(prefix, vocab_size=301)
    with pytest.raises(DataError, match=r"token id 300 at token 3 is outside the vocabulary of 257 ids \(the largest id in the data is 300\)"):
        IndexedDataset(prefix, vocab_size=257)


def test_negative_ids_are_refused(tmp_path):
    prefix = write_pair(tmp_path, hand_idx(3, [2], [0], [0, 1]), struct.pack("<2h", 4, -1))
    with pytest.raises(DataError, match="token id -1 at token 1"):
        IndexedDataset(prefix, vocab_size=257)


@pytest.mark.parametrize("present", ["idx", "bin", None])
def test_missing_files_are_named(tmp_path, present):
    if present:
        (tmp_path / f"ds.{present}").write_bytes(GOOD_IDX if present == "idx" else GOOD_BIN)
    with pytest.raises(DataError, match="missing .*ds\\." + ("bin" if present == "idx" else "idx")):
        IndexedDataset(tmp_path / "ds")
