"""tiktoken-based tokenizers with Megatron-LM's names: Llama3Tokenizer and TikTokenizer.

Llama3Tokenizer reads Meta's Llama-3 `tokenizer.model` (one `base64(token bytes) rank` per line) with
Llama-3's split pattern and its 256 special tokens after the base ranks (<|begin_of_text|> = BOS,
<|end_of_text|> = EOS = eod; 128000 + 256 = 128256 ids for the real file). Every text starts with BOS,
as in Megatron's `tokenize(s, bos=True)`.

TikTokenizer is Megatron's CustomTikTokenizer: a JSON list of {"rank", "token_bytes" (base64),
"token_str"}, `num_special_tokens` ids first (<unk>, <s>, </s>, then <SPECIAL_i> fillers), the ranks
shifted after them and cut so the whole vocabulary is `vocab_size` (default 2**17); no BOS is added.

As everywhere in megaclm, special-token strings typed inside a text are encoded as plain text
(Megatron's Llama3Tokenizer encodes them as specials).
"""
from __future__ import annotations

import base64
import json

import tiktoken

from megaclm.tokenizer.base import BaseTokenizer, require_file, valid_unicode
from megaclm.utils.errors import UserError

LLAMA3_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
                  r"\s*[\r\n]+|\s+(?!\S)|\s+")
LLAMA3_SPECIALS = (["<|begin_of_text|>", "<|end_of_text|>"] + [f"<|reserved_special_token_{i}|>" for i in range(4)]
                   + ["<|start_header_id|>", "<|end_header_id|>", "<|reserved_special_token_4|>", "<|eot_id|>"]
                   + [f"<|reserved_special_token_{i}|>" for i in range(5, 256 - 5)])
# Megatron-LM's --tiktoken-pattern v1 and v2.
TIKTOKEN_PATTERNS = {
    "v1": r"[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]++[\r\n]*|\s*[\r\n]|\s+(?!\S)|\s+",
    "v2": (r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+|"
           r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*|\p{N}|"
           r" ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"),
}
TIKTOKEN_BASE_SPECIALS = ("<unk>", "<s>", "</s>")


class _TiktokenBase(BaseTokenizer):
    """A tiktoken Encoding plus BOS/EOS ids; `add_bos` prepends BOS to every text."""

    def __init__(self, encoding: tiktoken.Encoding, bos: int, eos: int, add_bos: bool, **padding):
        super().__init__(**padding)
        self._enc, self._bos, self._eos, self._add_bos = encoding, bos, eos, add_bos

    @property
    def vocab_size(self) -> int:
        return self._enc.n_vocab

    @property
    def eod(self) -> int:
        return self._eos

    @property
    def bos(self) -> int:
        return self._bos

    def tokenize(self, text: str) -> list[int]:
        ids = self._enc.encode_ordinary(valid_unicode(text))
        return [self._bos] + ids if self._add_bos else ids

    def tokenize_batch(self, texts: list[str]) -> list[list[int]]:
        threads = self.num_threads or 8
        batch = self._enc.encode_ordinary_batch([valid_unicode(t) for t in texts], num_threads=threads)
        return [[self._bos] + ids for ids in batch] if self._add_bos else batch

    def detokenize(self, ids: list[int]) -> str:
        return self._enc.decode(list(map(int, ids)))


def _bad(path: str, why: str) -> UserError:
    return UserError(f"--tokenizer-model {path}: {why}")


class Llama3Tokenizer(_TiktokenBase):
    def __init__(self, tokenizer_model: str | None, **padding):
        path = require_file(tokenizer_model, "--tokenizer-model", "Llama-3 tokenizer.model (tiktoken BPE ranks)")
        ranks: dict[bytes, int] = {}
        with open(path, "rb") as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    token, rank = line.split()
                    ranks[base64.b64decode(token, validate=True)] = int(rank)
                except ValueError as e:
                    raise _bad(path, f"line {n} is not `base64-token rank` ({e}); pass Meta's Llama-3 "
                                     "tokenizer.model (a SentencePiece .model wants Llama2Tokenizer)") from e
        if sorted(ranks.values()) != list(range(len(ranks))):
            raise _bad(path, "the ranks are not 0..N-1 without gaps")
        base = len(ranks)
        specials = {t: base + i for i, t in enumerate(LLAMA3_SPECIALS)}
        enc = tiktoken.Encoding("megaclm-llama3", pat_str=LLAMA3_PATTERN, mergeable_ranks=ranks,
                                special_tokens=specials)
        super().__init__(enc, specials["<|begin_of_text|>"], specials["<|end_of_text|>"], add_bos=True, **padding)


class TikTokenizer(_TiktokenBase):
    def __init__(self, tokenizer_model: str | None, pattern: str = "v2", vocab_size: int | None = None,
                 num_special_tokens: int = 1000, special_tokens: list[str] | None = None, **padding):
        path = require_file(tokenizer_model, "--tokenizer-model", "tiktoken vocabulary JSON")
        if pattern not in TIKTOKEN_PATTERNS:
            raise UserError(f"--tiktoken-pattern {pattern!r} is unknown; choose one of {', '.join(TIKTOKEN_PATTERNS)}")
        vocab_size = vocab_size or 2 ** 17
        specials = list(special_tokens or TIKTOKEN_BASE_SPECIALS)
        missing = [t for t in TIKTOKEN_BASE_SPECIALS if t not in specials]
        if missing or len(set(specials)) != len(specials):
            raise UserError(f"--tiktoken-special-tokens {specials}: must be unique and include "
                            f"{', '.join(TIKTOKEN_BASE_SPECIALS)}")
        if not len(specials) <= num_special_tokens < vocab_size:
            raise UserError(f"--tiktoken-num-special-tokens {num_special_tokens} must be at least the {len(specials)} "
                            f"special tokens and below the vocabulary size {vocab_size}")
        specials += [f"<SPECIAL_{i}>" for i in range(len(specials), num_special_tokens)]
        try:
            with open(path, encoding="utf-8") as f:
                entries = json.load(f)
            ranks = {base64.b64decode(e["token_bytes"]): int(e["rank"])
                     for e in entries[:vocab_size - num_special_tokens]}
        except (ValueError, KeyError, TypeError) as e:
            raise _bad(path, f"not a tiktoken vocabulary JSON (a list of {{rank, token_bytes, token_str}}): {e}") from e
        if sorted(ranks.values()) != list(range(len(ranks))):
            raise _bad(path, "the ranks are not 0..N-1 without gaps")
        if len(ranks) + num_special_tokens != vocab_size:
            raise _bad(path, f"holds {len(ranks)} tokens, fewer than --vocab-size {vocab_size} - "
                             f"{num_special_tokens} special tokens; lower --vocab-size")
        enc = tiktoken.Encoding("megaclm-tiktoken", pat_str=TIKTOKEN_PATTERNS[pattern],
                                mergeable_ranks={t: r + num_special_tokens for t, r in ranks.items()},
                                special_tokens={t: i for i, t in enumerate(specials)})
        super().__init__(enc, specials.index("<s>"), specials.index("</s>"), add_bos=False, **padding)
