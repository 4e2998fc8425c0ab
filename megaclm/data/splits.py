"""Train/valid/test splits over the documents of one dataset (`--split 969,30,1`).

    document_ranges(1000, (0.969, 0.03, 0.001)) -> [(0, 969), (969, 999), (999, 1000)]

Boundary i is round(cumulative fraction i x documents) (halves round up), the last one is every
document, so the three ranges are contiguous, disjoint and cover the dataset. A document made of
several sequences stays whole: `sequence_range` turns a document range into the sequence range
the sample index streams.
"""
from __future__ import annotations

import math

import numpy as np

SPLIT_NAMES = ("train", "valid", "test")


def document_ranges(num_documents: int, fractions: tuple[float, float, float]) -> list[tuple[int, int]]:
    bounds = [0]
    cumulative = 0.0
    for f in fractions[:-1]:
        cumulative += f
        bounds.append(min(num_documents, max(bounds[-1], math.floor(cumulative * num_documents + 0.5))))
    bounds.append(num_documents)
    return [(bounds[i], bounds[i + 1]) for i in range(len(fractions))]


def sequence_range(document_indices: np.ndarray, doc_range: tuple[int, int]) -> tuple[int, int]:
    """Sequences [first of document doc_range[0], first of document doc_range[1])."""
    return int(document_indices[doc_range[0]]), int(document_indices[doc_range[1]])


def split_sequence_range(document_indices: np.ndarray, split: str,
                         fractions: tuple[float, float, float] | None) -> tuple[int, int]:
    """The sequence range of `split` in one dataset: its `--split` share of the documents, or every sequence
    when `fractions` is None (a dataset given for that split alone, --train-data-path ...)."""
    docs = len(document_indices) - 1
    doc_range = (0, docs) if fractions is None else document_ranges(docs, fractions)[SPLIT_NAMES.index(split)]
    return sequence_range(document_indices, doc_range)
