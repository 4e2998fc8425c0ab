"""MMIDIDX: round trip, byte compatibility with an independent writer of Megatron's layout,
errors that name the broken file, atomic finalize."""
import os
import signal
import stat
import struct
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from megaclm.data.indexed_dataset import IndexedDataset, IndexedDatasetBuilder, optimal_dtype
from megaclm.utils.errors import UserError

CODES = {np.uint8: 1, np.int8: 2, np.int16: 3, np.int32: 4, np.int64: 5, np.float64: 6, np.float32: 7, np.uint16: 8}


def megatron_layout_write(prefix: str, docs: list[list[list[int]]], dtype) -> None:
    """Independent reference writer, field by field with struct, as Megatron-LM lays files out:
    docs = [document = [sequence = [token, ...], ...], ...]."""
    fmt = {np.uint16: "<H", np.int32: "<i", np.uint8: "<B", np.int64: "<q"}[dtype]
    itemsize = struct.calcsize(fmt)
    sizes, pointers, doc_idx = [], [], [0]
    with open(prefix + ".bin", "wb") as f:
        for doc in docs:
            for seq in doc:
                pointers.append(sum(s * itemsize for s in sizes))
                sizes.append(len(seq))
                for t in seq:
                    f.write(struct.pack(fmt, t))
            doc_idx.append(len(sizes))
    with open(prefix + ".idx", "wb") as f:
        f.write(b"MMIDIDX\x00\x00")
        f.write(struct.pack("<Q", 1))
        f.write(struct.pack("<B", CODES[dtype]))
        f.write(struct.pack("<Q", len(sizes)))
        f.write(struct.pack("<Q", len(doc_idx)))
        for s in sizes:
            f.write(struct.pack("<i", s))
        for p in pointers:
            f.write(struct.pack("<q", p))
        for d in doc_idx:
            f.write(struct.pack("<q", d))


def random_docs(rng, n: int, vocab: int) -> list[list[list[int]]]:
    """Documents of 1-3 sequences, lengths 0..40 (an empty sequence is legal)."""
    return [[rng.integers(0, vocab, rng.integers(0, 40)).tolist() for _ in range(rng.integers(1, 4))]
            for _ in range(n)]


def write_with_builder(prefix, docs, dtype):
    with IndexedDatasetBuilder(prefix, dtype) as b:
        for i, doc in enumerate(docs):
            flat = [t for seq in doc for t in seq]
            if len(doc) == 1 and i % 2:  # exercise both single-document paths
                b.add_documents(np.array(flat, dtype=np.int64), np.array([len(flat)]))
            else:
                b.add_document(flat, lengths=[len(s) for s in doc])
        b.finalize()


@pytest.mark.parametrize("dtype,vocab", [(np.uint16, 50257), (np.int32, 150000)])
def test_round_trip_and_byte_identical_to_megatron_layout(tmp_path, dtype, vocab):
    rng = np.random.default_rng(0)
    docs = random_docs(rng, 60, vocab)
    ours, ref = str(tmp_path / "ours"), str(tmp_path / "ref")
    write_with_builder(ours, docs, dtype)
    megatron_layout_write(ref, docs, dtype)
    for suffix in (".bin", ".idx"):
        assert (tmp_path / f"ours{suffix}").read_bytes() == (tmp_path / f"ref{suffix}").read_bytes()
    for prefix in (ours, ref):  # the reference's files open here and read back token for token
        ds = IndexedDataset(prefix)
        assert ds.dtype == dtype
        seqs = [seq for doc in docs for seq in doc]
        assert len(ds) == len(seqs)
        assert ds.sizes.tolist() == [len(s) for s in seqs]
        assert ds.document_indices.tolist() == np.cumsum([0] + [len(d) for d in docs]).tolist()
        assert all(ds[i].tolist() == s for i, s in enumerate(seqs))
        assert ds.num_tokens() == sum(map(len, seqs))


def test_get_slices_are_zero_copy_views(tmp_path):
    prefix = str(tmp_path / "d")
    write_with_builder(prefix, [[[1, 2, 3, 4, 5]], [[6, 7]]], np.uint16)
    ds = IndexedDataset(prefix)
    assert ds.get(0, 1, 3).tolist() == [2, 3, 4]
    assert ds.get(1, 1).tolist() == [7]
    assert ds[-1].tolist() == [6, 7]
    view = ds.get(0, 2, 2)
    assert not view.flags.owndata and not view.flags.writeable
    with pytest.raises(IndexError):
        ds.get(0, 4, 2)
    with pytest.raises(IndexError):
        ds[2]


def test_optimal_dtype():
    assert optimal_dtype(50257) is np.uint16
    assert optimal_dtype(65499) is np.uint16
    assert optimal_dtype(65500) is np.int32
    assert optimal_dtype(128256) is np.int32


def test_empty_dataset_round_trips(tmp_path):
    prefix = str(tmp_path / "e")
    with IndexedDatasetBuilder(prefix, np.uint16) as b:
        b.finalize()
    ds = IndexedDataset(prefix)
    assert len(ds) == 0 and ds.document_indices.tolist() == [0]


