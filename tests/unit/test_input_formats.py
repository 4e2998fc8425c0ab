"""The input formats users bring from AutoTrain and Hugging Face, run as the user runs the tools:
.txt by --text-mode file|line|paragraph, JSON arrays, datasets' save_to_disk folders and .arrow files.
Each must give the same .bin/.idx, byte for byte, as the JSON lines file holding the same documents;
a run that would write 0 documents, and every bad input, is one error line (exit 2) and writes nothing.
tools/eval_perplexity.py reads the same formats through the same readers."""
import gzip
import json
import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from preprocess_testutils import GPT2, ROOT, cli, files_of, one_error_line, read_docs

TEXT = ("Hello world\r\n"
        "\n"
        "  leading spaces and <|endoftext|> typed in\n"
        "Ünïcödé — “quotes”\n"
        " \t \n"
        "tab\there\n"
        "\n\n"
        "last one")
BY_MODE = {  # the documents of TEXT for each --text-mode
    "file": [TEXT],
    "line": ["Hello world", "  leading spaces and <|endoftext|> typed in", "Ünïcödé — “quotes”", "tab\there",
             "last one"],
    "paragraph": ["Hello world", "  leading spaces and <|endoftext|> typed in\nÜnïcödé — “quotes”", "tab\there",
                  "last one"],
}
DOCS = ["Hello world", "Ünïcödé — “quotes”, commas,\nand new lines\n", 'with "double quotes" and \\ backslashes',
        "  <|endoftext|> typed in the text", "\ttab\r\nCRLF inside", "last one"]


def preprocess(tmp_path, name: str, *argv) -> tuple[str, str]:
    """Run the tool; (stdout, the text dataset's prefix)."""
    prefix = tmp_path / "out" / name
    prefix.parent.mkdir(exist_ok=True)
    proc = cli(*argv, "--output-prefix", prefix, "--append-eod", *GPT2)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout, f"{prefix}_text_document"


def jsonl_reference(tmp_path, docs: list[str], name: str = "ref") -> str:
    """The dataset the JSON lines path writes for `docs`."""
    path = tmp_path / f"{name}.jsonl"
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs), encoding="utf-8")
    out, prefix = preprocess(tmp_path, name, "--input", path, "--workers", 1)
    assert f"{len(docs)} documents read" in out
    return prefix


