"""Index builders with three interchangeable backends: C++ (`megaclm.data._helpers`), numpy, Python.

    backend()                                          -> "cpp" or "numpy" (what runs by default)
    build_sample_index(sizes, document_index, seq_length, num_samples, impl=None)  -> (N + 1, 2) int32/int64
    blending_tree(weights)                             -> BlendingTree (Huffman tree over the weights)
    build_blending_index(tree, size, impl=None)        -> (dataset_index int32, dataset_sample_index int64)

The C++ extension is compiled by setup.py at install time on every machine that installs megaclm
(never at run time). Without it the numpy implementation runs, with one warning; both give the same
arrays element for element (tests compare them, and a plain Python loop, on the same inputs).

Sample index
------------
The documents listed by `document_index` (ids into `sizes`) are read back to back as one token
stream. Sample i is the `seq_length + 1` tokens from stream position i*seq_length (inputs are the
first seq_length, labels the last seq_length, so consecutive samples share one token). Boundary j is
stored as (k, offset): the stream position j*seq_length lies `offset` tokens into document
document_index[k]. Boundary 0 is (0, 0); an empty document never holds a later boundary.

Blending index
--------------
Sample s of the blend is sample dataset_sample_index[s] of dataset dataset_index[s]. The datasets are
the leaves of a binary tree; each internal node splits the samples that reach it between its two
subtrees in the ratio of their weights with the rounding rule

    the n-th sample reaching the node (n = 0, 1, ...) goes left  iff  L(n + 1) > L(n),
    L(n) = floor(p_left * n + 1/2)   (samples among the first n that went left; |L(n) - p_left*n| <= 1/2)

Along the path root -> ... -> dataset d the errors add up, each scaled by the weight ratio below it:
after any n samples,  |count_d(n) - w_d * n|  <=  B_d = 1/2 * sum over path nodes v below the root of w_d / W_v
(W_v: weight of the subtree at v, the leaf itself included). The tree is Huffman's (repeatedly join
the two lightest subtrees), where a node's grandparent weighs at least twice the node, so
B_d <= 1/2 * (1 + 1 + 1/2 + 1/2 + 1/4 + ...) = 2: no dataset is ever more than 2 samples away from
its share, whatever the number of datasets and weights (plus float rounding of the ratios,
~1e-16 * n). `BlendingTree.bounds` gives the exact B_d; tests check the running mix against it.
Megatron's greedy builder is O(samples x datasets), and Megatron-DeepSpeed's stores dataset ids in
uint8 (at most 255 datasets); this one is O(samples x tree depth) with int32 ids.
"""
from __future__ import annotations

import heapq
import math
from dataclasses import dataclass

import numpy as np

from megaclm.logging import get_logger, warn_once

try:
    from megaclm.data import _helpers as _cpp
except ImportError:  # extension not built (no compiler at install time): numpy fallback
    _cpp = None

IMPLS = ("cpp", "numpy", "python")
_INT32_MAX = np.iinfo(np.int32).max


def backend() -> str:
    """The implementation used when `impl` is not given: "cpp" when the extension is built, else "numpy"."""
    if _cpp is None:
        warn_once("data-helpers-missing",
                  "megaclm.data._helpers (C++) is not built; index builds use the slower numpy fallback. "
                  "Reinstall with a C++ compiler (pip install -e .) to build it.", get_logger("megaclm.data"))
        return "numpy"
    return "cpp"


def _choose(impl: str | None) -> str:
    impl = impl or backend()
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    if impl == "cpp" and _cpp is None:
        raise RuntimeError("the C++ helpers are not built (megaclm.data._helpers missing)")
    return impl


def sample_index_dtype(document_index_len: int, max_size: int) -> type:
    """int32 when every (position, offset) fits, else int64."""
    return np.int32 if max(document_index_len, max_size) <= _INT32_MAX else np.int64


def build_sample_index(sizes: np.ndarray, document_index: np.ndarray, seq_length: int, num_samples: int,
                       impl: str | None = None) -> np.ndarray:
    """(num_samples + 1, 2) boundaries of `num_samples` samples of seq_length + 1 tokens (see module doc)."""
    sizes = np.ascontiguousarray(sizes, dtype=np.int32)
    document_index = np.ascontiguousarray(document_index, dtype=np.int32)
    dtype = sample_index_dtype(len(document_index), int(sizes.max()) if len(sizes) else 0)
    impl = _choose(impl)
    if impl == "cpp":
        fn = _cpp.build_sample_idx_int32 if dtype == np.int32 else _cpp.build_sample_idx_int64
        return fn(sizes, document_index, int(seq_length), int(num_samples))
    if impl == "numpy":
        return _sample_index_numpy(sizes, document_index, seq_length, num_samples, dtype)
    return _sample_index_python(sizes, document_index, seq_length, num_samples, dtype)


def _sample_index_numpy(sizes, document_index, seq_length, num_samples, dtype) -> np.ndarray:
    doc_sizes = sizes[document_index].astype(np.int64)
    doc_end = np.cumsum(doc_sizes)  # stream position one past each listed document
    out = np.zeros((num_samples + 1, 2), dtype=dtype)
    if num_samples == 0:
        return out
    positions = np.arange(1, num_samples + 1, dtype=np.int64) * seq_length
    if len(doc_end) == 0 or positions[-1] >= doc_end[-1]:
        raise ValueError("document_index runs out of tokens before num_samples samples")
    k = np.searchsorted(doc_end, positions, side="right")  # first document ending past the position
    out[1:, 0] = k
    out[1:, 1] = positions - (doc_end[k] - doc_sizes[k])
    return out


