"""GPT-2 byte-level BPE from Megatron's `gpt2-vocab.json` + `gpt2-merges.txt`, on HF `tokenizers`.

Built from the two files directly (model + ByteLevel pre-tokenizer/decoder), the way OpenAI's
encoder.py and Megatron's GPT2Tokenizer define it: ids equal transformers' GPT2TokenizerFast
on the same files. (`GPT2TokenizerFast(vocab_file=...)` alone can silently build an empty
tokenizer in transformers 5, hence not used.)
"""
from tokenizers import Tokenizer, decoders, models, pre_tokenizers

from megaclm.tokenizer import hf_common
from megaclm.tokenizer.base import BaseTokenizer, require_file
from megaclm.utils.errors import UserError

EOD_TOKEN = "<|endoftext|>"


class GPT2BPETokenizer(BaseTokenizer):
    def __init__(self, vocab_file: str | None, merge_file: str | None, **padding):
        super().__init__(**padding)
        require_file(vocab_file, "--vocab-file", "GPT-2 vocab.json (e.g. gpt2-vocab.json)")
        require_file(merge_file, "--merge-file", "GPT-2 merges.txt (e.g. gpt2-merges.txt)")
        try:
            model = models.BPE.from_file(vocab_file, merge_file)
        except Exception as e:  # tokenizers raises plain Exception on unreadable files
            raise UserError(f"cannot read GPT-2 BPE files --vocab-file {vocab_file} / --merge-file {merge_file}: {e}") from e
        tok = Tokenizer(model)
        # add_prefix_space=False and the GPT-2 split regex: exactly OpenAI's encoder.
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
        tok.decoder = decoders.ByteLevel()
        self._tok = hf_common.prepare(tok)
        eod = tok.token_to_id(EOD_TOKEN)
        if eod is None:
            raise UserError(f"--vocab-file {vocab_file} has no {EOD_TOKEN} entry; is it a GPT-2 vocab.json?")
        self._eod = eod

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    @property
    def eod(self) -> int:
        return self._eod

    def tokenize(self, text: str) -> list[int]:
        return hf_common.encode(self._tok, text)

    def tokenize_batch(self, texts: list[str]) -> list[list[int]]:
        return hf_common.encode_batch(self._tok, texts)

    def detokenize(self, ids: list[int]) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=False)