def save_to_disk(folder, table: pa.Table, shards: int = 1) -> None:
    """What datasets' Dataset.save_to_disk writes: Arrow IPC stream shards, state.json listing them in order,
    dataset_info.json."""
    os.makedirs(folder)
    step = -(-table.num_rows // shards)
    names = [f"data-{i:05d}-of-{shards:05d}.arrow" for i in range(shards)]
    for i, name in enumerate(names):
        with pa.ipc.new_stream(os.path.join(folder, name), table.schema) as w:
            w.write_table(table.slice(i * step, step), max_chunksize=2)  # several record batches per shard
    with open(os.path.join(folder, "state.json"), "w") as f:
        json.dump({"_data_files": [{"filename": n} for n in names], "_fingerprint": "0", "_split": None}, f)
    with open(os.path.join(folder, "dataset_info.json"), "w") as f:
        json.dump({"features": {c: {"dtype": "string", "_type": "Value"} for c in table.column_names}}, f)


def save_dataset_dict(folder, splits: dict[str, pa.Table]) -> None:
    for split, table in splits.items():
        save_to_disk(os.path.join(folder, split), table, shards=2)
    with open(os.path.join(folder, "dataset_dict.json"), "w") as f:
        json.dump({"splits": list(splits)}, f)


# ---------------------------------------------------------------- preprocess_data.py
@pytest.mark.parametrize("mode", ["file", "line", "paragraph"])
def test_text_modes(tmp_path, mode):
    (tmp_path / "corpus.txt").write_bytes(TEXT.encode("utf-8"))
    ref = jsonl_reference(tmp_path, BY_MODE[mode])
    flags = [] if mode == "file" else ["--text-mode", mode]
    out, prefix = preprocess(tmp_path, "txt", "--input", tmp_path / "corpus.txt", *flags, "--workers", 1)
    assert f"{len(BY_MODE[mode])} documents read" in out
    assert files_of(prefix) == files_of(ref)
    # Chunks of a few bytes over 2 workers: no line or paragraph is cut between chunks.
    _, small = preprocess(tmp_path, "small", "--input", tmp_path / "corpus.txt", *flags, "--workers", 2,
                          "--chunk-bytes", 8)
    assert files_of(small) == files_of(ref)


def test_text_mode_line_gives_each_line_and_skips_only_bad_ones(tmp_path):
    lines = [f"sample number {i}" for i in range(100)]
    (tmp_path / "train.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    out, prefix = preprocess(tmp_path, "lines", "--input", tmp_path / "train.txt", "--text-mode", "line")
    assert "100 documents read" in out
    assert files_of(prefix) == files_of(jsonl_reference(tmp_path, lines))
    (tmp_path / "bad.txt").write_bytes(b"one\ntw\xff o\nthree\n")
    err = one_error_line(cli("--input", tmp_path / "bad.txt", "--text-mode", "line", "--output-prefix",
                             tmp_path / "b", *GPT2))
    assert err == (f"error: {tmp_path / 'bad.txt'}:2: not valid UTF-8 (byte 0xff at column 3); convert the file to "
                   "UTF-8 or pass --skip-bad-lines")
    out, prefix = preprocess(tmp_path, "skip_line", "--input", tmp_path / "bad.txt", "--text-mode", "line",
                             "--skip-bad-lines")
    assert "2 documents read, 1 bad lines skipped" in out
    assert read_docs(prefix) == read_docs(jsonl_reference(tmp_path, ["one", "three"], "ref2"))


def test_json_array(tmp_path):
    rows = [{"id": i, "title": f"t{i}", "text": d, "meta": {"tags": ["a", "]"], "n": None}} for i, d in enumerate(DOCS)]
    (tmp_path / "pretty.json").write_text(json.dumps(rows, indent=2, ensure_ascii=False), encoding="utf-8")
    (tmp_path / "flat.json.gz").write_bytes(gzip.compress(json.dumps(rows).encode()))  # one line, compressed
    ref = files_of(jsonl_reference(tmp_path, DOCS))
    for name in ("pretty.json", "flat.json.gz"):
        for workers, chunk in ((1, 1 << 20), (2, 64)):
            out, prefix = preprocess(tmp_path, f"{name}{workers}", "--input", tmp_path / name, "--workers", workers,
                                     "--chunk-bytes", chunk)
            assert "6 documents read" in out, name
            assert files_of(prefix) == ref, (name, workers)


def test_datasets_folder_and_arrow_files(tmp_path):
    table = pa.table({"title": [f"t{i}" for i in range(len(DOCS))], "text": DOCS})
    save_dataset_dict(tmp_path / "corpus" / "ds", {"train": table})  # DatasetDict.save_to_disk, one split
    with pa.ipc.new_file(tmp_path / "file_format.arrow", table.schema) as w:  # the IPC file format
        w.write_table(table, max_chunksize=4)
    ref = files_of(jsonl_reference(tmp_path, DOCS))
    for source in ("corpus/ds", "corpus/ds/train", "corpus", "corpus/ds/train/data-00000-of-00002.arrow",
                   "file_format.arrow"):
        expected = 3 if source.endswith("00002.arrow") else 6
        out, prefix = preprocess(tmp_path, source.replace("/", "_"), "--input", tmp_path / source)
        assert f"{expected} documents read" in out, source
        if expected == 6:
            assert files_of(prefix) == ref, source
    out, _ = preprocess(tmp_path, "keys", "--input", tmp_path / "corpus", "--json-keys", "title", "text")
    assert "keys_title_document: 6 documents" in out


def test_zero_documents_is_an_error_with_the_reason(tmp_path):
    (tmp_path / "empty.json").write_text("[\n]\n")
    (tmp_path / "blank.txt").write_text("\n \n\n")
    save_to_disk(tmp_path / "nulls", pa.table({"text": pa.array([None, None, None], pa.string())}))
    out = tmp_path / "out"
    out.mkdir()
    argv = ["--output-prefix", out / "o", *GPT2]
    for inputs, why in (([tmp_path / "empty.json"], "the input holds no document"),
                        ([tmp_path / "blank.txt", "--text-mode", "line"], "the input holds no document"),
                        ([tmp_path / "blank.txt", "--text-mode", "paragraph"], "the input holds no document"),
                        ([tmp_path / "nulls", "--skip-bad-lines"], "all 3 lines were skipped as bad")):
        err = one_error_line(cli("--input", *inputs, *argv))
        assert err.startswith(f"error: 0 documents written: {why}") and err.endswith("; nothing was written"), err
    assert os.listdir(out) == []


def test_bad_inputs_are_one_line(tmp_path):
    table = pa.table({"text": ["a", "b"]})
    save_dataset_dict(tmp_path / "dd", {"train": table, "test": table})
    save_to_disk(tmp_path / "body", pa.table({"body": ["a"]}))
    (tmp_path / "broken.json").write_text('[\n  {"text": "a"},\n  {"text": "b",}\n]')
    (tmp_path / "truncated.json").write_text('[{"text": "a"}, {"text": "b"}')
    (tmp_path / "nokey.json").write_text('[{"text": "a"},\n {"body": "b"}]')
    (tmp_path / "fake.arrow").write_bytes(b"PAR1 not arrow at all")
    (tmp_path / "a.jsonl").write_text('{"text": "a"}\n')
    cases = {
        "dd": f"--input {tmp_path / 'dd'}: a Hugging Face DatasetDict with splits ['train', 'test']; name one "
              f"split's folder, e.g. --input {tmp_path / 'dd' / 'train'}",
        "body": f"{tmp_path / 'body' / 'data-00000-of-00001.arrow'}: column 'text' not in the Arrow schema ['body']; "
                "check --json-keys",
        "broken.json": f"{tmp_path / 'broken.json'}:3: malformed JSON in element 2 of the array (Expecting property "
                       "name enclosed in double quotes); fix the file (a JSON array is one value: --skip-bad-lines "
                       "cannot skip inside it)",
        "truncated.json": f"{tmp_path / 'truncated.json'}:1: the file ends inside the JSON array (no closing ']'): "
                          "is it truncated?; fix the file (a JSON array is one value: --skip-bad-lines cannot skip "
                          "inside it)",
        "nokey.json": f"{tmp_path / 'nokey.json'}:2: element 2: key 'text' missing (the object has keys ['body']); "
                      "check --json-keys; fix the element or pass --skip-bad-lines",
        "fake.arrow": f"{tmp_path / 'fake.arrow'}: not an Arrow IPC file",
        "a.jsonl --text-mode line": "--text-mode line only applies to .txt inputs, and none of the 1 input file(s) "
                                    "is one; drop it",
    }
    out = tmp_path / "out"
    out.mkdir()
    for case, message in cases.items():
        name, *flags = case.split()
        err = one_error_line(cli("--input", tmp_path / name, *flags, "--output-prefix", out / "o", *GPT2))
        assert err.startswith(f"error: {message}"), err
    assert os.listdir(out) == []
    out_, prefix = preprocess(tmp_path, "skip", "--input", tmp_path / "nokey.json", "--skip-bad-lines")
    assert "1 documents read, 1 bad lines skipped" in out_


def test_help_documents_the_text_modes():
    proc = cli("--help")
    text = " ".join(proc.stdout.split())
    assert "--text-mode {file,line,paragraph}" in text and "paragraph (runs of non-blank lines" in text


# ---------------------------------------------------------------- eval_perplexity.py
EVAL = ROOT / "tools" / "eval_perplexity.py"


@pytest.fixture(scope="module")
def tiny_gpt2(tmp_path_factory):
    pytest.importorskip("transformers")
    import importlib.util

    spec = importlib.util.spec_from_file_location("tiny_hf_model", ROOT / "tools" / "checkpoint" / "tiny_hf_model.py")
    tiny = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tiny)
    return tiny.make_tiny_model("gpt2", str(tmp_path_factory.mktemp("tiny") / "gpt2"), hidden=32, layers=1)


def evaluate(model: str, *argv) -> dict:
    proc = cli("--hf", model, "--seq-length", 16, *argv, tool=EVAL, timeout=300)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.splitlines()[-1])


