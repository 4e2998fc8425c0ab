"""Every dataset's token ids against the vocabulary, checked at start-up (before any process group).

Data tokenized with another tokenizer than the run's is the silent failure this catches: ids past
the embedding crash at TP=1 (`IndexError: index out of range in self`) and are masked to zeros by the
vocabulary-parallel embedding at TP > 1; ids between the tokenizer's size and the padded size train
rows that no tokenizer id ever reads. So every dataset of every split and blend must hold ids in
[0, min(tokenizer vocabulary, model vocabulary)).

The smallest and largest id of a dataset come from one pass over its memory-mapped .bin (numpy, in
chunks of 64 MiB, so memory stays flat; the .bin/.idx stay byte-compatible with Megatron) and are
cached as a megaclm.data.cache entry beside the dataset's other caches (--data-cache-path, else
`cache/` beside it), keyed by the dataset's fingerprint (sizes, content hashes and mtime of both
files: megaclm.data.fingerprint.file_entry), so a changed file is scanned again. The cache's lock
makes one process scan while the others of a node (or of nodes sharing the directory) wait, and a
read-only dataset directory falls back to a node-local cache.
"""
from __future__ import annotations

import os

import numpy as np

from megaclm.config.data import DataConfig
from megaclm.data.builder import blend_sources, cache_dir_for
from megaclm.data.cache import IndexCache
from megaclm.data.fingerprint import file_entry
from megaclm.data.indexed_dataset import IndexedDataset, data_file_path
from megaclm.utils.errors import UserError

_CHUNK_BYTES = 64 << 20


def scan_token_range(prefix: str) -> tuple[int, int]:
    """(smallest, largest) token id in the dataset's .bin, in one chunked pass; (0, -1) when it is empty."""
    bin_path = data_file_path(prefix)
    bin_size = os.path.getsize(bin_path)
    dtype = np.dtype(IndexedDataset(prefix).dtype)  # from the .idx header, which it also validates
    if bin_size < dtype.itemsize:
        return 0, -1
    tokens = np.memmap(bin_path, dtype=dtype, mode="r", shape=(bin_size // dtype.itemsize,))
    step = _CHUNK_BYTES // dtype.itemsize
    lo, hi = None, None
    for at in range(0, len(tokens), step):
        chunk = tokens[at:at + step]
        lo = int(chunk.min()) if lo is None else min(lo, int(chunk.min()))
        hi = int(chunk.max()) if hi is None else max(hi, int(chunk.max()))
    return lo, hi


def token_range(prefix: str, cache_dir: str) -> tuple[int, int]:
    """`scan_token_range`, cached (see the module docstring)."""
    description = {"kind": "token_range", "version": 1, **file_entry(prefix)}
    arrays, _ = IndexCache(cache_dir).get_or_build(
        "token-range", description, lambda: {"range": np.array(scan_token_range(prefix), dtype=np.int64)})
    lo, hi = (int(x) for x in arrays["range"])
    return lo, hi


def check_token_ids(cfg: DataConfig, tokenizer_vocab: int, model_vocab: int, tokenizer: str, model_source: str) -> None:
    """Refuse a dataset with an id outside [0, min(tokenizer_vocab, model_vocab)); `tokenizer` names the run's
    tokenizer and `model_source` where the model's vocabulary size comes from, for the message."""
    if cfg.mock_data:
        return
    limit = min(tokenizer_vocab, model_vocab)
    for split, (_, prefixes, _) in blend_sources(cfg).items():
        for prefix in prefixes:
            lo, hi = token_range(prefix, cache_dir_for(cfg, prefix))
            if lo >= 0 and hi < limit:
                continue
            bad = hi if hi >= limit else lo
            where = ("past the model's embedding" if bad >= model_vocab else
                     "in the embedding's padding rows, which no tokenizer id reads" if bad >= tokenizer_vocab else
                     "negative")
            raise UserError(
                f"dataset {prefix} ({split} data) holds token ids {lo}..{hi}, but this run's tokenizer ({tokenizer}) "
                f"has {tokenizer_vocab} ids and the model's embedding {model_vocab} rows ({model_source}): id {bad} is "
                f"{where}. The data was most likely tokenized with another tokenizer; preprocess it again with "
                f"{tokenizer} (tools/preprocess_data.py), or train with the tokenizer it was made with")
