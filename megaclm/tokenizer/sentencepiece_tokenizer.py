"""A SentencePiece `.model` (unigram or BPE); ids equal `sentencepiece` encode without BOS/EOS."""
import sentencepiece as spm

from megaclm.tokenizer.base import BaseTokenizer, require_file, valid_unicode
from megaclm.utils.errors import UserError


class SentencePieceTokenizer(BaseTokenizer):
    def __init__(self, tokenizer_model: str | None, **padding):
        super().__init__(**padding)
        require_file(tokenizer_model, "--tokenizer-model", "SentencePiece .model file")
        try:
            self._sp = spm.SentencePieceProcessor(model_file=tokenizer_model)
        except (OSError, RuntimeError) as e:
            raise UserError(f"--tokenizer-model {tokenizer_model}: not a SentencePiece model ({e})") from e
        self.path = tokenizer_model

    @property
    def vocab_size(self) -> int:
        return self._sp.get_piece_size()

    @property
    def eod(self) -> int:
        # GPT-style use of a SentencePiece model: the model's </s> ends a document.
        eos = self._sp.eos_id()
        if eos < 0:
            raise UserError(f"--tokenizer-model {self.path} has no eos piece; retrain it with eos_id >= 0")
        return eos

    def tokenize(self, text: str) -> list[int]:
        # Control pieces (<s>, </s>) typed in the text are encoded as plain text by sentencepiece.
        try:
            return self._sp.encode(text, out_type=int, add_bos=False, add_eos=False)
        except RuntimeError:  # a lone surrogate cannot cross into C++
            return self._sp.encode(valid_unicode(text), out_type=int, add_bos=False, add_eos=False)

    def tokenize_batch(self, texts: list[str]) -> list[list[int]]:
        threads = -1 if self.num_threads is None else self.num_threads
        try:
            return self._sp.encode(texts, out_type=int, add_bos=False, add_eos=False, num_threads=threads)
        except TypeError:  # a lone surrogate somewhere in the batch
            return self._sp.encode([valid_unicode(t) for t in texts], out_type=int, add_bos=False,
                                   add_eos=False, num_threads=threads)

    def detokenize(self, ids: list[int]) -> str:
        return self._sp.decode(list(ids))


class Llama2Tokenizer(SentencePieceTokenizer):
    """Megatron-LM's Llama2Tokenizer: Llama-2's SentencePiece model, every text starts with <s> (BOS)
    as in Meta's text-completion encoding; documents end with </s> (`eod`, the --append-eod token)."""

    @property
    def bos(self) -> int:
        bos = self._sp.bos_id()
        if bos < 0:
            raise UserError(f"--tokenizer-model {self.path} has no bos piece; Llama2Tokenizer needs one "
                            "(use SentencePieceTokenizer for a model without)")
        return bos

    def tokenize(self, text: str) -> list[int]:
        return [self.bos] + super().tokenize(text)

    def tokenize_batch(self, texts: list[str]) -> list[list[int]]:
        bos = self.bos
        return [[bos] + ids for ids in super().tokenize_batch(texts)]
