"""GPT-2 byte-level BPE from Megatron's `gpt2-vocab.json` + `gpt2-merges.txt`.

Built from the two files with HF `tokenizers` (BPE model + ByteLevel pre-tokenizer/decoder),
the way OpenAI's encoder.py and Megatron's GPT2Tokenizer define it: ids equal transformers'
GPT2TokenizerFast on the same files. (`GPT2TokenizerFast(vocab_file=...)` alone can silently
build an empty tokenizer in transformers 5, hence not used.)

Fast path: when the files are OpenAI's own GPT-2 files (checked by sha256) and `tiktoken` is
installed, encoding runs on tiktoken's GPT-2 BPE instead: the same ids (tested on real text
against transformers), several times faster per core than HF `tokenizers` (bench/preprocess.py).
Any other vocab/merges pair stays on HF: a custom BPE need not number its tokens in merge
order, which tiktoken's ranks assume.
"""
import functools
import hashlib
import json

import numpy as np
from tokenizers import Tokenizer, decoders, models, pre_tokenizers

from megaclm.tokenizer import hf_common
from megaclm.tokenizer.base import BaseTokenizer, require_file
from megaclm.utils.errors import UserError

EOD_TOKEN = "<|endoftext|>"
# sha256 of openai/gpt-2's encoder.json and vocab.bpe (the hashes tiktoken pins).
OPENAI_GPT2_SHA256 = (
    "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783",
    "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5",
)
# GPT-2's pre-tokenizer split (contractions, letters, numbers, other, whitespace).
GPT2_SPLIT = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""


def unicode_to_byte() -> dict[str, int]:
    """Inverse of GPT-2's byte -> printable-character table: printable bytes stand for
    themselves, the other 68 bytes are shifted to U+0100 onwards in byte order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table = {chr(b): b for b in printable}
    shifted = [b for b in range(256) if chr(b) not in table]
    table.update({chr(256 + i): b for i, b in enumerate(shifted)})
    return table


def _sha256(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def tiktoken_engine(vocab: dict[str, int]):
    """A tiktoken Encoding equal to GPT-2 BPE over OpenAI's `vocab`, or None without tiktoken."""
    try:
        import tiktoken
    except ImportError:
        return None
    to_byte = unicode_to_byte()
    # GPT-2 ids follow merge order, so an id is exactly tiktoken's merge rank of its bytes.
    ranks = {bytes(to_byte[c] for c in tok): i for tok, i in vocab.items() if tok != EOD_TOKEN}
    return tiktoken.Encoding("megaclm-gpt2", pat_str=GPT2_SPLIT, mergeable_ranks=ranks,
                             special_tokens={EOD_TOKEN: vocab[EOD_TOKEN]})


class GPT2BPETokenizer(BaseTokenizer):
    def __init__(self, vocab_file: str | None, merge_file: str | None, **padding):
        super().__init__(**padding)
        require_file(vocab_file, "--vocab-file", "GPT-2 vocab.json (e.g. gpt2-vocab.json)")
        require_file(merge_file, "--merge-file", "GPT-2 merges.txt (e.g. gpt2-merges.txt)")
        self._files = (vocab_file, merge_file)
        self._openai = (_sha256(vocab_file), _sha256(merge_file)) == OPENAI_GPT2_SHA256
        if self._openai:
            # Known-good files: skip building the HF model (~0.15 s) in every worker process.
            with open(vocab_file, encoding="utf-8") as f:
                self._vocab: dict[str, int] = json.load(f)
            self._eod, self._vocab_size = self._vocab[EOD_TOKEN], len(self._vocab)
        else:
            eod = self._hf.token_to_id(EOD_TOKEN)  # builds (and so validates) the files now
            if eod is None:
                raise UserError(f"--vocab-file {vocab_file} has no {EOD_TOKEN} entry; is it a GPT-2 vocab.json?")
            self._eod, self._vocab_size = eod, self._hf.get_vocab_size(with_added_tokens=True)

    @functools.cached_property
    def _hf(self) -> Tokenizer:
        vocab_file, merge_file = self._files
        try:
            model = models.BPE.from_file(vocab_file, merge_file)
        except Exception as e:  # tokenizers raises plain Exception on unreadable files
            raise UserError(f"cannot read GPT-2 BPE files --vocab-file {vocab_file} / --merge-file {merge_file}: {e}") from e
        tok = Tokenizer(model)
        # add_prefix_space=False and the GPT-2 split regex: exactly OpenAI's encoder.
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
        tok.decoder = decoders.ByteLevel()
        return hf_common.prepare(tok)

    @functools.cached_property
    def _fast(self):
        # Built on first use: a process that only needs vocab_size/eod never pays for it.
        return tiktoken_engine(self._vocab) if self._openai else None

    @property
    def vocab_size(self) -> int:
        return self._vocab_size

    @property
    def eod(self) -> int:
        return self._eod

    @property
    def engine(self) -> str:
        return "tiktoken" if self._fast is not None else "tokenizers"

    def tokenize(self, text: str) -> list[int]:
        if self._fast is not None:
            # encode_ordinary: special-token strings in the text are plain text.
            return self._fast.encode_ordinary(text)
        return hf_common.encode(self._hf, text)

    def tokenize_batch(self, texts: list[str]) -> list[list[int]]:
        if self._fast is None:
            return hf_common.encode_batch(self._hf, texts)
        if self.num_threads == 1:
            return [self._fast.encode_ordinary(t) for t in texts]
        return self._fast.encode_ordinary_batch(texts, num_threads=self.num_threads or 8)

    def tokenize_batch_flat(self, texts: list[str], dtype: type) -> tuple[np.ndarray, np.ndarray]:
        if self._fast is None:
            return super().tokenize_batch_flat(texts, dtype)
        # Straight to numpy: no Python int per token (~15% less CPU than lists). With nothing
        # allowed and nothing disallowed, special-token strings are ordinary text.
        arrays = [self._fast.encode_to_numpy(t, allowed_special=set(), disallowed_special=()) for t in texts]
        lengths = np.fromiter(map(len, arrays), dtype=np.int32, count=len(arrays))
        flat = np.concatenate(arrays).astype(dtype, copy=False) if arrays else np.zeros(0, dtype)
        return flat, lengths

    def detokenize(self, ids: list[int]) -> str:
        return self._hf.decode(list(ids), skip_special_tokens=False)