def test_eval_perplexity_reads_every_format(tmp_path, tiny_gpt2):
    lines = BY_MODE["line"] * 3
    (tmp_path / "held_out.json").write_text(json.dumps([{"text": t} for t in lines]), encoding="utf-8")
    pq.write_table(pa.table({"text": lines}), tmp_path / "held_out.parquet")
    save_to_disk(tmp_path / "hf", pa.table({"text": lines}), shards=2)
    (tmp_path / "held_out.txt").write_text("\n".join(lines), encoding="utf-8")
    (tmp_path / "all.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in lines * 4), encoding="utf-8")
    reference = evaluate(tiny_gpt2, "--input", tmp_path / "all.jsonl")
    assert reference["windows"] > 4
    # The four formats in one run, documents in input order: the same tokens as the JSON lines file.
    several = [tmp_path / n for n in ("held_out.json", "held_out.parquet", "hf", "held_out.txt")]
    assert evaluate(tiny_gpt2, "--input", *several, "--text-mode", "line") == reference


def test_eval_perplexity_unreadable_input_is_one_line(tmp_path, tiny_gpt2):
    """It used to end in a raw UnicodeDecodeError (every input was read as JSON lines)."""
    (tmp_path / "x.parquet").write_bytes(b"\x00\xff\xfe\x00 not parquet" * 10)
    err = one_error_line(cli("--hf", tiny_gpt2, "--seq-length", 16, "--input", tmp_path / "x.parquet", tool=EVAL))
    assert err.startswith(f"error: {tmp_path / 'x.parquet'}: not a readable Parquet file"), err
