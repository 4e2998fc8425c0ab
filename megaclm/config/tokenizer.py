"""`tokenizer:` section: which tokenizer, its files, and how the vocabulary is padded."""
from __future__ import annotations

from dataclasses import dataclass, field

from megaclm.utils.errors import UserError

TOKENIZER_TYPES = ("GPT2BPETokenizer", "SentencePieceTokenizer", "HuggingFaceTokenizer", "NullTokenizer",
                   "Llama2Tokenizer", "Llama3Tokenizer", "TikTokenizer")

# The fields each type needs (files are checked for existence when the tokenizer is built).
_REQUIRED = {
    "GPT2BPETokenizer": ("vocab_file", "merge_file"),
    "SentencePieceTokenizer": ("tokenizer_model",),
    "HuggingFaceTokenizer": ("tokenizer_model",),
    "NullTokenizer": ("vocab_size",),
    "Llama2Tokenizer": ("tokenizer_model",),
    "Llama3Tokenizer": ("tokenizer_model",),
    "TikTokenizer": ("tokenizer_model",),
}


@dataclass(frozen=True)
class TokenizerConfig:
    """Megatron's tokenizer flags; `megaclm.tokenizer.build_tokenizer_from_config` builds it."""

    tokenizer_type: str | None = field(default=None, metadata={
        "help": "Tokenizer family: GPT2BPETokenizer (vocab.json + merges.txt), SentencePieceTokenizer (.model), "
                "HuggingFaceTokenizer (local tokenizer.json or a directory holding one), NullTokenizer "
                "(text is space-separated ids; eod = --vocab-size), Llama2Tokenizer (Llama-2 SentencePiece .model, "
                "BOS first), Llama3Tokenizer (Llama-3 tiktoken tokenizer.model, BOS first), TikTokenizer "
                "(Megatron's tiktoken vocabulary JSON). Without it, --vocab-file + --merge-file mean GPT2BPETokenizer.",
        "choices": list(TOKENIZER_TYPES)})
    vocab_file: str | None = field(default=None, metadata={"help": "GPT-2 vocab.json (GPT2BPETokenizer)."})
    merge_file: str | None = field(default=None, metadata={"help": "GPT-2 merges.txt (GPT2BPETokenizer)."})
    tokenizer_model: str | None = field(default=None, metadata={
        "help": "SentencePiece .model file, or tokenizer.json / its directory for HuggingFaceTokenizer."})
    vocab_size: int | None = field(default=None, metadata={
        "help": "NullTokenizer: ids in the text are below this and eod is this value; TikTokenizer: the whole "
                "vocabulary (default 131072); other tokenizers: must not be below their own vocabulary."})
    tiktoken_pattern: str = field(default="v2", metadata={
        "help": "TikTokenizer: Megatron's split pattern v1 or v2.", "choices": ["v1", "v2"]})
    tiktoken_num_special_tokens: int = field(default=1000, metadata={
        "help": "TikTokenizer: ids reserved for special tokens before the BPE ranks."})
    tiktoken_special_tokens: list[str] | None = field(default=None, metadata={
        "help": "TikTokenizer: the named special tokens (must include <unk> <s> </s>).", "nargs": "+"})
    make_vocab_size_divisible_by: int = field(default=128, metadata={
        "help": "Pad the vocabulary to a multiple of this times the tensor-parallel size (Megatron's rule)."})

    def __post_init__(self):
        if self.tokenizer_type is None and self.vocab_file is not None and self.merge_file is not None:
            # Megatron-DeepSpeed's GPT examples pass the GPT-2 files without a type.
            object.__setattr__(self, "tokenizer_type", "GPT2BPETokenizer")
        if self.tokenizer_type is not None and self.tokenizer_type not in TOKENIZER_TYPES:
            raise UserError(f"tokenizer.tokenizer_type={self.tokenizer_type!r} is unknown; "
                            f"choose one of {', '.join(TOKENIZER_TYPES)}")
        for name in _REQUIRED.get(self.tokenizer_type, ()):
            if getattr(self, name) is None:
                raise UserError(f"tokenizer.{name} is required for tokenizer.tokenizer_type={self.tokenizer_type} "
                                f"(flag --{name.replace('_', '-')})")
        if self.vocab_size is not None and self.vocab_size < 1:
            raise UserError(f"tokenizer.vocab_size={self.vocab_size} must be >= 1")
        if self.make_vocab_size_divisible_by < 1:
            raise UserError(f"tokenizer.make_vocab_size_divisible_by={self.make_vocab_size_divisible_by} must be >= 1")
