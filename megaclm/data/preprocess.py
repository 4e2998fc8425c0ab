"""The preprocessing pipeline: input files -> token ids -> one MMIDIDX dataset per JSON key.

    main process:  iter_chunks (raw ~1 MiB slices, cut at line ends)  ->  bounded window of
                   at most 2 x workers chunks in flight  ->  results taken back IN INPUT ORDER
                   ->  IndexedDatasetBuilder per key (streaming; finalized atomically)
    workers:       parse_chunk (UTF-8, JSON, keys)  ->  tokenizer.tokenize_batch  ->  numpy arrays

Memory is bounded by the window whatever the input size, and the output does not depend on the
number of workers. `--partitions P` runs P such pipelines side by side on contiguous groups of
input files and concatenates their datasets in order (Megatron's partitions, same output).

This module takes the tokenizer as a picklable zero-argument factory (data never imports
megaclm.tokenizer); it only needs `tokenize_batch_flat`, `vocab_size` and `eod` from it.
"""
import contextlib
import multiprocessing as mp
import os
import queue
import shutil
import signal
import tempfile
import threading
import traceback
from collections import deque
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import numpy as np

from megaclm.data.indexed_dataset import IndexedDatasetBuilder, optimal_dtype
from megaclm.data.readers import Chunk, file_format, iter_chunks, parse_chunk
from megaclm.data.sentences import split_sentences
from megaclm.utils import exitcodes
from megaclm.utils.errors import UserError

EMPTY_DOC_RULE = (
    "A document whose text tokenizes to nothing is skipped (counted as 'empty' in the summary); "
    "with --append-eod it is kept as the single token eod."
)


@dataclass(frozen=True)
class Options:
    keys: tuple[str, ...] = ("text",)
    append_eod: bool = False
    skip_bad_lines: bool = False
    chunk_bytes: int = 1 << 20
    split_sentences: bool = False  # one sequence per sentence, grouped into documents (Megatron's _sentence)
    lang: str = "english"
    keep_newlines: bool = False
    text_mode: str = "file"  # .txt inputs: file, line or paragraph (readers.TEXT_MODES)


@dataclass
class KeyStats:
    documents: int = 0  # written to the dataset
    tokens: int = 0
    empty: int = 0  # skipped because they tokenized to nothing


@dataclass
class Stats:
    documents: int = 0  # read from the input (good lines / rows / files)
    bad_lines: int = 0  # skipped by --skip-bad-lines
    bytes: int = 0  # input bytes (uncompressed)
    keys: dict[str, KeyStats] = field(default_factory=dict)

    def add(self, other: "Stats") -> None:
        self.documents += other.documents
        self.bad_lines += other.bad_lines
        self.bytes += other.bytes
        for k, s in other.keys.items():
            mine = self.keys.setdefault(k, KeyStats())
            mine.documents += s.documents
            mine.tokens += s.tokens
            mine.empty += s.empty


@dataclass
class Encoded:
    """One chunk's output: per key, the concatenated ids, each sequence's length and (sentence-level)
    the number of sequences of each document."""

    tokens: list[np.ndarray]
    lengths: list[np.ndarray]
    sequences: list[np.ndarray | None]
    empty: list[int]
    documents: int
    bad_lines: int
    nbytes: int


def encode_chunk(chunk: Chunk, tokenizer: Any, opts: Options, dtype: type) -> Encoded:
    texts, bad = parse_chunk(chunk, list(opts.keys), opts.skip_bad_lines)
    tokens, lengths, sequences, empty = [], [], [], []
    for col in texts:
        if opts.split_sentences:
            flat, lens, per_doc, n_empty = _encode_sentences(col, tokenizer, opts, dtype)
            tokens.append(flat)
            lengths.append(lens)
            sequences.append(per_doc)
            empty.append(n_empty)
            continue
        flat, lens = tokenizer.tokenize_batch_flat(col, dtype)
        n_empty = 0
        if opts.append_eod:
            # eod after each document: inserted at every document end (an empty document,
            # whose end repeats the previous one, becomes [eod]: see EMPTY_DOC_RULE).
            flat = np.insert(flat, np.cumsum(lens, dtype=np.int64), np.asarray(tokenizer.eod, dtype=dtype))
            lens = lens + 1
        else:
            n_empty = int((lens == 0).sum())
            lens = lens[lens > 0]  # empty documents hold no tokens: dropping their lengths drops them
        tokens.append(flat)
        lengths.append(lens)
        sequences.append(None)
        empty.append(n_empty)
    return Encoded(tokens, lengths, sequences, empty, len(texts[0]) if texts else 0, bad, chunk.nbytes)


