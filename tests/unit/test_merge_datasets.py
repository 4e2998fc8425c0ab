"""tools/merge_datasets.py: concatenation in order, directory inputs, refusals."""
import importlib.util
import pathlib

import numpy as np
import pytest

from megaclm.data.indexed_dataset import IndexedDataset, IndexedDatasetBuilder
from megaclm.utils.errors import UserError

ROOT = pathlib.Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def tool():
    spec = importlib.util.spec_from_file_location("megaclm_tool_merge", ROOT / "tools" / "merge_datasets.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def write(prefix, docs, dtype=np.uint16):
    with IndexedDatasetBuilder(str(prefix), dtype) as b:
        for d in docs:
            b.add_document(d)
        b.finalize()


def contents(prefix):
    ds = IndexedDataset(str(prefix))
    return [ds[i].tolist() for i in range(len(ds))], ds.document_indices.tolist()


def test_merge_prefixes_and_directory(tool, tmp_path, capsys):
    parts = tmp_path / "parts"
    parts.mkdir()
    docs = {"b": [[3], [4, 5]], "a": [[1, 2]], "c": [[6, 7, 8]]}
    for name, d in docs.items():
        write(parts / name, d)
    assert tool.main(["--input", str(parts / "c"), str(parts / "a.bin"), "--output-prefix", str(tmp_path / "ca")]) == 0
    assert contents(tmp_path / "ca") == ([[6, 7, 8], [1, 2]], [0, 1, 2])
    assert tool.main(["--input", str(parts), "--output-prefix", str(tmp_path / "all")]) == 0  # sorted by name
    assert contents(tmp_path / "all") == ([[1, 2], [3], [4, 5], [6, 7, 8]], [0, 1, 2, 3, 4])
    assert "3 datasets, 4 documents, 8 tokens (uint16)" in capsys.readouterr().out
    # Byte-identical to writing the documents in one go.
    write(tmp_path / "direct", [[1, 2], [3], [4, 5], [6, 7, 8]])
    for s in (".bin", ".idx"):
        assert (tmp_path / f"all{s}").read_bytes() == (tmp_path / f"direct{s}").read_bytes()


def test_merge_refusals(tool, tmp_path):
    write(tmp_path / "u16", [[1]])
    write(tmp_path / "i32", [[2]], np.int32)
    with pytest.raises(UserError, match=r"different token dtypes: .*u16 \(uint16\), .*i32 \(int32\)"):
        tool.main(["--input", str(tmp_path / "u16"), str(tmp_path / "i32"), "--output-prefix", str(tmp_path / "o")])
    with pytest.raises(UserError, match="is also an input"):
        tool.main(["--input", str(tmp_path / "u16"), "--output-prefix", str(tmp_path / "u16")])
    with pytest.raises(UserError, match="missing.idx does not exist"):
        tool.main(["--input", str(tmp_path / "missing"), "--output-prefix", str(tmp_path / "o")])
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="holds no .idx/.bin dataset"):
        tool.main(["--input", str(tmp_path / "empty"), "--output-prefix", str(tmp_path / "o")])
    assert not list(tmp_path.glob("o*")) and not list(tmp_path.glob(".o*"))
