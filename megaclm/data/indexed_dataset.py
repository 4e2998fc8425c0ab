"""Megatron's memory-mapped indexed dataset (MMIDIDX), byte-compatible with Megatron-LM.

A dataset is a pair of files sharing a prefix: `{prefix}.bin` holds every token of every
sequence back to back, in one numpy dtype, with no header; `{prefix}.idx` says where each
sequence starts and how documents group sequences. Files written by Megatron-LM's
`IndexedDatasetBuilder` open here unchanged, and files written here open in Megatron-LM.

On-disk layout of `.idx` (all integers little-endian):

    offset  size         field
    0       9            magic b"MMIDIDX\\x00\\x00"
    9       8   <u8      version, always 1
    17      1   <u1      dtype code of the .bin tokens (table below)
    18      8   <u8      S = number of sequences
    26      8   <u8      D = number of entries in the document index (documents + 1)
    34      4*S <i4      sequence lengths, in tokens
    34+4S   8*S <i8      sequence byte offsets into .bin (pointers)
    34+12S  8*D <i8      document index: sequence ids where each document starts;
                         starts at 0 and ends at S, so document d is sequences
                         [doc_idx[d], doc_idx[d+1])

dtype codes: 1 uint8, 2 int8, 3 int16, 4 int32, 5 int64, 6 float64, 7 float32, 8 uint16.
Token datasets use uint16 when the vocabulary has fewer than 65,500 entries, else int32
(`optimal_dtype`).

For pretraining each document is usually one sequence (`tools/preprocess_data.py`), so
S = D - 1 and `doc_idx = [0, 1, ..., S]`.

Worked example - two documents, tokens [5, 6, 7] and [8, 9], uint16:
    .bin = 05 00 06 00 07 00 08 00 09 00                       (10 bytes)
    .idx = magic | 01 00.. | 08 | 02 00.. | 03 00.. | sizes [3, 2] | pointers [0, 6] | doc_idx [0, 1, 2]
"""
import contextlib
import os
import struct
from typing import Iterable

import numpy as np

from megaclm.utils.errors import UserError
from megaclm.utils.fileio import disk_full_is_an_error, remove_quietly, temp_path_for

MAGIC = b"MMIDIDX\x00\x00"
VERSION = 1
_HEADER = struct.Struct("<9sQBQQ")  # magic, version, dtype code, S, D  -> 34 bytes

DTYPES: dict[int, type] = {
    1: np.uint8,
    2: np.int8,
    3: np.int16,
    4: np.int32,
    5: np.int64,
    6: np.float64,
    7: np.float32,
    8: np.uint16,
}
CODES: dict[type, int] = {v: k for k, v in DTYPES.items()}


def optimal_dtype(vocab_size: int | None) -> type:
    """Megatron's rule: uint16 when every id fits below 65,500, else int32."""
    return np.uint16 if vocab_size is not None and vocab_size < 65500 else np.int32


def data_file_path(prefix: str) -> str:
    return prefix + ".bin"


def index_file_path(prefix: str) -> str:
    return prefix + ".idx"


class _Index:
    """The parsed `.idx` file: numpy views into one memory map, nothing copied."""

    def __init__(self, path: str, bin_size: int):
        file_size = os.path.getsize(path)
        if file_size < _HEADER.size:
            raise UserError(f"{path}: {file_size} bytes is too short for an MMIDIDX index header; rebuild the dataset")
        with open(path, "rb") as f:
            magic, version, code, n_seq, n_doc = _HEADER.unpack(f.read(_HEADER.size))
        if magic != MAGIC:
            raise UserError(f"{path}: not an MMIDIDX index (magic {magic!r}); is this a Megatron mmap dataset?")
        if version != VERSION:
            raise UserError(f"{path}: index version {version} is not supported (only {VERSION})")
        if code not in DTYPES:
            raise UserError(f"{path}: unknown dtype code {code} (valid: {sorted(DTYPES)})")
        self.dtype = DTYPES[code]
        expected = _HEADER.size + 4 * n_seq + 8 * n_seq + 8 * n_doc
        if file_size != expected:
            raise UserError(
                f"{path}: {file_size} bytes but the header promises {expected} "
                f"({n_seq} sequences, {n_doc} document entries); the file is truncated or corrupt"
            )
        self._mmap = np.memmap(path, mode="r", order="C")
        off = _HEADER.size
        self.sizes = np.frombuffer(self._mmap, dtype=np.int32, count=n_seq, offset=off)
        off += 4 * n_seq
        self.pointers = np.frombuffer(self._mmap, dtype=np.int64, count=n_seq, offset=off)
        off += 8 * n_seq
        self.document_indices = np.frombuffer(self._mmap, dtype=np.int64, count=n_doc, offset=off)
        itemsize = np.dtype(self.dtype).itemsize
        if n_seq:
            end = int(self.pointers[-1]) + int(self.sizes[-1]) * itemsize
            if end > bin_size:
                raise UserError(
                    f"{path}: pointers reach byte {end} but the .bin file has {bin_size} bytes; "
                    "the .bin is truncated or belongs to another index"
                )
        if n_doc and (self.document_indices[0] != 0 or self.document_indices[-1] != n_seq):
            raise UserError(f"{path}: document index must start at 0 and end at {n_seq}; the file is corrupt")


