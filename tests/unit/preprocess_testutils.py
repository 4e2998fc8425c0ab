"""What the preprocessing tests share: the GPT-2 test tokenizer's flags, the tool run as the user runs it,
and readers for what it wrote."""
import pathlib
import subprocess
import sys

from megaclm.data.indexed_dataset import IndexedDataset

ROOT = pathlib.Path(__file__).resolve().parents[2]
DATA = ROOT / "tests" / "data"
VOCAB, MERGES = str(DATA / "gpt2-vocab.json"), str(DATA / "gpt2-merges.txt")
GPT2 = ["--tokenizer-type", "GPT2BPETokenizer", "--vocab-file", VOCAB, "--merge-file", MERGES]
TOOL = ROOT / "tools" / "preprocess_data.py"


def read_docs(prefix) -> list[list[int]]:
    ds = IndexedDataset(str(prefix))
    assert ds.document_indices.tolist() == list(range(len(ds) + 1))  # one sequence per document
    return [ds[i].tolist() for i in range(len(ds))]


def files_of(prefix) -> tuple[bytes, bytes]:
    return tuple(pathlib.Path(f"{prefix}{s}").read_bytes() for s in (".bin", ".idx"))


def cli(*argv, tool=TOOL, timeout=120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(tool), *map(str, argv)], capture_output=True, text=True, timeout=timeout)


def one_error_line(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 2, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in proc.stderr, proc.stderr
    return errors[0]
