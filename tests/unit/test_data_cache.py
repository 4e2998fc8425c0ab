"""Index cache: JSON description, reload without rebuild, corruption detected and rebuilt, fallbacks."""
import glob
import json
import os

import numpy as np
import pytest

from megaclm.data import cache as cache_mod
from megaclm.data.cache import IndexCache, description_hash

DESCRIPTION = {"class": "Test", "dataset_path": "/data/x", "seq_length": 8, "num_samples": 100}


def _arrays():
    return {"a": np.arange(1000, dtype=np.int64), "b": np.arange(20, dtype=np.int32).reshape(10, 2)}


class _Counter:
    def __init__(self):
        self.calls = 0

    def __call__(self):
        self.calls += 1
        return _arrays()


def _check(arrays):
    for key, value in _arrays().items():
        np.testing.assert_array_equal(arrays[key], value)
        assert arrays[key].dtype == value.dtype


def test_build_then_load_with_readable_description(tmp_path):
    build = _Counter()
    cache = IndexCache(str(tmp_path / "c"))  # missing directory: created
    arrays, built = cache.get_or_build("Test-train", DESCRIPTION, build)
    assert built and build.calls == 1
    _check(arrays)
    arrays, built = cache.get_or_build("Test-train", DESCRIPTION, build)
    assert not built and build.calls == 1 and isinstance(arrays["a"], np.memmap)
    _check(arrays)
    key = description_hash(DESCRIPTION)
    with open(tmp_path / "c" / f"{key}-Test-train-description.json") as f:
        manifest = json.load(f)
    assert manifest["description"] == DESCRIPTION
    assert set(manifest["files"]) == {"a", "b"} and manifest["files"]["b"]["shape"] == [10, 2]
    assert not glob.glob(str(tmp_path / "c" / "*.tmp"))  # no temp file left behind
    other = dict(DESCRIPTION, seq_length=16)
    assert cache.get_or_build("Test-train", other, build)[1] and build.calls == 2  # new key, new entry


@pytest.mark.parametrize("damage", ["flip", "truncate", "delete", "json"])
def test_corrupt_entry_is_detected_and_rebuilt(tmp_path, damage, caplog):
    cache = IndexCache(str(tmp_path))
    cache.get_or_build("Test-train", DESCRIPTION, _Counter())
    prefix = str(tmp_path / f"{description_hash(DESCRIPTION)}-Test-train")
    path = prefix + "-a.npy"
    if damage == "flip":
        with open(path, "r+b") as f:
            f.seek(-3, os.SEEK_END)
            byte = f.read(1)
            f.seek(-3, os.SEEK_END)
            f.write(bytes([byte[0] ^ 0xFF]))
    elif damage == "truncate":
        with open(path, "r+b") as f:
            f.truncate(os.path.getsize(path) - 8)
    elif damage == "delete":
        os.remove(path)
    else:
        with open(prefix + "-description.json", "w") as f:
            f.write("{not json")
    build = _Counter()
    arrays, built = cache.get_or_build("Test-train", DESCRIPTION, build)
    assert built and build.calls == 1
    _check(arrays)
    assert "rebuilding" in caplog.text, caplog.text


def test_unwritable_directory_falls_back_to_node_local_temp(tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(cache_mod, "fallback_dir", lambda: str(tmp_path / "local"))
    blocker = tmp_path / "file"
    blocker.write_text("")
    cache = IndexCache(str(blocker / "cache"))  # cannot be created: its parent is a file
    arrays, built = cache.get_or_build("Test-train", DESCRIPTION, _Counter())
    assert built and glob.glob(str(tmp_path / "local" / "*-Test-train-description.json"))
    assert "not writable" in caplog.text
    _check(arrays)
    # The second run finds it in the fallback directory.
    assert not cache.get_or_build("Test-train", DESCRIPTION, _Counter())[1]


def test_read_only_directory_with_a_prebuilt_entry_is_read_not_rebuilt(tmp_path, monkeypatch):
    shared = tmp_path / "shared"
    IndexCache(str(shared)).get_or_build("Test-train", DESCRIPTION, _Counter())
    real_access = os.access
    monkeypatch.setattr(cache_mod.os, "access", lambda p, mode: False if str(p) == str(shared) else real_access(p, mode))
    monkeypatch.setattr(cache_mod, "fallback_dir", lambda: str(tmp_path / "local"))
    build = _Counter()
    arrays, built = IndexCache(str(shared)).get_or_build("Test-train", DESCRIPTION, build)
    assert not built and build.calls == 0 and not (tmp_path / "local").exists()
    # ... and an entry it lacks is built in the fallback directory instead.
    _, built = IndexCache(str(shared)).get_or_build("Test-valid", DESCRIPTION, build)
    assert built and (tmp_path / "local").exists()


def test_failed_build_leaves_nothing_behind(tmp_path):
    def broken():
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        IndexCache(str(tmp_path)).get_or_build("Test-train", DESCRIPTION, broken)
    assert [p for p in os.listdir(tmp_path) if not p.endswith(".lock")] == []