class IndexedDataset:
    """Read-only, zero-copy view of an MMIDIDX dataset.

    `ds[i]` is sequence i as a numpy array backed by the memory map; `ds.get(i, offset, length)`
    reads a slice without touching the rest of the sequence.
    """

    def __init__(self, prefix: str):
        self.prefix = prefix
        idx_path, bin_path = index_file_path(prefix), data_file_path(prefix)
        for p in (idx_path, bin_path):
            if not os.path.isfile(p):
                raise UserError(f"dataset file {p} does not exist; check --data-path (give the prefix without .bin/.idx)")
        bin_size = os.path.getsize(bin_path)
        self.index = _Index(idx_path, bin_size)
        self.dtype = self.index.dtype
        # np.memmap refuses empty files; an empty dataset has nothing to map.
        self._bin = np.memmap(bin_path, mode="r", order="C") if bin_size else np.empty(0, np.uint8)

    def __len__(self) -> int:
        return len(self.index.sizes)

    @property
    def sizes(self) -> np.ndarray:
        """int32 length of every sequence."""
        return self.index.sizes

    @property
    def pointers(self) -> np.ndarray:
        return self.index.pointers

    @property
    def document_indices(self) -> np.ndarray:
        """int64 sequence ids where documents start, ending with len(self)."""
        return self.index.document_indices

    def get(self, idx: int, offset: int = 0, length: int | None = None) -> np.ndarray:
        size = int(self.index.sizes[idx])
        if length is None:
            length = size - offset
        if offset < 0 or length < 0 or offset + length > size:
            raise IndexError(f"slice [{offset}, {offset + length}) out of sequence {idx} of length {size}")
        ptr = int(self.index.pointers[idx]) + offset * np.dtype(self.dtype).itemsize
        return np.frombuffer(self._bin, dtype=self.dtype, count=length, offset=ptr)

    def __getitem__(self, idx: int) -> np.ndarray:
        if not -len(self) <= idx < len(self):
            raise IndexError(f"sequence {idx} out of range for {len(self)} sequences in {self.prefix}")
        return self.get(idx % len(self))

    def num_tokens(self) -> int:
        return int(self.index.sizes.sum(dtype=np.int64))


def write_index(path: str, dtype: type, sizes: np.ndarray, document_indices: np.ndarray) -> None:
    """Write a complete `.idx` file at `path` (pointers derived from sizes)."""
    sizes = np.asarray(sizes, dtype=np.int32)
    pointers = np.zeros(len(sizes), dtype=np.int64)
    if len(sizes) > 1:
        np.cumsum(sizes[:-1].astype(np.int64) * np.dtype(dtype).itemsize, out=pointers[1:])
    doc = np.asarray(document_indices, dtype=np.int64)
    with open(path, "wb") as f:
        f.write(_HEADER.pack(MAGIC, VERSION, CODES[dtype], len(sizes), len(doc)))
        f.write(sizes.tobytes(order="C"))
        f.write(pointers.tobytes(order="C"))
        f.write(doc.tobytes(order="C"))


