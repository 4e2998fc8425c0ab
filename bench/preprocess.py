"""Preprocessing throughput: megaclm vs the tokenizer's own limit vs a Megatron-style pipeline.

    make data && .venv/bin/python bench/preprocess.py [--repeat 3] [--workers 2]

One corpus (the `make data` corpus: 42 Shakespeare works + 10,033 Wikipedia summaries, repeated
to >= 30 MB), GPT-2 BPE, --append-eod, all measured in this one run:
  (a) limit:    HF `tokenizers` encode_batch_fast of every document on all cores, texts already
                in memory, no JSON, no output.
  (a') the same for tiktoken, the engine megaclm's GPT2BPETokenizer uses on OpenAI's files
                (one process per core: tiktoken's batch call does not scale with threads).
  (b) Megatron: Megatron-LM's preprocess_data.py recipe - multiprocessing.Pool.imap over lines
                (chunksize 32), json.loads + encode one document at a time with Megatron's
                pure-Python GPT-2 BPE (a port of OpenAI's encoder.py, cached per word), each
                document written through the builder by the main process.
  (b') the same pipeline with megaclm's GPT2BPETokenizer per document (tiktoken engine): the
                Megatron pipeline with today's fast tokenizer, a much stronger baseline.
  (c) megaclm:  tools/preprocess_data.py, a fresh process, timed end to end.
(b), (b') and (c) must write byte-identical datasets (checked). Then peak RSS of (c), summed
over its process tree, on the corpus and on a 10x larger copy: it must not grow with the input.
Targets: c/a >= 0.8, c/b >= 4.
"""
import argparse
import json
import multiprocessing as mp
import os
import subprocess
import sys
import threading
import time

import numpy as np
import psutil
import regex

from megaclm.data.indexed_dataset import IndexedDatasetBuilder
from megaclm.tokenizer import build_tokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATA = os.path.join(ROOT, ".cache", "data")
WORK = os.path.join(ROOT, ".cache", "bench")
VOCAB, MERGES = os.path.join(DATA, "gpt2-vocab.json"), os.path.join(DATA, "gpt2-merges.txt")


class TreeMonitor:
    """CPU seconds and peak RSS of a process and all its descendants, sampled every 50 ms. CPU
    time, unlike wall time, barely moves when other jobs share the machine."""

    def __init__(self, pid: int):
        self.root = psutil.Process(pid)
        self.cpu: dict[int, float] = {}
        self.peak_rss = 0
        self._stop = threading.Event()

    def _sample(self) -> dict[int, float]:
        cpu, rss = {}, 0
        try:
            tree = [self.root, *self.root.children(recursive=True)]
        except psutil.Error:  # the root has exited
            return cpu
        for p in tree:
            try:
                t = p.cpu_times()
                cpu[p.pid] = t.user + t.system
                rss += p.memory_info().rss
            except psutil.Error:
                pass
        self.peak_rss = max(self.peak_rss, rss)
        return cpu

    def _loop(self) -> None:
        while not self._stop.wait(0.05):
            self.cpu.update(self._sample())

    def __enter__(self) -> "TreeMonitor":
        self.base = self._sample()
        self.peak_rss = 0
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.cpu.update(self._sample())
        self._stop.set()
        self._thread.join()

    @property
    def cpu_seconds(self) -> float:
        return sum(t - self.base.get(pid, 0.0) for pid, t in self.cpu.items())


def measured(fn, *args) -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process tree) of fn(*args)."""
    with TreeMonitor(os.getpid()) as mon:
        start = time.perf_counter()
        fn(*args)
        wall = time.perf_counter() - start
    return wall, mon.cpu_seconds


# ---------------------------------------------------------------- Megatron's pure-Python BPE
def _byte_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character table (visible bytes map to themselves)."""
    keep = [*range(33, 127), *range(161, 173), *range(174, 256)]
    table = {b: chr(b) for b in keep}
    extra = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return table


