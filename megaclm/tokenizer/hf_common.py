"""Shared by the tokenizers built on HF `tokenizers`: plain-text special tokens, fast batches."""
from tokenizers import Tokenizer

from megaclm.tokenizer.base import valid_unicode


def prepare(tok: Tokenizer) -> Tokenizer:
    # Special tokens typed in a document are data, not control: "<|endoftext|>" in the text
    # must not become the eod id (it would split a document where the author did not).
    tok.encode_special_tokens = True
    return tok


def encode(tok: Tokenizer, text: str) -> list[int]:
    # add_special_tokens=False: no BOS/EOS from a post-processor; eod is the caller's choice.
    try:
        return tok.encode(text, add_special_tokens=False).ids
    except TypeError:  # a lone surrogate
        return tok.encode(valid_unicode(text), add_special_tokens=False).ids


def encode_batch(tok: Tokenizer, texts: list[str]) -> list[list[int]]:
    # encode_batch_fast skips the character offsets nobody here reads (~20% faster).
    try:
        encodings = tok.encode_batch_fast(texts, add_special_tokens=False)
    except TypeError:  # a lone surrogate somewhere in the batch
        encodings = tok.encode_batch_fast([valid_unicode(t) for t in texts], add_special_tokens=False)
    return [e.ids for e in encodings]