class IndexedDatasetBuilder:
    """Streaming writer: tokens go straight to disk; only the per-sequence sizes stay in memory.

        builder = IndexedDatasetBuilder(prefix, dtype=np.uint16)
        builder.add_document(ids)                # one sequence, one document
        builder.add_document(ids_a + ids_b, lengths=[len(ids_a), len(ids_b)])  # several sequences
        builder.add_index(other_prefix)          # append a whole dataset (merging)
        builder.finalize()                       # atomic: .bin then .idx appear under final names

    Until `finalize`, data lives under temporary names; `abort()` (or leaving a `with` block
    without finalizing) removes them, so a killed run never leaves a truncated pair under the final names.
    """

    def __init__(self, prefix: str, dtype: type = np.int32):
        if dtype not in CODES:
            raise UserError(f"dtype {dtype} cannot be stored in an MMIDIDX dataset (valid: {list(CODES)})")
        out_dir = os.path.dirname(os.path.abspath(prefix))
        if not os.path.isdir(out_dir):
            raise UserError(f"output directory {out_dir} does not exist; create it or change --output-prefix")
        if not os.access(out_dir, os.W_OK):
            raise UserError(f"output directory {out_dir} is not writable; change --output-prefix")
        self.prefix = prefix
        self.dtype = dtype
        try:
            self._bin_tmp = temp_path_for(data_file_path(prefix))
        except OSError as e:
            raise UserError(f"cannot create files in {out_dir} ({e.strerror}); change --output-prefix") from e
        self._bin = open(self._bin_tmp, "wb")
        self._finalized = False
        self._sizes: list[np.ndarray] = []  # chunks of int32 sizes; one small array per call
        self._doc_starts: list[np.ndarray] = [np.zeros(1, np.int64)]
        self._n_seq = 0

    def __enter__(self) -> "IndexedDatasetBuilder":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if not self._finalized:  # an exception, or a block that never called finalize()
            self.abort()

    def add_document(self, tokens: Iterable[int] | np.ndarray, lengths: list[int] | None = None) -> None:
        """Append one document made of one sequence (or of `lengths` sequences)."""
        arr = np.asarray(tokens, dtype=self.dtype)
        lens = np.asarray([arr.size] if lengths is None else lengths, dtype=np.int32)
        if int(lens.sum()) != arr.size:
            raise ValueError(f"lengths sum to {int(lens.sum())} but the document has {arr.size} tokens")
        self._write(arr)
        self._sizes.append(lens)
        self._n_seq += len(lens)
        self._doc_starts.append(np.array([self._n_seq], np.int64))

    def add_documents(self, tokens: np.ndarray, doc_lengths: np.ndarray,
                      sequences_per_document: np.ndarray | None = None) -> None:
        """Append many documents at once: `tokens` concatenated, `doc_lengths` the length of each sequence;
        every sequence is a document, or document d is the next `sequences_per_document[d]` sequences
        (sentence-level datasets, `--split-sentences`)."""
        lens = np.asarray(doc_lengths, dtype=np.int32)
        arr = np.asarray(tokens, dtype=self.dtype)
        if int(lens.sum(dtype=np.int64)) != arr.size:
            raise ValueError(f"doc_lengths sum to {int(lens.sum())} but {arr.size} tokens were given")
        per_doc = np.ones(len(lens), np.int64) if sequences_per_document is None else \
            np.asarray(sequences_per_document, np.int64)
        if int(per_doc.sum()) != len(lens):
            raise ValueError(f"sequences_per_document sums to {int(per_doc.sum())} but {len(lens)} lengths were given")
        self._write(arr)
        self._sizes.append(lens)
        self._doc_starts.append(self._n_seq + np.cumsum(per_doc))
        self._n_seq += len(lens)

    def add_index(self, prefix: str) -> None:
        """Append every document of the dataset at `prefix` (same dtype required)."""
        other = IndexedDataset(prefix)
        if other.dtype != self.dtype:
            raise UserError(
                f"cannot merge {prefix}: its tokens are {np.dtype(other.dtype).name} but the output is "
                f"{np.dtype(self.dtype).name}; re-run preprocessing with the same tokenizer"
            )
        self._sizes.append(np.array(other.sizes, dtype=np.int32))
        self._doc_starts.append(self._n_seq + np.asarray(other.document_indices[1:], dtype=np.int64))
        self._n_seq += len(other)
        with open(data_file_path(prefix), "rb") as src:
            while chunk := src.read(1 << 24):
                self._write(chunk)

    def _write(self, data: np.ndarray | bytes) -> None:
        with disk_full_is_an_error(data_file_path(self.prefix)):
            self._bin.write(data.tobytes(order="C") if isinstance(data, np.ndarray) else data)

    def finalize(self) -> None:
        """Close the data file and write the index; both appear atomically, `.idx` last."""
        with disk_full_is_an_error(data_file_path(self.prefix)):
            self._bin.close()  # flushes the last buffered tokens
        idx_tmp = temp_path_for(index_file_path(self.prefix))
        try:
            sizes = np.concatenate(self._sizes) if self._sizes else np.zeros(0, np.int32)
            with disk_full_is_an_error(index_file_path(self.prefix)):
                write_index(idx_tmp, self.dtype, sizes, np.concatenate(self._doc_starts))
            # .idx last: a reader that finds the .idx also finds the matching .bin.
            remove_quietly(index_file_path(self.prefix))
            os.replace(self._bin_tmp, data_file_path(self.prefix))
            os.replace(idx_tmp, index_file_path(self.prefix))
            self._finalized = True
        except BaseException:
            remove_quietly(idx_tmp, self._bin_tmp)
            raise

    def abort(self) -> None:
        """Drop everything written so far; nothing appears under the final names."""
        with contextlib.suppress(OSError):  # flushing the buffer may fail again (a full disk): dropped anyway
            self._bin.close()
        remove_quietly(self._bin_tmp)
