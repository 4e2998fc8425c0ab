"""megaclm.tokenizer: one interface over GPT-2 BPE, SentencePiece, HF tokenizer.json and raw ids.

    tok = build_tokenizer("GPT2BPETokenizer", vocab_file=..., merge_file=...)
    tok.tokenize("Hello world")      # [15496, 995]
    tok.eod, tok.vocab_size, tok.padded_vocab_size   # 50256, 50257, 50304
"""
from megaclm.config.tokenizer import TOKENIZER_TYPES, TokenizerConfig
from megaclm.tokenizer.base import BaseTokenizer
from megaclm.utils.errors import UserError


def build_tokenizer(
    tokenizer_type: str,
    *,
    vocab_file: str | None = None,
    merge_file: str | None = None,
    tokenizer_model: str | None = None,
    vocab_size: int | None = None,
    tiktoken_pattern: str = "v2",
    tiktoken_num_special_tokens: int = 1000,
    tiktoken_special_tokens: list[str] | None = None,
    make_vocab_size_divisible_by: int = 128,
    tensor_model_parallel_size: int = 1,
) -> BaseTokenizer:
    """The tokenizer named by `tokenizer_type` (Megatron's --tokenizer-type values)."""
    padding = dict(
        make_vocab_size_divisible_by=make_vocab_size_divisible_by,
        tensor_model_parallel_size=tensor_model_parallel_size,
    )
    # Imported lazily: each family pulls in its own library.
    if tokenizer_type == "GPT2BPETokenizer":
        from megaclm.tokenizer.gpt2_bpe import GPT2BPETokenizer

        return GPT2BPETokenizer(vocab_file, merge_file, **padding)
    if tokenizer_type == "SentencePieceTokenizer":
        from megaclm.tokenizer.sentencepiece_tokenizer import SentencePieceTokenizer

        return SentencePieceTokenizer(tokenizer_model, **padding)
    if tokenizer_type == "Llama2Tokenizer":
        from megaclm.tokenizer.sentencepiece_tokenizer import Llama2Tokenizer

        return Llama2Tokenizer(tokenizer_model, **padding)
    if tokenizer_type == "Llama3Tokenizer":
        from megaclm.tokenizer.tiktoken_tokenizer import Llama3Tokenizer

        return Llama3Tokenizer(tokenizer_model, **padding)
    if tokenizer_type == "TikTokenizer":
        from megaclm.tokenizer.tiktoken_tokenizer import TikTokenizer

        return TikTokenizer(tokenizer_model, tiktoken_pattern, vocab_size, tiktoken_num_special_tokens,
                            tiktoken_special_tokens, **padding)
    if tokenizer_type == "HuggingFaceTokenizer":
        from megaclm.tokenizer.huggingface import HuggingFaceTokenizer

        return HuggingFaceTokenizer(tokenizer_model, **padding)
    if tokenizer_type == "NullTokenizer":
        from megaclm.tokenizer.null import NullTokenizer

        return NullTokenizer(vocab_size, **padding)
    raise UserError(f"--tokenizer-type {tokenizer_type!r} is unknown; choose one of {', '.join(TOKENIZER_TYPES)}")


def build_tokenizer_from_config(cfg: TokenizerConfig, tensor_model_parallel_size: int = 1) -> BaseTokenizer:
    """The tokenizer a `TokenizerConfig` describes (TP size comes from the parallel section)."""
    if cfg.tokenizer_type is None:
        raise UserError("tokenizer.tokenizer_type is not set; pass --tokenizer-type (one of "
                        f"{', '.join(TOKENIZER_TYPES)})")
    return build_tokenizer(
        cfg.tokenizer_type,
        vocab_file=cfg.vocab_file,
        merge_file=cfg.merge_file,
        tokenizer_model=cfg.tokenizer_model,
        vocab_size=cfg.vocab_size,
        tiktoken_pattern=cfg.tiktoken_pattern,
        tiktoken_num_special_tokens=cfg.tiktoken_num_special_tokens,
        tiktoken_special_tokens=cfg.tiktoken_special_tokens,
        make_vocab_size_divisible_by=cfg.make_vocab_size_divisible_by,
        tensor_model_parallel_size=tensor_model_parallel_size,
    )


def model_vocab_size(cfg: TokenizerConfig, tokenizer: BaseTokenizer) -> int:
    """Rows of the embedding before padding: the tokenizer's vocabulary, or a larger --vocab-size (Megatron-LM's
    Llama-3 example passes --vocab-size 128256 with its HF tokenizer; a larger one leaves room for added tokens)."""
    if cfg.vocab_size is None or cfg.tokenizer_type in ("NullTokenizer", "TikTokenizer"):
        return tokenizer.vocab_size  # there --vocab-size already defined the tokenizer's vocabulary
    if cfg.vocab_size < tokenizer.vocab_size:
        raise UserError(f"--vocab-size {cfg.vocab_size} is below the {cfg.tokenizer_type}'s {tokenizer.vocab_size} "
                        f"ids; raise it to at least {tokenizer.vocab_size} or drop it")
    return cfg.vocab_size


__all__ = ["BaseTokenizer", "TOKENIZER_TYPES", "build_tokenizer", "build_tokenizer_from_config", "model_vocab_size"]
