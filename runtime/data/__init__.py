"""Data: corpus sources -> tokenizer -> Megatron indexed datasets -> packed, blended, sharded batches.

    prepare(spec) -> PreparedData(tokenizer, train: Split, valid: Split, folder, manifest)
    Sampler(split_or_dataset, seq_len, batch_size, seed, rank=0, world=1).next_batch()

Modules: `sources` (what a path names), `shakespeare` (the built-in corpus), `tokenizer`,
`indexed` (the .bin/.idx format), `blend` (weights), `sampler` (packing and order),
`pipeline` (prepare: the cached pipeline), `cache` (where it lives).
"""

from runtime.data.blend import Split, blend_schedule
from runtime.data.errors import DataError
from runtime.data.indexed import IndexedDataset, IndexedDatasetWriter, optimal_dtype, write_indexed_dataset
from runtime.data.pipeline import PreparedData, prepare
from runtime.data.sampler import Sampler
from runtime.data.tokenizer import BPETokenizer, ByteTokenizer

__all__ = ["prepare", "PreparedData", "Sampler", "Split", "blend_schedule", "DataError", "IndexedDataset",
           "IndexedDatasetWriter", "write_indexed_dataset", "optimal_dtype", "ByteTokenizer", "BPETokenizer"]
