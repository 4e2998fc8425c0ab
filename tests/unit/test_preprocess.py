"""tools/preprocess_data.py: formats, keys, workers/partitions equivalence, empty documents, and
every bad input (errors name file and line; nothing is left under a final name)."""
import contextlib
import csv
import gzip
import importlib.util
import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import numpy as np
import psutil
import pytest

from megaclm.data.indexed_dataset import IndexedDataset
from megaclm.tokenizer import build_tokenizer
from megaclm.utils.errors import UserError
from preprocess_testutils import DATA, GPT2, MERGES, ROOT, TOOL, VOCAB, cli, files_of, one_error_line, read_docs

DOCS = [
    "Hello world",
    "Ünïcödé — “quotes”, commas, and\nnew lines\n",
    'second, with "double quotes"',
    "  leading spaces and <|endoftext|> typed in the text",
    "\ttab\r\nCRLF inside",
    "last one",
]


def load_tool(name: str):
    spec = importlib.util.spec_from_file_location(f"megaclm_tool_{name}", ROOT / "tools" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def tool():
    return load_tool("preprocess_data")


@pytest.fixture(scope="module")
def gpt2():
    return build_tokenizer("GPT2BPETokenizer", vocab_file=VOCAB, merge_file=MERGES)


def run(tool, capsys, *argv) -> str:
    assert tool.main([str(a) for a in argv]) == 0
    return capsys.readouterr().out


def write_jsonl(path, rows, blank_line=True):
    lines = [json.dumps(r, ensure_ascii=False) for r in rows]
    if blank_line:
        lines.insert(2, "")  # blank lines are not documents
    pathlib.Path(path).write_text("\n".join(lines) + "\n", encoding="utf-8")


# ---------------------------------------------------------------- formats and keys
def test_every_format_gives_the_same_dataset(tool, capsys, tmp_path, gpt2):
    import pyarrow as pa
    import pyarrow.parquet as pq
    import zstandard

    rows = [{"title": f"t{i}", "text": d} for i, d in enumerate(DOCS)]
    src = tmp_path / "src"
    src.mkdir()
    write_jsonl(src / "a.jsonl", rows)
    raw = (src / "a.jsonl").read_bytes()
    (src / "a.json").write_bytes(raw)
    (src / "a.jsonl.gz").write_bytes(gzip.compress(raw))
    (src / "a.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(raw))
    with open(src / "a.csv", "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["title", "text"])
        w.writerows([r["title"], r["text"]] for r in rows)
    pq.write_table(pa.table({"title": [r["title"] for r in rows], "text": DOCS}), src / "a.parquet", row_group_size=4)
    txt = src / "txt"
    txt.mkdir()
    for i, d in enumerate(DOCS):
        (txt / f"{i:02d}.txt").write_text(d, encoding="utf-8", newline="")

    expected = [gpt2.tokenize(d) + [gpt2.eod] for d in DOCS]
    outputs = {}
    for name in ("a.jsonl", "a.json", "a.jsonl.gz", "a.jsonl.zst", "a.csv", "a.parquet", "txt"):
        prefix = tmp_path / name.replace(".", "_")
        out = run(tool, capsys, "--input", src / name, "--output-prefix", prefix, "--append-eod", "--workers", 1, *GPT2)
        assert "6 documents read" in out, name
        assert read_docs(f"{prefix}_text_document") == expected, name
        outputs[name] = files_of(f"{prefix}_text_document")
    assert len(set(outputs.values())) == 1  # byte-identical whatever the format


def test_several_keys_each_get_a_finalized_dataset(tool, capsys, tmp_path, gpt2):
    write_jsonl(tmp_path / "in.jsonl", [{"title": f"title {i}", "text": d, "id": i} for i, d in enumerate(DOCS)])
    out = run(tool, capsys, "--input", tmp_path / "in.jsonl", "--output-prefix", tmp_path / "o",
              "--json-keys", "text", "title", "--workers", 1, *GPT2)
    assert read_docs(tmp_path / "o_text_document") == [gpt2.tokenize(d) for d in DOCS]
    assert read_docs(tmp_path / "o_title_document") == [gpt2.tokenize(f"title {i}") for i in range(len(DOCS))]
    assert "o_title_document: 6 documents" in out
    assert sorted(os.listdir(tmp_path)) == ["in.jsonl", "o_text_document.bin", "o_text_document.idx",
                                            "o_title_document.bin", "o_title_document.idx"]


def test_json_key_spelling_of_train_tokenizer_is_accepted(tool, capsys, tmp_path):
    write_jsonl(tmp_path / "in.jsonl", [{"body": "1 2"}], blank_line=False)
    run(tool, capsys, "--input", tmp_path / "in.jsonl", "--json-key", "body", "--output-prefix", tmp_path / "o",
        "--tokenizer-type", "NullTokenizer", "--vocab-size", 10, "--workers", 1)
    assert read_docs(tmp_path / "o_body_document") == [[1, 2]]


def test_inputs_as_glob_and_directory_keep_order(tool, capsys, tmp_path):
    d = tmp_path / "in" / "sub"
    d.mkdir(parents=True)
    for i in range(3):
        write_jsonl(d / f"{i}.jsonl", [{"text": f"{i} {j}"} for j in range(2)], blank_line=False)
    (d / "notes.md").write_text("ignored: not an input format")
    null = ["--tokenizer-type", "NullTokenizer", "--vocab-size", 10, "--workers", 1]
    run(tool, capsys, "--input", tmp_path / "in", "--output-prefix", tmp_path / "dir", *null)
    run(tool, capsys, "--input", f"{tmp_path}/in/**/*.jsonl", "--output-prefix", tmp_path / "glob", *null)
    expected = [[i, j] for i in range(3) for j in range(2)]
    assert read_docs(tmp_path / "dir_text_document") == read_docs(tmp_path / "glob_text_document") == expected


def test_empty_documents_rule(tool, capsys, tmp_path):
    write_jsonl(tmp_path / "in.jsonl", [{"text": t} for t in ["1 2", "", "3", "   ", "4"]], blank_line=False)
    null = ["--tokenizer-type", "NullTokenizer", "--vocab-size", 70000, "--workers", 1, "--input", tmp_path / "in.jsonl"]
    out = run(tool, capsys, "--output-prefix", tmp_path / "skip", *null)
    assert read_docs(tmp_path / "skip_text_document") == [[1, 2], [3], [4]]
    assert "3 documents, 4 tokens, 2 empty skipped" in out
    run(tool, capsys, "--output-prefix", tmp_path / "eod", "--append-eod", *null)
    assert read_docs(tmp_path / "eod_text_document") == [[1, 2, 70000], [70000], [3, 70000], [70000], [4, 70000]]
    assert IndexedDataset(str(tmp_path / "eod_text_document")).dtype == np.int32  # 70001 ids need int32


def test_help_states_the_empty_document_rule(tool, capsys):
    with pytest.raises(SystemExit):
        tool.main(["--help"])
    assert "--append-eod it is kept as the single token eod" in " ".join(capsys.readouterr().out.split())


# ---------------------------------------------------------------- workers and partitions
def test_workers_and_partitions_give_identical_files(tool, capsys, tmp_path):
    wiki = (DATA / "wiki_summaries_500.jsonl").read_text("utf-8").splitlines(keepends=True)
    for i in range(3):
        (tmp_path / f"w{i}.jsonl").write_text("".join(wiki[i * 170:(i + 1) * 170]), encoding="utf-8")
    inputs = ["--input", tmp_path / "w0.jsonl", DATA / "hamlet.txt", tmp_path / "w1.jsonl", tmp_path / "w2.jsonl"]
    common = [*inputs, *GPT2, "--append-eod", "--chunk-bytes", 16384]
    run(tool, capsys, *common, "--workers", 1, "--output-prefix", tmp_path / "one")
    out2 = run(tool, capsys, *common, "--workers", 2, "--output-prefix", tmp_path / "two")
    run(tool, capsys, *common, "--workers", 2, "--partitions", 2, "--output-prefix", tmp_path / "parts")
    one = files_of(tmp_path / "one_text_document")
    assert files_of(tmp_path / "two_text_document") == one
    assert files_of(tmp_path / "parts_text_document") == one
    assert "501 documents read" in out2
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".")]  # no temp file or partition dir left


def test_partition_errors_reach_the_user_and_leave_nothing(tool, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    write_jsonl(tmp_path / "a.jsonl", [{"text": "1 2"}] * 3, blank_line=False)
    (tmp_path / "b.jsonl").write_text('{"text": "3"}\n{"text": 4 5}\n')
    with pytest.raises(UserError, match=r"b.jsonl:2: malformed JSON"):
        tool.main(["--input", str(tmp_path / "a.jsonl"), str(tmp_path / "b.jsonl"), "--output-prefix", str(out / "o"),
                   "--tokenizer-type", "NullTokenizer", "--vocab-size", "10", "--workers", "2", "--partitions", "2"])
    assert os.listdir(out) == []  # neither outputs nor the partitions' scratch directory


# ---------------------------------------------------------------- bad input
def expect_error(tool, tmp_path, match, *argv):
    """The tool refuses with a UserError matching `match` and leaves no output file at all."""
    out = tmp_path / "out"
    out.mkdir(exist_ok=True)
    with pytest.raises(UserError, match=match) as err:
        tool.main([str(a) for a in argv] + ["--output-prefix", str(out / "o")] if "--output-prefix" not in argv
                  else [str(a) for a in argv])
    assert os.listdir(out) == []
    return str(err.value)


@pytest.fixture
def bad_lines(tmp_path):
    lines = ['{"text": "good one"}', '{"text": "two"}', '{"text": "three"}', "",
             '{"text": "four", oops}', '{"title": "no text"}', '{"text": 5}', "[1, 2]",
             '{"text": "caf\xe9"}', '{"text": "last good"}']
    path = tmp_path / "bad.jsonl"
    blob = "\n".join(lines).encode("utf-8").replace("caf\xe9".encode("utf-8"), b"caf\xe9") + b"\n"
    path.write_bytes(blob)  # line 9 holds a latin-1 byte: invalid UTF-8
    return path


@pytest.mark.parametrize("workers", [1, 2])
def test_malformed_json_names_file_and_line(tool, tmp_path, bad_lines, workers):
    # Tiny chunks: line numbers must survive chunk boundaries and worker order.
    msg = expect_error(tool, tmp_path, "malformed JSON", "--input", bad_lines, *GPT2,
                       "--workers", workers, "--chunk-bytes", 32)
    assert msg.startswith(f"{bad_lines}:5: ") and "--skip-bad-lines" in msg


def test_each_bad_line_kind_is_reported(tool, tmp_path, bad_lines):
    lines = bad_lines.read_bytes().split(b"\n")
    cases = {6: "key 'text' missing", 7: "key 'text' is a int", 8: "a JSON list, expected an object",
             9: r"not valid UTF-8 \(byte 0xe9 at column 14\)"}
    for line, match in cases.items():
        one = tmp_path / f"line{line}.jsonl"
        one.write_bytes(b"\n".join([lines[0], lines[line - 1]]) + b"\n")
        msg = expect_error(tool, tmp_path, match, "--input", one, *GPT2, "--workers", 1)
        assert msg.startswith(f"{one}:2: "), msg


def test_skip_bad_lines_counts_them(tool, capsys, tmp_path, bad_lines, gpt2):
    out = run(tool, capsys, "--input", bad_lines, "--output-prefix", tmp_path / "o", "--skip-bad-lines",
              "--workers", 1, *GPT2)
    assert "4 documents read, 5 bad lines skipped" in out
    assert read_docs(tmp_path / "o_text_document") == [gpt2.tokenize(t) for t in ["good one", "two", "three", "last good"]]


def test_table_and_compressed_errors(tool, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    (tmp_path / "a.csv").write_text("title,body\nx,y\n")
    expect_error(tool, tmp_path, r"a.csv:1: column 'text' not in the header \['title', 'body'\]",
                 "--input", tmp_path / "a.csv", *GPT2, "--workers", 1)
    pq.write_table(pa.table({"body": ["x"]}), tmp_path / "a.parquet")
    expect_error(tool, tmp_path, "column 'text' not in the Parquet schema", "--input", tmp_path / "a.parquet", *GPT2)
    pq.write_table(pa.table({"text": ["x", None, "z"]}), tmp_path / "n.parquet")
    expect_error(tool, tmp_path, r"n.parquet:row 2: column 'text' is NoneType",
                 "--input", tmp_path / "n.parquet", *GPT2, "--workers", 1)
    (tmp_path / "c.jsonl.gz").write_bytes(gzip.compress(b'{"text": "x"}\n' * 100)[:40])
    expect_error(tool, tmp_path, "c.jsonl.gz: cannot read it", "--input", tmp_path / "c.jsonl.gz", *GPT2)
    (tmp_path / "c.jsonl.zst").write_bytes(b"\x28\xb5\x2f\xfd" + b"garbage" * 10)
    expect_error(tool, tmp_path, "c.jsonl.zst: corrupt zstd data", "--input", tmp_path / "c.jsonl.zst", *GPT2)
    (tmp_path / "l.txt").write_bytes(b"line one\nline \xff two\n")
    expect_error(tool, tmp_path, r"l.txt:2: not valid UTF-8 \(byte 0xff at column 6\); convert the file to UTF-8$",
                 "--input", tmp_path / "l.txt", *GPT2, "--workers", 1)
    (tmp_path / "t.txt").write_text("hi")
    expect_error(tool, tmp_path, "a .txt input has no keys", "--input", tmp_path / "t.txt",
                 "--json-keys", "text", "title", *GPT2)


def test_bad_inputs_and_tokenizer_files(tool, tmp_path):
    good = tmp_path / "g.jsonl"
    write_jsonl(good, [{"text": "x"}])
    expect_error(tool, tmp_path, "no such file, directory or glob", "--input", tmp_path / "nope.jsonl", *GPT2)
    expect_error(tool, tmp_path, "matches no supported input", "--input", f"{tmp_path}/*.csv", *GPT2)
    (tmp_path / "x.docx").write_text("?")
    expect_error(tool, tmp_path, "unsupported file type", "--input", tmp_path / "x.docx", *GPT2)
    expect_error(tool, tmp_path, "--vocab-file .*missing.json: no such file", "--input", good,
                 "--tokenizer-type", "GPT2BPETokenizer", "--vocab-file", tmp_path / "missing.json", "--merge-file", MERGES)
    expect_error(tool, tmp_path, "--merge-file is required", "--input", good,
                 "--tokenizer-type", "GPT2BPETokenizer", "--vocab-file", VOCAB)
    expect_error(tool, tmp_path, "--tokenizer-model .*m.model: no such file", "--input", good,
                 "--tokenizer-type", "SentencePieceTokenizer", "--tokenizer-model", tmp_path / "m.model")
    expect_error(tool, tmp_path, "--workers 0 must be >= 1", "--input", good, *GPT2, "--workers", 0)
    expect_error(tool, tmp_path, "a key is repeated", "--input", good, *GPT2, "--json-keys", "text", "text")


def test_unwritable_output(tool, tmp_path):
    good = tmp_path / "g.jsonl"
    write_jsonl(good, [{"text": "x"}])
    expect_error(tool, tmp_path, "does not exist; create it", "--input", good, *GPT2,
                 "--output-prefix", tmp_path / "no" / "such" / "dir")
    expect_error(tool, tmp_path, "/proc/self is not writable", "--input", good, *GPT2,
                 "--output-prefix", "/proc/self/o")


# ---------------------------------------------------------------- real process: exit codes and signals
def test_cli_error_is_one_line_and_exit_2(tmp_path, bad_lines):
    proc = subprocess.run([sys.executable, str(TOOL), "--input", str(bad_lines), "--output-prefix", str(tmp_path / "o"),
                           *GPT2, "--workers", "1"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert errors == [f"error: {bad_lines}:5: malformed JSON (Expecting property name enclosed in double quotes "
                      "at column 18); fix the line or pass --skip-bad-lines"]
    assert "Traceback" not in proc.stderr


def test_empty_or_all_bad_input_writes_nothing(tmp_path):
    """0 documents is never a dataset: rc 2 saying why, and no file under the output prefix."""
    out = tmp_path / "out"
    out.mkdir()
    (tmp_path / "empty.jsonl").write_bytes(b"")
    (tmp_path / "blank.jsonl").write_text("\n  \n\n")
    (tmp_path / "bad.jsonl").write_text('{"text": 1}\n{"title": "x"}\nnot json\n')
    null = ["--tokenizer-type", "NullTokenizer", "--vocab-size", 100, "--output-prefix", out / "o"]
    err = one_error_line(cli("--input", tmp_path / "empty.jsonl", tmp_path / "blank.jsonl", *null, "--workers", 1))
    assert err == (f"error: 0 documents written: the input holds no document (empty files, blank lines only, an empty "
                   f"JSON array or table): {tmp_path / 'empty.jsonl'}, {tmp_path / 'blank.jsonl'}; nothing was written")
    err = one_error_line(cli("--input", tmp_path / "bad.jsonl", *null, "--skip-bad-lines", "--workers", 2))
    assert err == (f"error: 0 documents written: all 3 lines were skipped as bad (--skip-bad-lines) in "
                   f"{tmp_path / 'bad.jsonl'}; fix the input; nothing was written")
    assert os.listdir(out) == []


def test_partitions_refuse_only_an_empty_whole(tool, capsys, tmp_path):
    (tmp_path / "a.jsonl").write_text('{"text": "1 2"}\n')
    (tmp_path / "b.jsonl").write_text("\n")  # one empty partition is fine
    argv = ["--tokenizer-type", "NullTokenizer", "--vocab-size", 100, "--workers", 2, "--partitions", 2]
    run(tool, capsys, "--input", tmp_path / "a.jsonl", tmp_path / "b.jsonl", "--output-prefix", tmp_path / "ok", *argv)
    assert read_docs(tmp_path / "ok_text_document") == [[1, 2]]
    expect_error(tool, tmp_path, "0 documents written: the input holds no document", "--input", tmp_path / "b.jsonl",
                 tmp_path / "b.jsonl", *argv)


def test_existing_output_is_refused_unless_overwrite(tmp_path):
    (tmp_path / "in.jsonl").write_text('{"text": "1 2"}\n{"text": "3"}\n')
    argv = ["--tokenizer-type", "NullTokenizer", "--vocab-size", 100, "--workers", 1, "--output-prefix", tmp_path / "o"]
    assert cli("--input", tmp_path / "in.jsonl", *argv).returncode == 0
    before = files_of(tmp_path / "o_text_document")
    # Refused before any work: the input is not even read (a missing file would be the other error).
    err = one_error_line(cli("--input", tmp_path / "missing.jsonl", *argv))
    prefix = tmp_path / "o_text_document"
    assert err == (f"error: --output-prefix: {prefix}.bin, {prefix}.idx already exist; pass --overwrite to replace "
                   "them or choose another --output-prefix")
    assert files_of(prefix) == before
    (tmp_path / "in.jsonl").write_text('{"text": "4"}\n')
    assert cli("--input", tmp_path / "in.jsonl", *argv, "--overwrite").returncode == 0
    assert read_docs(prefix) == [[4]]


@pytest.fixture
def tmpfs(tmp_path):
    """A 1 MiB tmpfs (root only: CI and the dev machine run as root), unmounted afterwards."""
    d = tmp_path / "small"
    d.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(d)]).returncode:
        pytest.skip("mounting a tmpfs needs root")
    yield d
    subprocess.run(["umount", str(d)], check=True)


def test_disk_full_is_one_line_naming_the_file(tmp_path, tmpfs):
    (tmp_path / "in.jsonl").write_text("".join(f'{{"text": "{" ".join(["7"] * 500)}"}}\n' for _ in range(2000)))
    proc = cli("--input", tmp_path / "in.jsonl", "--output-prefix", tmpfs / "o", "--tokenizer-type", "NullTokenizer",
               "--vocab-size", 100, "--workers", 2)  # 1M tokens x 2 bytes: twice the space there is
    err = one_error_line(proc)
    assert err == f"error: no space left on device writing {tmpfs / 'o_text_document.bin'}; free space in {tmpfs} or write elsewhere"
    assert os.listdir(tmpfs) == []  # neither a final name nor a temporary file


@pytest.fixture(scope="module")
def big_input(tmp_path_factory):
    """~8 MB of Wikipedia lines, and a vocab.json with new bytes (same ids) so the slower HF
    engine runs: the job lasts seconds, long enough to be interrupted mid-way."""
    d = tmp_path_factory.mktemp("big")
    wiki = (DATA / "wiki_summaries_500.jsonl").read_bytes()
    (d / "big.jsonl").write_bytes(wiki * 32)
    (d / "vocab.json").write_text(json.dumps(json.loads(pathlib.Path(VOCAB).read_text("utf-8")), indent=1))
    return d


@pytest.mark.parametrize("sig, twice", [(signal.SIGTERM, False), (signal.SIGINT, False), (signal.SIGINT, True)])
def test_signal_mid_run_leaves_no_files(tmp_path, big_input, sig, twice):
    """SIGTERM, Ctrl-C, and Ctrl-C twice (which used to hang in the executor's exit-time join, workers left
    behind): exit 130 promptly (15 s: a hang, not a slow machine), every worker gone, no file left."""
    out = tmp_path / "out"
    out.mkdir()
    cmd = [sys.executable, str(TOOL), "--input", str(big_input / "big.jsonl"), "--output-prefix", str(out / "o"),
           "--tokenizer-type", "GPT2BPETokenizer", "--vocab-file", str(big_input / "vocab.json"),
           "--merge-file", MERGES, "--workers", "2", "--chunk-bytes", "65536", "--log-interval", "1"]
    # Own session: SIGINT goes to the whole process group, as Ctrl-C in a terminal does.
    # SIGINT at its default: a suite started in the background (`cmd &`) would pass on bash's SIG_IGN.
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, start_new_session=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.time() + 60
    for line in proc.stderr:  # the first progress line: workers are tokenizing now
        if " documents, " in line or time.time() > deadline:
            break
    family = [proc.pid, *(p.pid for p in psutil.Process(proc.pid).children(recursive=True))]
    assert len(family) >= 3  # main, forkserver, workers
    assert [n for n in os.listdir(out) if n.endswith(".tmp")]  # mid-run: data under temp names
    os.killpg(proc.pid, sig) if sig == signal.SIGINT else proc.send_signal(sig)
    if twice:
        time.sleep(0.05)  # within the first one's clean-up
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
    try:
        code = proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        code = "still running 15 s after the signal"
    time.sleep(0.5)
    alive = [p for p in family if psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE]
    for pid in alive:  # a failed run must not leave processes behind
        os.kill(pid, signal.SIGKILL)
    rest = proc.stderr.read()
    assert code == 130, (code, rest)
    assert "interrupted" in rest and "Traceback" not in rest, rest
    assert os.listdir(out) == []  # neither final names nor temp files
    assert alive == []


# ---------------------------------------------------------------- --split-sentences
@pytest.mark.parametrize("workers", [1, 2])
def test_split_sentences_writes_megatrons_sentence_dataset(tool, capsys, tmp_path, gpt2, workers):
    """One sequence per sentence (each tokenized on its own, as Megatron does), documents grouping them,
    eod after a document's last sentence; an empty document is [eod]; the name ends in _sentence."""
    import pysbd

    rows = [{"text": "Dr. Smith went to Washington. He arrived at 5 p.m. and left! Why?"}, {"text": ""},
            {"text": "One sentence only"}, {"text": "Two here.  And a second one.\nThird on a new line."}]
    write_jsonl(tmp_path / "in.jsonl", rows, blank_line=False)
    run(tool, capsys, "--input", tmp_path / "in.jsonl", "--output-prefix", tmp_path / "s", "--tokenizer-type",
        "GPT2BPETokenizer", "--vocab-file", VOCAB, "--merge-file", MERGES, "--append-eod", "--split-sentences",
        "--workers", workers)
    ds = IndexedDataset(str(tmp_path / "s_text_sentence"))
    splitter = pysbd.Segmenter(language="en", clean=False)  # the reference splitter, stripped like punkt
    expected = []
    for row in rows:
        sents = [gpt2.tokenize(s.strip()) for s in splitter.segment(row["text"]) if s.strip()] or [[]]
        sents[-1] = sents[-1] + [gpt2.eod]
        expected.append(sents)
    bounds = ds.document_indices.tolist()
    got = [[ds[i].tolist() for i in range(bounds[d], bounds[d + 1])] for d in range(len(bounds) - 1)]
    assert got == expected
    assert [len(doc) for doc in got] == [3, 1, 1, 3]  # "5 p.m." does not end a sentence


def test_split_sentences_flag_errors(tool, tmp_path):
    write_jsonl(tmp_path / "in.jsonl", [{"text": "a"}], blank_line=False)
    common = ["--input", str(tmp_path / "in.jsonl"), "--output-prefix", str(tmp_path / "s"), "--tokenizer-type",
              "GPT2BPETokenizer", "--vocab-file", VOCAB, "--merge-file", MERGES]
    with pytest.raises(UserError, match="--lang 'klingon' has no sentence splitter"):
        tool.main(common + ["--split-sentences", "--lang", "klingon"])
    with pytest.raises(UserError, match="only apply with --split-sentences"):
        tool.main(common + ["--keep-newlines"])
    assert not list(tmp_path.glob("s_*"))
