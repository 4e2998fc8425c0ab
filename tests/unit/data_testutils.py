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


def gpt2_ranks(vocab_json: str) -> dict[bytes, int]:
    """GPT-2's BPE as tiktoken ranks (an id is the merge rank of its bytes; <|endoftext|> left out)."""
    import json

    from megaclm.tokenizer.gpt2_bpe import unicode_to_byte

    to_byte = unicode_to_byte()
    with open(vocab_json, encoding="utf-8") as f:
        vocab = json.load(f)
    return {bytes(to_byte[ch] for ch in token): i for token, i in vocab.items() if token != "<|endoftext|>"}


def write_llama3_model(path: str, vocab_json: str) -> str:
    """A Llama-3-format tokenizer.model (`base64(bytes) rank` lines) holding GPT-2's ranks."""
    import base64

    with open(path, "w") as f:
        for token, rank in sorted(gpt2_ranks(vocab_json).items(), key=lambda kv: kv[1]):
            f.write(f"{base64.b64encode(token).decode()} {rank}\n")
    return path


def write_tiktoken_json(path: str, vocab_json: str) -> str:
    """Megatron's TikTokenizer vocabulary JSON (a list of {rank, token_bytes, token_str}) of GPT-2's ranks."""
    import base64
    import json

    entries = [{"rank": rank, "token_bytes": base64.b64encode(token).decode(),
                "token_str": token.decode("utf-8", "replace")}
               for token, rank in sorted(gpt2_ranks(vocab_json).items(), key=lambda kv: kv[1])]
    with open(path, "w") as f:
        json.dump(entries, f)
    return path