class PyGPT2BPE:
    """GPT-2 BPE the way OpenAI's encoder.py (and Megatron's GPT2Tokenizer) does it in Python."""

    SPLIT = regex.compile(r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+""")

    def __init__(self, vocab_file: str, merge_file: str):
        with open(vocab_file, encoding="utf-8") as f:
            self.encoder = json.load(f)
        with open(merge_file, encoding="utf-8") as f:
            merges = [tuple(line.split()) for line in f.read().split("\n")[1:] if line]
        self.ranks = {pair: i for i, pair in enumerate(merges)}
        self.byte_map = _byte_to_unicode()
        self.cache: dict[str, list[int]] = {}
        self.eod = self.encoder["<|endoftext|>"]

    def _bpe(self, word: str) -> list[int]:
        parts = list(word)
        while len(parts) > 1:
            ranked = [(self.ranks.get(p, 1 << 30), i) for i, p in enumerate(zip(parts, parts[1:]))]
            rank, i = min(ranked)
            if rank == 1 << 30:
                break
            a, b = parts[i], parts[i + 1]
            merged, j = [], 0
            while j < len(parts):  # merge every occurrence of the chosen pair, left to right
                if j < len(parts) - 1 and parts[j] == a and parts[j + 1] == b:
                    merged.append(a + b)
                    j += 2
                else:
                    merged.append(parts[j])
                    j += 1
            parts = merged
        return [self.encoder[p] for p in parts]

    def encode(self, text: str) -> list[int]:
        ids = []
        for piece in self.SPLIT.findall(text):
            word = "".join(self.byte_map[b] for b in piece.encode("utf-8"))
            if word not in self.cache:
                self.cache[word] = self._bpe(word)
            ids.extend(self.cache[word])
        return ids


# ---------------------------------------------------------------- (b) Megatron-style pipeline
_ENC: dict = {}


def _megatron_init(kind: str) -> None:
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    if kind == "python":
        _ENC["encode"] = PyGPT2BPE(VOCAB, MERGES).encode
    else:
        _ENC["encode"] = build_tokenizer("GPT2BPETokenizer", vocab_file=VOCAB, merge_file=MERGES).tokenize
    _ENC["eod"] = 50256


def _megatron_encode(line: str):
    doc = json.loads(line)
    ids = _ENC["encode"](doc["text"])
    ids.append(_ENC["eod"])
    return ids, len(line)


def run_megatron_style(corpus: str, prefix: str, workers: int, kind: str) -> float:
    start = time.perf_counter()
    with open(corpus, encoding="utf-8") as fin, \
            mp.get_context("forkserver").Pool(workers, initializer=_megatron_init, initargs=(kind,)) as pool:
        builder = IndexedDatasetBuilder(prefix, np.uint16)
        for ids, _ in pool.imap(_megatron_encode, fin, 32):
            builder.add_document(ids)
        builder.finalize()
    return time.perf_counter() - start


# ---------------------------------------------------------------- (a) and (c)
def run_limit(texts: list[str]) -> tuple[float, float, int]:
    """(a): wall and CPU seconds (all threads of this process), and the number of tokens."""
    tok = build_tokenizer("GPT2BPETokenizer", vocab_file=VOCAB, merge_file=MERGES)._hf
    tok.encode_batch_fast(texts[:64])  # warm the thread pool
    start, cpu = time.perf_counter(), time.process_time()
    n = 0
    for i in range(0, len(texts), 2048):
        n += sum(len(e) for e in tok.encode_batch_fast(texts[i:i + 2048], add_special_tokens=False))
    return time.perf_counter() - start, time.process_time() - cpu, n


def _tiktoken_limit_worker(corpus: str, rank: int, n: int, barrier, results) -> None:
    enc = build_tokenizer("GPT2BPETokenizer", vocab_file=VOCAB, merge_file=MERGES)._fast
    with open(corpus, encoding="utf-8") as f:
        texts = [json.loads(line)["text"] for i, line in enumerate(f) if i % n == rank]
    enc.encode_ordinary(texts[0])
    barrier.wait()
    start, cpu = time.perf_counter(), time.process_time()
    for t in texts:
        enc.encode_ordinary(t)
    results.put((time.perf_counter() - start, time.process_time() - cpu))


def run_limit_tiktoken(corpus: str, workers: int) -> tuple[float, float]:
    """(a') the same limit for the engine megaclm uses on OpenAI's GPT-2 files. tiktoken's own
    batch call holds the GIL (measured: no gain from threads), so one process per core, each
    with its share of the texts already in memory. Wall: the slowest process; CPU: the sum."""
    ctx = mp.get_context("forkserver")
    barrier, results = ctx.Barrier(workers), ctx.Queue()
    procs = [ctx.Process(target=_tiktoken_limit_worker, args=(corpus, r, workers, barrier, results))
             for r in range(workers)]
    for p in procs:
        p.start()
    times = [results.get() for _ in procs]
    for p in procs:
        p.join()
    return max(t[0] for t in times), sum(t[1] for t in times)


def run_megaclm(corpus: str, prefix: str, workers: int) -> tuple[float, float, int]:
    """Wall time, CPU seconds and peak RSS (bytes, summed over the process tree) of
    tools/preprocess_data.py run as a fresh process."""
    cmd = [sys.executable, os.path.join(ROOT, "tools", "preprocess_data.py"), "--input", corpus,
           "--output-prefix", prefix, "--tokenizer-type", "GPT2BPETokenizer", "--vocab-file", VOCAB,
           "--merge-file", MERGES, "--append-eod", "--workers", str(workers)]
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    with TreeMonitor(proc.pid) as mon:
        out, _ = proc.communicate()
    elapsed = time.perf_counter() - start
    if proc.returncode != 0:
        sys.exit(f"megaclm preprocessing failed:\n{out}")
    return elapsed, mon.cpu_seconds, mon.peak_rss


def build_corpus(src: str, dst: str, copies: int) -> None:
    if os.path.exists(dst) and os.path.getsize(dst) == copies * os.path.getsize(src):
        return
    with open(src, "rb") as f:
        blob = f.read()
    with open(dst + ".tmp", "wb") as f:
        for _ in range(copies):
            f.write(blob)
    os.replace(dst + ".tmp", dst)


def same_files(a: str, b: str) -> bool:
    return all(open(a + s, "rb").read() == open(b + s, "rb").read() for s in (".bin", ".idx"))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repeat", type=int, default=3, help="Copies of the 10.3 MB corpus (default 3: 31 MB).")
    p.add_argument("--workers", type=int, default=len(os.sched_getaffinity(0)))
    p.add_argument("--rounds", type=int, default=3,
                   help="Interleaved rounds; the best time of each variant counts (the machine may be shared).")
    p.add_argument("--skip-rss", action="store_true", help="Skip the 10x peak-RSS run.")
    args = p.parse_args()
    src = os.path.join(DATA, "corpus.jsonl")
    if not os.path.exists(src):
        sys.exit(f"{src} missing: run `make data` first")
    os.makedirs(WORK, exist_ok=True)
    corpus = os.path.join(WORK, f"corpus_x{args.repeat}.jsonl")
    build_corpus(src, corpus, args.repeat)
    with open(corpus, encoding="utf-8") as f:
        texts = [json.loads(line)["text"] for line in f]
    mb, docs = os.path.getsize(corpus) / 1e6, len(texts)
    print(f"corpus {corpus}: {docs} documents, {mb:.1f} MB; {args.workers} workers, {os.cpu_count()} cpus, "
          f"best of {args.rounds} interleaved rounds")

    c = os.path.join(WORK, "c_text_document")
    wall: dict[str, list[float]] = {k: [] for k in ("a", "a'", "b", "b'", "c")}
    cpu: dict[str, list[float]] = {k: [] for k in wall}
    for r in range(args.rounds):
        *limit, n_tok = run_limit(texts)
        for key, (w, c_s) in (
            ("a", limit),
            ("a'", run_limit_tiktoken(corpus, args.workers)),
            ("c", run_megaclm(corpus, os.path.join(WORK, "c"), args.workers)[:2]),
            ("b'", measured(run_megatron_style, corpus, os.path.join(WORK, "b_fast"), args.workers, "fast")),
            ("b", measured(run_megatron_style, corpus, os.path.join(WORK, "b_py"), args.workers, "python")),
        ):
            wall[key].append(w)
            cpu[key].append(c_s)
        print(f"  round {r + 1}: " + "  ".join(f"{k} {wall[k][-1]:.2f} s ({cpu[k][-1]:.1f} cpu-s)" for k in wall),
              flush=True)
    c = os.path.join(WORK, "c_text_document")
    assert same_files(c, os.path.join(WORK, "b_fast")), "megaclm and the Megatron-style (fast) output differ"
    assert same_files(c, os.path.join(WORK, "b_py")), "megaclm and the Megatron-style (Python BPE) output differ"
    best = {k: min(v) for k, v in wall.items()}
    best_cpu = {k: min(v) for k, v in cpu.items()}

    def row(name, k):
        print(f"  {name:<34} {best[k]:7.2f} s  {docs / best[k]:8.0f} docs/s  {mb / best[k]:6.2f} MB/s   "
              f"{best_cpu[k]:6.1f} cpu-s  {mb / best_cpu[k]:6.2f} MB/cpu-s")

    print(f"tokens: {n_tok} (+{docs} eod); outputs of b, b', c byte-identical")
    row("(a) limit: HF encode_batch_fast", "a")
    row("(a') limit: tiktoken, 1 proc/core", "a'")
    row("(b) Megatron-style, Python BPE", "b")
    row("(b') Megatron-style, fast per doc", "b'")
    row("(c) megaclm preprocess_data.py", "c")
    for label, table in (("wall", best), ("cpu", best_cpu)):
        ratio = {k: v / table["c"] for k, v in table.items()}
        print(f"ratios ({label}): c/a = {ratio['a']:.2f} (target >= 0.8)   c/b = {ratio['b']:.2f} (target >= 4)   "
              "c/a' = {:.2f}   c/b' = {:.2f}".format(ratio["a'"], ratio["b'"]))
    if not args.skip_rss:
        big = os.path.join(WORK, f"corpus_x{args.repeat * 10}.jsonl")
        build_corpus(src, big, args.repeat * 10)
        rss_1x = run_megaclm(corpus, os.path.join(WORK, "c"), args.workers)[2]
        t_big, _, rss_10x = run_megaclm(big, os.path.join(WORK, "c10"), args.workers)
        print(f"peak RSS (process tree): {rss_1x / 2**20:.0f} MiB on {mb:.0f} MB, "
              f"{rss_10x / 2**20:.0f} MiB on {10 * mb:.0f} MB ({10 * mb / t_big:.2f} MB/s); "
              f"ratio {rss_10x / rss_1x:.2f}")
        for s in (".bin", ".idx"):
            os.remove(os.path.join(WORK, "c10_text_document" + s))


if __name__ == "__main__":
    main()
