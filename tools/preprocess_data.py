"""Tokenize a corpus into Megatron MMIDIDX datasets: {output_prefix}_{key}_document.{bin,idx}
({output_prefix}_{key}_sentence with --split-sentences: one sequence per sentence, grouped by document).

    python tools/preprocess_data.py --input corpus.jsonl --output-prefix data/my \\
        --tokenizer-type GPT2BPETokenizer --vocab-file gpt2-vocab.json --merge-file gpt2-merges.txt \\
        --append-eod --workers 2

Megatron-LM's flags; the pipeline is megaclm.data.preprocess (streaming, ordered, batched).
"""
import argparse
import functools
import os
import signal
import sys
import time

from megaclm.config.megatron_compat import native_value
from megaclm.data.indexed_dataset import data_file_path, index_file_path
from megaclm.data.preprocess import EMPTY_DOC_RULE, Options, preprocess_partitioned
from megaclm.data.readers import TEXT_MODE_HELP, TEXT_MODES, check_text_mode, expand_inputs
from megaclm.data.sentences import language_code
from megaclm.logging import get_logger
from megaclm.tokenizer import TOKENIZER_TYPES, build_tokenizer
from megaclm.utils import exitcodes
from megaclm.utils.errors import UserError, cli_main

log = get_logger("megaclm.preprocess")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog=f"Empty documents: {EMPTY_DOC_RULE} Document order in the output equals input order "
               "for any --workers/--partitions.",
    )
    g = p.add_argument_group("input")
    g.add_argument("--input", nargs="+", required=True,
                   help="Files, globs or directories (searched recursively): .jsonl/.json (one JSON object per "
                        "line, or a .json holding one JSON array of objects), optionally .gz/.zst compressed; .txt "
                        "(see --text-mode); .csv, .parquet and .arrow (--json-keys name columns); a folder written by "
                        "Hugging Face datasets' save_to_disk (a DatasetDict's: name the split's folder unless it has "
                        "one split).")
    g.add_argument("--text-mode", choices=TEXT_MODES, default=None, help=TEXT_MODE_HELP)
    g.add_argument("--json-keys", "--json-key", nargs="+", default=["text"],
                   help="Keys (columns) to tokenize; one dataset per key (default: text). --json-key "
                        "(train_tokenizer.py's spelling) is accepted too.")
    g.add_argument("--skip-bad-lines", action="store_true",
                   help="Skip (and count) malformed lines (rows, JSON array elements, .txt lines or paragraphs) "
                        "instead of stopping: bad JSON, missing key, non-string value, invalid UTF-8.")
    g = p.add_argument_group("tokenizer")
    g.add_argument("--tokenizer-type", required=True, type=lambda v: native_value("--tokenizer-type", v),
                   choices=TOKENIZER_TYPES, help="Megatron's names; GPTSentencePieceTokenizer = SentencePieceTokenizer.")
    g.add_argument("--vocab-file", help="GPT-2 vocab.json (GPT2BPETokenizer).")
    g.add_argument("--merge-file", help="GPT-2 merges.txt (GPT2BPETokenizer).")
    g.add_argument("--tokenizer-model", help="SentencePiece .model, or tokenizer.json / its directory.")
    g.add_argument("--vocab-size", type=int, help="NullTokenizer: ids in the text are below this.")
    g.add_argument("--append-eod", action="store_true", help="Append the end-of-document token to every document.")
    g.add_argument("--split-sentences", action="store_true",
                   help="Split each document into sentences (pysbd, rule-based: no NLTK data to download); each "
                        "sentence becomes one sequence of the document; writes {prefix}_{key}_sentence.")
    g.add_argument("--lang", default="english",
                   help="--split-sentences: the language, as NLTK names it (english, german, ...) or an ISO code.")
    g.add_argument("--keep-newlines", action="store_true",
                   help="--split-sentences: keep each sentence's whitespace and newlines (default: stripped).")
    g = p.add_argument_group("output")
    g.add_argument("--output-prefix", required=True,
                   help="Writes {prefix}_{key}_document.bin/.idx; the directory must exist.")
    g.add_argument("--overwrite", action="store_true",
                   help="Replace existing datasets under --output-prefix (refused without it). The old files "
                        "stay until the new ones are complete.")
    g = p.add_argument_group("runtime")
    g.add_argument("--workers", type=int, default=len(os.sched_getaffinity(0)),
                   help="Tokenizing processes (default: the usable cores); 1 tokenizes in this process.")
    g.add_argument("--partitions", type=int, default=1,
                   help="Process this many contiguous groups of input files side by side (workers are "
                        "shared out), then concatenate them in order.")
    g.add_argument("--log-interval", type=int, default=10000,
                   help="Without a terminal (no progress bar), log progress every this many documents.")
    g.add_argument("--chunk-bytes", type=int, default=1 << 20,
                   help="Input bytes per unit of work sent to a worker.")
    g.add_argument("--keep-sequential-samples", action="store_true",
                   help="Accepted for Megatron-LM compatibility: megaclm always keeps the input order, for any "
                        "--workers and --partitions.")
    args = p.parse_args(argv)
    for name in ("workers", "partitions", "log_interval", "chunk_bytes"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} {getattr(args, name)} must be >= 1")
    if len(set(args.json_keys)) != len(args.json_keys):
        raise UserError(f"--json-keys {' '.join(args.json_keys)}: a key is repeated; name each key once")
    if args.split_sentences:
        language_code(args.lang)  # an unknown language fails here, before any file is opened
    elif args.lang != "english" or args.keep_newlines:
        raise UserError("--lang and --keep-newlines only apply with --split-sentences; add it or drop them")
    return args