def _encode_sentences(docs: list[str], tokenizer: Any, opts: Options, dtype: type):
    """Megatron's --split-sentences: each sentence one sequence (sentences that tokenize to nothing are
    dropped), eod appended to a document's last one; a document without sentences follows EMPTY_DOC_RULE."""
    sentences = [split_sentences(d, opts.lang, opts.keep_newlines) for d in docs]
    flat, lens = tokenizer.tokenize_batch_flat([s for doc in sentences for s in doc], dtype)
    first = np.concatenate([[0], np.cumsum([len(doc) for doc in sentences], dtype=np.int64)])  # per document
    starts = np.concatenate([[0], np.cumsum(lens, dtype=np.int64)])  # per sentence, into `flat`
    flat_parts, out_lens, per_doc, n_empty = [], [], [], 0
    for d in range(len(docs)):
        mine = [i for i in range(first[d], first[d + 1]) if lens[i] > 0]
        pieces = [flat[starts[i]:starts[i + 1]] for i in mine]
        seq_lens = [int(lens[i]) for i in mine]
        if opts.append_eod:
            if not pieces:  # an empty document is kept as the single token eod
                pieces, seq_lens = [np.zeros(0, dtype)], [0]
            pieces.append(np.asarray([tokenizer.eod], dtype))
            seq_lens[-1] += 1
        elif not pieces:
            n_empty += 1
            continue
        flat_parts += pieces
        out_lens += seq_lens
        per_doc.append(len(seq_lens))
    joined = np.concatenate(flat_parts) if flat_parts else np.zeros(0, dtype)
    return joined, np.asarray(out_lens, np.int32), np.asarray(per_doc, np.int64), n_empty


# Per-process state of a pool worker, set once by its initializer (the executor API offers no
# other place to keep a tokenizer between tasks).
_WORKER: dict[str, Any] = {}


def _init_worker(make_tokenizer: Callable[[], Any], opts: Options, dtype: type) -> None:
    # Ctrl-C reaches the whole process group; the main process decides how to stop.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # One thread per worker: the workers are the parallelism (HF tokenizers reads these lazily).
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    os.environ["RAYON_NUM_THREADS"] = "1"
    tok = make_tokenizer()
    tok.num_threads = 1
    _WORKER.update(tokenizer=tok, opts=opts, dtype=dtype)


def _encode_in_worker(chunk: Chunk) -> Encoded:
    return encode_chunk(chunk, _WORKER["tokenizer"], _WORKER["opts"], _WORKER["dtype"])


@contextlib.contextmanager
def _encoded_in_order(chunks: Iterator[Chunk], make_tokenizer, tokenizer, opts, dtype, workers) -> Iterator[Iterator[Encoded]]:
    """Encoded chunks in input order; at most 2 x workers chunks exist at once."""
    if workers <= 1:
        yield (encode_chunk(c, tokenizer, opts, dtype) for c in chunks)
        return
    pool = ProcessPoolExecutor(workers, mp_context=mp.get_context("forkserver"),
                               initializer=_init_worker, initargs=(make_tokenizer, opts, dtype))

    def ordered() -> Iterator[Encoded]:
        window: deque = deque()
        for c in chunks:
            window.append(pool.submit(_encode_in_worker, c))
            if len(window) >= 2 * workers:
                yield window.popleft().result()
        while window:
            yield window.popleft().result()

    try:
        yield ordered()
    except KeyboardInterrupt:
        _kill_workers(pool)
        raise
    except BaseException as e:
        # Drop queued chunks; running ones finish (each is ~1 MiB, well under a second).
        pool.shutdown(wait=True, cancel_futures=True)
        if isinstance(e, BrokenProcessPool):
            raise RuntimeError("a preprocessing worker died (out of memory? killed?); see the messages above") from e
        raise
    pool.shutdown(wait=True)


