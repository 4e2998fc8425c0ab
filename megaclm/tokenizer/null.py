"""NullTokenizer: the text is already token ids, written as space-separated integers.

Megatron's convention: ids 0..vocab_size-1 come from the text and eod is one more id,
`vocab_size`, so the tokenizer's vocabulary has vocab_size + 1 entries.
"""
from megaclm.tokenizer.base import BaseTokenizer
from megaclm.utils.errors import UserError


class NullTokenizer(BaseTokenizer):
    def __init__(self, vocab_size: int | None, **padding):
        super().__init__(**padding)
        if vocab_size is None or vocab_size < 1:
            raise UserError(f"--vocab-size {vocab_size}: NullTokenizer needs --vocab-size >= 1 (ids in the text are below it)")
        self._n = int(vocab_size)

    @property
    def vocab_size(self) -> int:
        return self._n + 1

    @property
    def eod(self) -> int:
        return self._n

    def tokenize(self, text: str) -> list[int]:
        try:
            ids = [int(w) for w in text.split()]
        except ValueError as e:
            raise UserError(f"NullTokenizer reads space-separated integers, got {text[:40]!r}... ({e})") from e
        bad = [i for i in ids if not 0 <= i < self._n]
        if bad:
            raise UserError(f"NullTokenizer: id {bad[0]} is outside [0, {self._n}); raise --vocab-size")
        return ids

    def detokenize(self, ids: list[int]) -> str:
        return " ".join(str(int(i)) for i in ids)