class Progress:
    """A tqdm bar (docs/s and MB/s) on a terminal, else a log line every `interval` documents."""

    def __init__(self, interval: int):
        from tqdm import tqdm

        self.start = time.perf_counter()
        self.docs = self.bytes = self.next_log = 0
        self.interval = interval
        self.bar = tqdm(unit=" docs", file=sys.stderr, dynamic_ncols=True) if sys.stderr.isatty() else None

    def __call__(self, docs: int, nbytes: int) -> None:
        self.docs += docs
        self.bytes += nbytes
        mb_s = self.bytes / 1e6 / max(1e-9, time.perf_counter() - self.start)
        if self.bar is not None:
            self.bar.update(docs)
            self.bar.set_postfix_str(f"{mb_s:.2f} MB/s", refresh=False)
        elif self.docs >= self.next_log:
            log.info(f"{self.docs} documents, {self.bytes / 1e6:.1f} MB, {mb_s:.2f} MB/s")
            self.next_log = self.docs + self.interval

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def check_outputs_absent(prefixes: dict[str, str], overwrite: bool) -> None:
    """Refuse to replace a dataset silently: it may be what a running training reads."""
    existing = [p for prefix in prefixes.values() for p in (data_file_path(prefix), index_file_path(prefix))
                if os.path.exists(p)]
    if existing and not overwrite:
        raise UserError(f"--output-prefix: {', '.join(existing)} already exist; pass --overwrite to replace them "
                        "or choose another --output-prefix")


def main(argv=None) -> int:
    args = parse_args(argv)
    level = "sentence" if args.split_sentences else "document"
    prefixes = {k: f"{args.output_prefix}_{k}_{level}" for k in args.json_keys}
    check_outputs_absent(prefixes, args.overwrite)
    files = expand_inputs(args.input)
    text_mode = check_text_mode(files, args.text_mode)
    make_tokenizer = functools.partial(
        build_tokenizer, args.tokenizer_type, vocab_file=args.vocab_file, merge_file=args.merge_file,
        tokenizer_model=args.tokenizer_model, vocab_size=args.vocab_size,
    )
    log.info(f"{len(files)} input file(s), {args.tokenizer_type}, {args.workers} worker(s), keys {args.json_keys}")
    opts = Options(keys=tuple(args.json_keys), append_eod=args.append_eod, skip_bad_lines=args.skip_bad_lines,
                   chunk_bytes=args.chunk_bytes, split_sentences=args.split_sentences, lang=args.lang,
                   keep_newlines=args.keep_newlines, text_mode=text_mode)
    progress = Progress(args.log_interval)
    start = time.perf_counter()
    try:
        stats = preprocess_partitioned(files, prefixes, make_tokenizer, opts, args.workers, args.partitions, progress)
    except KeyboardInterrupt:
        # Stopped cleanly: workers ended, temporary files removed. Leave now: the interpreter's exit would
        # join the process pool's threads, which a killed worker can leave blocked (preprocess._kill_workers).
        progress.close()
        print("interrupted", file=sys.stderr, flush=True)
        sys.stdout.flush()
        os._exit(exitcodes.INTERRUPTED)
    finally:
        progress.close()
    dt = max(1e-9, time.perf_counter() - start)
    print(f"done in {dt:.1f} s: {stats.documents} documents read, {stats.bad_lines} bad lines skipped, "
          f"{stats.bytes / 1e6:.1f} MB ({stats.documents / dt:.0f} docs/s, {stats.bytes / 1e6 / dt:.2f} MB/s)")
    for k, s in stats.keys.items():
        print(f"  {prefixes[k]}: {s.documents} documents, {s.tokens} tokens, {s.empty} empty skipped")
    return 0


if __name__ == "__main__":
    # SIGTERM (kill, a scheduler's preemption) stops like Ctrl-C: temp files are removed.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    cli_main(main)