def test_add_index_concatenates_and_refuses_other_dtype(tmp_path):
    a, b, c, out = (str(tmp_path / n) for n in "abco")
    write_with_builder(a, [[[1, 2]], [[3]]], np.uint16)
    write_with_builder(b, [[[4], [5, 6]]], np.uint16)
    write_with_builder(c, [[[7]]], np.int32)
    with IndexedDatasetBuilder(out, np.uint16) as builder:
        builder.add_index(a)
        builder.add_index(b)
        builder.finalize()
    ref = str(tmp_path / "ref")
    megatron_layout_write(ref, [[[1, 2]], [[3]], [[4], [5, 6]]], np.uint16)
    assert (tmp_path / "o.idx").read_bytes() == (tmp_path / "ref.idx").read_bytes()
    assert (tmp_path / "o.bin").read_bytes() == (tmp_path / "ref.bin").read_bytes()
    with IndexedDatasetBuilder(str(tmp_path / "x"), np.uint16) as builder:
        with pytest.raises(UserError, match="int32"):
            builder.add_index(c)
    assert not (tmp_path / "x.bin").exists()


# ---------------------------------------------------------------- broken files name the file
@pytest.fixture
def good(tmp_path):
    prefix = str(tmp_path / "g")
    write_with_builder(prefix, [[[1, 2, 3]], [[4, 5]]], np.uint16)
    return prefix


def _patch(path, offset, data):
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)


@pytest.mark.parametrize("damage,message", [
    (lambda p: _patch(p + ".idx", 0, b"NOTMAGIC!"), "not an MMIDIDX index"),
    (lambda p: _patch(p + ".idx", 9, struct.pack("<Q", 2)), "version 2"),
    (lambda p: _patch(p + ".idx", 17, b"\x09"), "unknown dtype code 9"),
    (lambda p: os.truncate(p + ".idx", 40), "truncated or corrupt"),
    (lambda p: os.truncate(p + ".idx", 10), "too short"),
    (lambda p: os.truncate(p + ".bin", 6), "the .bin is truncated"),
    (lambda p: _patch(p + ".idx", 34 + 4 * 2 + 8 * 2, struct.pack("<q", 1)), "document index"),
    (lambda p: os.remove(p + ".bin"), "does not exist"),
])
def test_broken_files_raise_naming_the_file(good, damage, message):
    damage(good)
    with pytest.raises(UserError, match=message) as err:
        IndexedDataset(good)
    assert os.path.basename(good) in str(err.value)


# ---------------------------------------------------------------- atomic finalize
def _names(d):
    return sorted(os.listdir(d))


def test_abort_and_exceptions_leave_nothing(tmp_path):
    b = IndexedDatasetBuilder(str(tmp_path / "a"), np.uint16)
    b.add_document([1, 2, 3])
    assert len(_names(tmp_path)) == 1 and _names(tmp_path)[0].endswith(".tmp")  # data under a temp name
    b.abort()
    assert _names(tmp_path) == []
    with pytest.raises(RuntimeError):
        with IndexedDatasetBuilder(str(tmp_path / "b"), np.uint16) as b:
            b.add_document([1])
            raise RuntimeError("boom")
    with IndexedDatasetBuilder(str(tmp_path / "c"), np.uint16) as b:
        b.add_document([1])  # leaving the block without finalize() drops it too
    assert _names(tmp_path) == []


def test_finalize_replaces_an_old_pair_and_files_are_not_private(tmp_path):
    prefix = str(tmp_path / "d")
    write_with_builder(prefix, [[[1]]], np.uint16)
    old = os.umask(0o022)
    try:
        write_with_builder(prefix, [[[7, 8]], [[9]]], np.uint16)
    finally:
        os.umask(old)
    assert _names(tmp_path) == ["d.bin", "d.idx"]
    assert IndexedDataset(prefix).sizes.tolist() == [2, 1]
    for name in ("d.bin", "d.idx"):  # mkstemp's 0600 would hide shared datasets from other users
        assert stat.S_IMODE(os.stat(tmp_path / name).st_mode) == 0o644


def test_unwritable_output_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        IndexedDatasetBuilder(str(tmp_path / "missing" / "d"), np.uint16)
    with pytest.raises(UserError, match="/proc/self"):  # exists, but no file can be made there (even as root)
        IndexedDatasetBuilder("/proc/self/megaclm_d", np.uint16)


def test_killed_writer_leaves_no_final_names(tmp_path):
    script = textwrap.dedent(f"""
        import sys, time
        import numpy as np
        from megaclm.data.indexed_dataset import IndexedDatasetBuilder
        b = IndexedDatasetBuilder({str(tmp_path / "k")!r}, np.uint16)
        b.add_documents(np.arange(1 << 20) % 50000, np.full(1 << 10, 1 << 10))
        print("written", flush=True)
        time.sleep(60)
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "written"
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert not any(n.startswith("k.") for n in _names(tmp_path)), _names(tmp_path)
