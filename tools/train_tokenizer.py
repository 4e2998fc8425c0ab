"""Train a tokenizer on the same inputs as preprocess_data.py.

    # byte-level BPE (HF tokenizers) -> OUT/tokenizer.json (+ tokenizer_config.json): --tokenizer-type HuggingFaceTokenizer
    python tools/train_tokenizer.py --input corpus.jsonl --type bpe --vocab-size 32000 --output-dir tok/
    # unigram (sentencepiece) -> OUT/tokenizer.model: --tokenizer-type SentencePieceTokenizer
    python tools/train_tokenizer.py --input corpus.jsonl --type unigram --vocab-size 8000 --output-dir tok/

BPE reserves <|endoftext|> as the end-of-document token; unigram keeps sentencepiece's
<unk>=0, <s>=1, </s>=2 (</s> is eod). Files appear atomically.
"""
import argparse
import io
import json
import os
from typing import Iterator

from megaclm.data.readers import expand_inputs, read_texts
from megaclm.utils.errors import UserError, cli_main
from megaclm.utils.fileio import atomic_write

EOD = "<|endoftext|>"


def train_bpe(docs: Iterator[str], vocab_size: int, min_frequency: int, out_dir: str) -> int:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    if vocab_size < 257:
        raise UserError(f"--vocab-size {vocab_size}: a byte-level BPE needs at least 257 (256 bytes + {EOD})")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=[EOD],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tok.train_from_iterator(docs, trainer=trainer)
    with atomic_write(os.path.join(out_dir, "tokenizer.json"), "w") as f:
        f.write(tok.to_str())
    # transformers' AutoTokenizer reads this too; megaclm takes eod from eos_token.
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": EOD, "bos_token": EOD}
    with atomic_write(os.path.join(out_dir, "tokenizer_config.json"), "w") as f:
        json.dump(config, f, indent=2)
    return tok.get_vocab_size()


def train_unigram(docs: Iterator[str], vocab_size: int, max_sentences: int, out_dir: str) -> int:
    import sentencepiece as spm

    # sentencepiece learns from sentences: feed a document's non-empty lines.
    lines = (line for d in docs for line in d.split("\n") if line.strip())
    model = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=lines, model_writer=model, model_type="unigram", vocab_size=vocab_size,
            input_sentence_size=max_sentences, shuffle_input_sentence=True, byte_fallback=True,
            character_coverage=0.9995, logstream=open(os.devnull, "w"),
        )
    except RuntimeError as e:
        raise UserError(f"sentencepiece training failed: {e}; try a smaller --vocab-size or more text") from e
    with atomic_write(os.path.join(out_dir, "tokenizer.model")) as f:
        f.write(model.getvalue())
    return spm.SentencePieceProcessor(model_proto=model.getvalue()).get_piece_size()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--input", nargs="+", required=True, help="Files, globs or directories (as preprocess_data.py).")
    p.add_argument("--json-key", "--json-keys", default="text",
                   help="Key (column) holding the text (default: text); --json-keys, preprocess_data.py's spelling, "
                        "is accepted too.")
    p.add_argument("--type", choices=["bpe", "unigram"], default="bpe",
                   help="bpe: byte-level BPE with HF tokenizers; unigram: sentencepiece unigram.")
    p.add_argument("--vocab-size", type=int, required=True)
    p.add_argument("--output-dir", "--out", required=True,
                   help="Created if missing; --out, the spelling of convert_hf.py and reshard.py, is accepted too.")
    p.add_argument("--min-frequency", type=int, default=2, help="bpe: merges seen fewer times are not learned.")
    p.add_argument("--max-sentences", type=int, default=2_000_000,
                   help="unigram: sample at most this many lines (sentencepiece holds them in memory).")
    p.add_argument("--skip-bad-lines", action="store_true", help="Skip malformed input lines instead of stopping.")
    args = p.parse_args(argv)
    if args.vocab_size < 1:
        raise UserError(f"--vocab-size {args.vocab_size} must be >= 1")
    files = expand_inputs(args.input)
    try:
        os.makedirs(args.output_dir, exist_ok=True)
    except OSError as e:
        raise UserError(f"--output-dir {args.output_dir}: cannot create it ({e.strerror})") from e
    docs = read_texts(files, args.json_key, skip_bad_lines=args.skip_bad_lines)
    if args.type == "bpe":
        n = train_bpe(docs, args.vocab_size, args.min_frequency, args.output_dir)
        use = f"--tokenizer-type HuggingFaceTokenizer --tokenizer-model {args.output_dir}"
    else:
        n = train_unigram(docs, args.vocab_size, args.max_sentences, args.output_dir)
        use = f"--tokenizer-type SentencePieceTokenizer --tokenizer-model {os.path.join(args.output_dir, 'tokenizer.model')}"
    print(f"trained a {args.type} tokenizer with {n} tokens in {args.output_dir}; use it with {use}")
    return 0


if __name__ == "__main__":
    cli_main(main)
