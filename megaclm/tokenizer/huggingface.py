"""Any HF `tokenizers` tokenizer from a local `tokenizer.json` or a directory holding one.

Never touches the hub. eod is the `eos_token` of a `tokenizer_config.json` beside the file
when there is one, else the first of a few usual end-of-text tokens the vocabulary has.
"""
import json
import os

from tokenizers import Tokenizer

from megaclm.tokenizer import hf_common
from megaclm.tokenizer.base import BaseTokenizer, require_file
from megaclm.utils.errors import UserError

EOD_CANDIDATES = ("<|endoftext|>", "</s>", "<|end_of_text|>", "<eos>", "<|im_end|>", "[SEP]")


def _eos_from_config(directory: str) -> str | None:
    path = os.path.join(directory, "tokenizer_config.json")
    if not os.path.isfile(path):
        return None
    try:
        with open(path, encoding="utf-8") as f:
            eos = json.load(f).get("eos_token")
    except (OSError, ValueError) as e:
        raise UserError(f"{path}: cannot read it as JSON ({e}); fix or remove it") from e
    return eos.get("content") if isinstance(eos, dict) else eos


class HuggingFaceTokenizer(BaseTokenizer):
    def __init__(self, tokenizer_model: str | None, **padding):
        super().__init__(**padding)
        require_file(tokenizer_model, "--tokenizer-model", "local tokenizer.json or a directory holding one")
        path = tokenizer_model
        if os.path.isdir(path):
            path = os.path.join(path, "tokenizer.json")
            if not os.path.isfile(path):
                raise UserError(
                    f"--tokenizer-model {tokenizer_model}: directory has no tokenizer.json; save the tokenizer "
                    "with `tokenizer.save_pretrained(dir)` from transformers or train one with tools/train_tokenizer.py"
                )
        try:
            tok = Tokenizer.from_file(path)
        except Exception as e:  # tokenizers raises plain Exception on a malformed file
            raise UserError(f"--tokenizer-model {path}: not a valid tokenizer.json ({e})") from e
        self._tok = hf_common.prepare(tok)
        self.path = path
        eos = _eos_from_config(os.path.dirname(os.path.abspath(path)))
        names = [eos] if eos else [t for t in EOD_CANDIDATES if tok.token_to_id(t) is not None][:1]
        self._eod = tok.token_to_id(names[0]) if names else None
        if eos and self._eod is None:
            raise UserError(f"{path}: eos_token {eos!r} of tokenizer_config.json is not in the vocabulary")

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    @property
    def eod(self) -> int:
        if self._eod is None:
            raise UserError(
                f"{self.path}: no end-of-document token found (looked for tokenizer_config.json eos_token "
                f"and {', '.join(EOD_CANDIDATES)}); add an eos_token to tokenizer_config.json"
            )
        return self._eod

    def tokenize(self, text: str) -> list[int]:
        return hf_common.encode(self._tok, text)

    def tokenize_batch(self, texts: list[str]) -> list[list[int]]:
        return hf_common.encode_batch(self._tok, texts)

    def detokenize(self, ids: list[int]) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=False)
