"""The interface every megaclm tokenizer implements (the vocabulary padding rule is megaclm.config.derived's)."""
import abc
import os
from itertools import chain

import numpy as np

from megaclm.config.derived import pad_vocab_size
from megaclm.utils.errors import UserError


def valid_unicode(text: str) -> str:
    """`text` with lone surrogates (JSON can hold "\\ud800") replaced by U+FFFD, as tiktoken does;
    the HF and sentencepiece bindings refuse such strings outright."""
    return text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")


def require_file(path: str | None, flag: str, what: str) -> str:
    """`path` as given, or a UserError naming `flag` when it is unset or missing."""
    if not path:
        raise UserError(f"{flag} is required: give the {what}")
    if not os.path.exists(path):
        raise UserError(f"{flag} {path}: no such file; give the path of the {what}")
    return path


class BaseTokenizer(abc.ABC):
    """tokenize/detokenize/tokenize_batch, vocab_size, eod and padded_vocab_size.

    Special-token strings typed inside a text (e.g. "<|endoftext|>") are tokenized as plain
    text: only the caller decides where document boundaries go (`eod`), never the data.
    `num_threads` bounds the threads `tokenize_batch` may use where the library takes it per
    call (None: the library default, all cores); HF `tokenizers` reads its thread count from
    the process environment instead (TOKENIZERS_PARALLELISM, RAYON_NUM_THREADS).
    """

    num_threads: int | None = None

    def __init__(self, make_vocab_size_divisible_by: int = 128, tensor_model_parallel_size: int = 1):
        self.make_vocab_size_divisible_by = make_vocab_size_divisible_by
        self.tensor_model_parallel_size = tensor_model_parallel_size
        pad_vocab_size(1, make_vocab_size_divisible_by, tensor_model_parallel_size)  # validate once

    @property
    @abc.abstractmethod
    def vocab_size(self) -> int:
        """Number of ids the tokenizer can produce (before padding)."""

    @property
    @abc.abstractmethod
    def eod(self) -> int:
        """The end-of-document id appended between documents."""

    @abc.abstractmethod
    def tokenize(self, text: str) -> list[int]:
        ...

    @abc.abstractmethod
    def detokenize(self, ids: list[int]) -> str:
        ...

    def tokenize_batch(self, texts: list[str]) -> list[list[int]]:
        return [self.tokenize(t) for t in texts]

    def tokenize_batch_flat(self, texts: list[str], dtype: type) -> tuple[np.ndarray, np.ndarray]:
        """What a dataset writer wants: every text's ids concatenated (as `dtype`), and the int32
        length of each. Families with a faster array path override it."""
        ids = self.tokenize_batch(texts)
        lengths = np.fromiter(map(len, ids), dtype=np.int32, count=len(ids))
        flat = np.fromiter(chain.from_iterable(ids), dtype=dtype, count=int(lengths.sum(dtype=np.int64)))
        return flat, lengths

    @property
    def padded_vocab_size(self) -> int:
        return pad_vocab_size(self.vocab_size, self.make_vocab_size_divisible_by, self.tensor_model_parallel_size)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(vocab_size={self.vocab_size}, padded_vocab_size={self.padded_vocab_size})"