def _sample_index_python(sizes, document_index, seq_length, num_samples, dtype) -> np.ndarray:
    """Megatron's loop, literally: walk the documents, consuming seq_length + 1 tokens per sample."""
    sizes_l, doc_l = sizes.tolist(), document_index.tolist()
    out = [(0, 0)]
    k, offset = 0, 0
    while len(out) <= num_samples:
        remaining = seq_length + 1
        while remaining != 0:
            if k >= len(doc_l):
                raise ValueError("document_index runs out of tokens before num_samples samples")
            length = sizes_l[doc_l[k]] - offset
            remaining -= length
            if remaining <= 0:
                offset += remaining + length - 1  # the last token is shared with the next sample
                remaining = 0
            else:
                k += 1
                offset = 0
        out.append((k, offset))
    return np.array(out, dtype=dtype).reshape(num_samples + 1, 2)


@dataclass(frozen=True)
class BlendingTree:
    """Binary tree over datasets. Node i: children left[i], right[i] (c < 0 is dataset -(c+1)),
    p_left[i] = weight(left subtree) / weight(node). `root` < 0 when there is a single dataset."""

    left: np.ndarray  # (nodes,) int32
    right: np.ndarray  # (nodes,) int32
    p_left: np.ndarray  # (nodes,) float64
    root: int
    weights: np.ndarray  # (datasets,) float64, normalized
    bounds: np.ndarray  # (datasets,) float64: B_d, the largest |count_d(n) - w_d * n| the tree allows


def blending_tree(weights) -> BlendingTree:
    """Huffman tree over the datasets with positive weight (ties broken by creation order)."""
    w = np.asarray(weights, dtype=np.float64)
    if w.ndim != 1 or len(w) == 0 or not np.all(np.isfinite(w)) or np.any(w < 0) or w.sum() <= 0:
        raise ValueError(f"blend weights must be finite, >= 0 and not all zero, got {weights!r}")
    w = w / w.sum()
    # Heap entries (weight, order, child code); child code < 0 is a leaf, >= 0 an internal node.
    heap = [(float(x), d, -(d + 1)) for d, x in enumerate(w) if x > 0]
    heapq.heapify(heap)
    left, right, p_left, node_weight = [], [], [], []
    order = len(w)
    while len(heap) > 1:
        wa, _, a = heapq.heappop(heap)
        wb, _, b = heapq.heappop(heap)
        node = len(left)
        left.append(a)
        right.append(b)
        p_left.append(wa / (wa + wb))
        node_weight.append(wa + wb)
        heapq.heappush(heap, (wa + wb, order, node))
        order += 1
    root = heap[0][2]
    bounds = np.zeros(len(w))
    # Walk down once, carrying sum_{v on path below root} 1 / W_v.
    stack = [(root, 0.0)]
    while stack:
        code, acc = stack.pop()
        if code < 0:
            d = -(code + 1)
            bounds[d] = 0.5 * (w[d] * acc + 1.0) if code != root else 0.0
            continue
        for child in (left[code], right[code]):
            stack.append((child, acc + (1.0 / node_weight[child] if child >= 0 else 0.0)))
    return BlendingTree(np.array(left, np.int32), np.array(right, np.int32), np.array(p_left, np.float64),
                        int(root), w, bounds)


def build_blending_index(tree: BlendingTree, size: int, impl: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(dataset_index int32, dataset_sample_index int64), each (size,): the blend's first `size` samples."""
    impl = _choose(impl)
    if impl == "cpp":
        return _cpp.build_blending_indices(tree.left, tree.right, tree.p_left, tree.root, int(size))
    if impl == "numpy":
        return _blending_numpy(tree, size)
    return _blending_python(tree, size)


def _blending_numpy(tree: BlendingTree, size: int) -> tuple[np.ndarray, np.ndarray]:
    dataset_index = np.empty(size, np.int32)
    dataset_sample_index = np.empty(size, np.int64)
    # Each stack entry: a node and the blend positions of the samples reaching it, in order; the
    # j-th of them is the node's n = j-th sample, so local numbers are always arange(len(positions)).
    stack = [(tree.root, np.arange(size, dtype=np.int64))]
    while stack:
        node, positions = stack.pop()
        if node < 0:
            dataset_index[positions] = -(node + 1)
            dataset_sample_index[positions] = np.arange(len(positions), dtype=np.int64)
            continue
        counts = np.floor(tree.p_left[node] * np.arange(len(positions) + 1, dtype=np.float64) + 0.5)
        goes_left = counts[1:] > counts[:-1]
        stack.append((int(tree.left[node]), positions[goes_left]))
        stack.append((int(tree.right[node]), positions[~goes_left]))
    return dataset_index, dataset_sample_index


def _blending_python(tree: BlendingTree, size: int) -> tuple[np.ndarray, np.ndarray]:
    left, right, p_left = tree.left.tolist(), tree.right.tolist(), tree.p_left.tolist()
    ds, ds_sample = [0] * size, [0] * size
    for s in range(size):
        node, n = tree.root, s
        while node >= 0:
            before = math.floor(p_left[node] * n + 0.5)
            if math.floor(p_left[node] * (n + 1) + 0.5) > before:
                n, node = before, left[node]
            else:
                n, node = n - before, right[node]
        ds[s], ds_sample[s] = -(node + 1), n
    return np.array(ds, np.int32), np.array(ds_sample, np.int64)