def _kill_workers(pool: ProcessPoolExecutor) -> None:
    """Ctrl-C: end the workers now instead of waiting for the chunks in flight (a second Ctrl-C during that
    wait used to leave the main process stuck in the executor's exit-time join, the workers alive).

    Python 3.11's executor has no public way to end its workers (3.14 adds kill_workers()), hence
    `_processes`. A worker killed while sending a result leaves the executor's manager thread blocked on
    the half-written message, and Python's exit joins that thread: after a KeyboardInterrupt from here the
    process must leave with os._exit (tools/preprocess_data.py and _partition_main do)."""
    workers = list((pool._processes or {}).values())
    pool.shutdown(wait=False, cancel_futures=True)
    for w in workers:
        w.kill()
    for w in workers:
        w.join(timeout=5)


@contextlib.contextmanager
def uninterruptible() -> Iterator[None]:
    """Ignore SIGINT/SIGTERM during a short cleanup, so that a second Ctrl-C cannot cut it half-way (leaving
    temporary files or live workers); the first signal is already on its way up as KeyboardInterrupt."""
    if threading.current_thread() is not threading.main_thread():
        yield  # signal handlers belong to the main thread
        return
    saved = {sig: signal.signal(sig, signal.SIG_IGN) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in saved.items():
            signal.signal(sig, handler)


def preprocess(
    files: list[str],
    prefixes: dict[str, str],
    make_tokenizer: Callable[[], Any],
    opts: Options,
    workers: int = 1,
    on_progress: Callable[[int, int], None] | None = None,
    require_documents: bool = True,
) -> Stats:
    """Tokenize `files` into one dataset per key at `prefixes[key]`; returns the counts.

    Nothing appears under the final names unless every dataset is complete, and (`require_documents`)
    holds at least one document: an empty result is a UserError saying why.
    """
    if len(opts.keys) > 1 and any(file_format(f)[0] == "txt" for f in files):
        raise UserError("a .txt input has no keys (its documents are plain text); use a single --json-keys with .txt files")
    tokenizer = make_tokenizer()
    dtype = optimal_dtype(tokenizer.vocab_size)
    if opts.append_eod:
        tokenizer.eod  # noqa: B018 - fail now, not in a worker, when the tokenizer has no eod
    stats = Stats(keys={k: KeyStats() for k in opts.keys})
    chunks = (c for f in files for c in iter_chunks(f, list(opts.keys), opts.chunk_bytes, opts.text_mode))
    stack = contextlib.ExitStack()
    try:
        builders = [stack.enter_context(IndexedDatasetBuilder(prefixes[k], dtype)) for k in opts.keys]
        encoded = stack.enter_context(_encoded_in_order(chunks, make_tokenizer, tokenizer, opts, dtype, workers))
        for r in encoded:
            for k, b, toks, lens, per_doc, n_empty in zip(opts.keys, builders, r.tokens, r.lengths, r.sequences,
                                                           r.empty):
                b.add_documents(toks, lens, per_doc)
                s = stats.keys[k]
                s.documents += len(lens) if per_doc is None else len(per_doc)
                s.tokens += toks.size
                s.empty += n_empty
            stats.documents += r.documents
            stats.bad_lines += r.bad_lines
            stats.bytes += r.nbytes
            if on_progress:
                on_progress(r.documents, r.nbytes)
        if require_documents:
            check_documents_written(stats, files)
        for b in builders:
            b.finalize()
    except BaseException as e:
        with uninterruptible():  # workers stopped and temporary files removed, even on a second Ctrl-C
            stack.__exit__(type(e), e, e.__traceback__)
        raise
    stack.close()
    return stats


def check_documents_written(stats: Stats, files: list[str]) -> None:
    """An empty dataset is never what the user wanted: refuse it, saying why it is empty."""
    empty_keys = [k for k, s in stats.keys.items() if s.documents == 0]
    if not empty_keys:
        return
    named = ", ".join(files[:3]) + (f" and {len(files) - 3} more" if len(files) > 3 else "")
    if stats.documents == 0 and stats.bad_lines:
        why = f"all {stats.bad_lines} lines were skipped as bad (--skip-bad-lines) in {named}; fix the input"
    elif stats.documents == 0:
        why = f"the input holds no document (empty files, blank lines only, an empty JSON array or table): {named}"
    else:
        k = empty_keys[0]
        why = (f"every one of the {stats.documents} documents' {k!r} tokenized to nothing (in {named}); "
               "pass --append-eod to keep empty documents as a single eod")
    raise UserError(f"0 documents written: {why}; nothing was written")


def split_files(files: list[str], parts: int) -> list[list[str]]:
    """Up to `parts` contiguous, non-empty groups of about equal total size (order kept)."""
    sizes = [max(1, os.path.getsize(f)) for f in files]
    target = sum(sizes) / max(1, min(parts, len(files)))
    groups: list[list[str]] = [[]]
    acc = 0.0
    for i, (f, s) in enumerate(zip(files, sizes)):
        files_left, groups_left = len(files) - i, parts - len(groups)
        if groups[-1] and groups_left > 0 and (acc >= target * len(groups) or files_left <= groups_left):
            groups.append([])
        groups[-1].append(f)
        acc += s
    return groups


def _partition_main(index: int, files, prefixes, make_tokenizer, opts, workers, q) -> None:
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # SIGTERM -> KeyboardInterrupt -> abort
    try:
        # One empty partition is fine: the parent checks the whole.
        stats = preprocess(files, prefixes, make_tokenizer, opts, workers,
                           on_progress=lambda docs, nbytes: q.put(("progress", docs, nbytes)),
                           require_documents=False)
        q.put(("done", index, stats))
    except UserError as e:
        q.put(("error", index, str(e), True))
    except KeyboardInterrupt:
        os._exit(exitcodes.INTERRUPTED)  # workers killed, files removed; see _kill_workers
    except BaseException:  # noqa: BLE001 - reported to the parent, which raises it
        q.put(("error", index, traceback.format_exc(), False))


def preprocess_partitioned(
    files: list[str],
    prefixes: dict[str, str],
    make_tokenizer: Callable[[], Any],
    opts: Options,
    workers: int = 1,
    partitions: int = 1,
    on_progress: Callable[[int, int], None] | None = None,
) -> Stats:
    """`preprocess` over `partitions` groups of files in parallel, then merged in input order."""
    groups = split_files(files, partitions)
    if len(groups) <= 1:
        return preprocess(files, prefixes, make_tokenizer, opts, workers, on_progress)
    tokenizer = make_tokenizer()  # validate here, not P times in children
    dtype = optimal_dtype(tokenizer.vocab_size)
    out_dir = os.path.dirname(os.path.abspath(next(iter(prefixes.values()))))
    if not os.path.isdir(out_dir):
        raise UserError(f"output directory {out_dir} does not exist; create it or change --output-prefix")
    tmp = tempfile.mkdtemp(prefix=".megaclm-partitions-", dir=out_dir)
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    part_prefixes = [{k: os.path.join(tmp, f"part{i}_{k}") for k in opts.keys} for i in range(len(groups))]
    procs = [
        ctx.Process(target=_partition_main, args=(i, g, part_prefixes[i], make_tokenizer, opts, max(1, workers // len(groups)), q))
        for i, g in enumerate(groups)
    ]
    try:
        for p in procs:
            p.start()
        stats = Stats(keys={k: KeyStats() for k in opts.keys})
        done = 0
        while done < len(procs):
            try:
                msg = q.get(timeout=1.0)
            except queue.Empty:
                dead = [p.exitcode for p in procs if p.exitcode not in (None, 0)]
                if dead:
                    raise RuntimeError(f"a preprocessing partition died with exit code {dead[0]}") from None
                continue
            if msg[0] == "progress" and on_progress:
                on_progress(msg[1], msg[2])
            elif msg[0] == "done":
                stats.add(msg[2])
                done += 1
            elif msg[0] == "error":
                raise UserError(msg[2]) if msg[3] else RuntimeError(f"partition {msg[1]} failed:\n{msg[2]}")
        for p in procs:
            p.join()
        check_documents_written(stats, files)
        for k in opts.keys:
            with IndexedDatasetBuilder(prefixes[k], dtype) as b:
                for pp in part_prefixes:
                    b.add_index(pp[k])
                b.finalize()
        return stats
    finally:
        with uninterruptible():
            for p in procs:
                if p.is_alive():
                    p.terminate()  # SIGTERM: the partition stops its own workers and exits
            for p in procs:
                if p.pid is not None:
                    p.join(timeout=5)
                    if p.is_alive():
                        p.kill()
                        p.join()
            shutil.rmtree(tmp, ignore_errors=True)
