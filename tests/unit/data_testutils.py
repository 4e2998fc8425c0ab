"""Small MMIDIDX datasets for the data tests (written with the real IndexedDatasetBuilder)."""
import os

import numpy as np

from megaclm.data.indexed_dataset import IndexedDatasetBuilder

EOD = 0


def write_dataset(prefix: str, docs: list, dtype=np.uint16) -> str:
    """One sequence per document; returns the prefix."""
    with IndexedDatasetBuilder(prefix, dtype) as b:
        for doc in docs:
            b.add_document(np.asarray(doc, dtype=dtype))
        b.finalize()
    return prefix


def random_docs(rng: np.random.Generator, n: int, max_len: int = 30, vocab: int = 1000, eod: bool = True) -> list:
    """n documents of 1..max_len tokens in [1, vocab), each ending with EOD when `eod`."""
    docs = []
    for _ in range(n):
        body = rng.integers(1, vocab, int(rng.integers(1, max_len + 1)))
        docs.append(np.concatenate([body, [EOD]]) if eod else body)
    return docs


def make_random_dataset(directory, name: str, n_docs: int, seed: int = 0, **kw) -> str:
    return write_dataset(os.path.join(str(directory), name), random_docs(np.random.default_rng(seed), n_docs, **kw))
