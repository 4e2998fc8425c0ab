"""Two real processes race to build the same GPTDataset index cache in one shared directory.

With file locks one builds and the other waits and loads; without locks (a file system that has
none) both build, and atomic renames still leave valid, identical files. Each child sleeps 1 s
inside the build so the two builds overlap.
"""
import hashlib
import json
import os
import subprocess
import sys
import time

import numpy as np
import pytest

from megaclm.data.cache import IndexCache
from megaclm.data.gpt_dataset import GPTDataset, SampleSpec
from megaclm.data.indexed_dataset import IndexedDataset, IndexedDatasetBuilder

CHILD = r"""
import errno, hashlib, json, os, sys, time
mode, cache_dir, prefix, go = sys.argv[1:]
import fcntl
if mode == "nolock":
    def no_locks(*args):
        raise OSError(errno.ENOLCK, "no locks available")
    fcntl.flock = no_locks
import megaclm.data.gpt_dataset as g
from megaclm.data.cache import IndexCache
from megaclm.data.indexed_dataset import IndexedDataset
real_build = g.build_gpt_indices
def slow_build(*args, **kwargs):
    time.sleep(1.0)
    return real_build(*args, **kwargs)
g.build_gpt_indices = slow_build
indexed = IndexedDataset(prefix)
open(f"{go}.ready.{os.getpid()}", "w").close()
while not os.path.exists(go):
    time.sleep(0.002)
ds = g.GPTDataset(indexed, g.SampleSpec(seq_length=32, seed=11), split="train", sequence_range=(0, len(indexed)),
                  num_samples=5000, cache=IndexCache(cache_dir, poll_s=0.05))
digest = hashlib.md5(b"".join(bytes(memoryview(getattr(ds, k))) for k in ("document_index", "sample_index", "shuffle_index")))
print(json.dumps({"built": ds.built, "digest": digest.hexdigest()}))
"""


def _digest(ds):
    return hashlib.md5(b"".join(bytes(memoryview(getattr(ds, k)))
                                for k in ("document_index", "sample_index", "shuffle_index"))).hexdigest()


@pytest.fixture(scope="module")
def prefix(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("race") / "corpus")
    rng = np.random.default_rng(0)
    with IndexedDatasetBuilder(path, np.uint16) as b:
        for _ in range(2000):
            b.add_document(rng.integers(0, 500, int(rng.integers(1, 80))))
        b.finalize()
    return path


def _race(mode, cache_dir, prefix):
    go = os.path.join(os.path.dirname(cache_dir), f"go-{mode}")
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    procs = [subprocess.Popen([sys.executable, "-c", CHILD, mode, cache_dir, prefix, go], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, env=env) for _ in range(2)]
    deadline = time.monotonic() + 120
    while len([f for f in os.listdir(os.path.dirname(go)) if ".ready." in f]) < 2:  # both imported, waiting
        assert time.monotonic() < deadline and all(p.poll() is None for p in procs), "a child died before the race"
        time.sleep(0.01)
    open(go, "w").close()
    results = []
    for p in procs:
        out, err = p.communicate(timeout=120)
        assert p.returncode == 0, err
        results.append(json.loads(out.strip().splitlines()[-1]))
    return results


def _reference(prefix, cache_dir):
    indexed = IndexedDataset(prefix)
    return GPTDataset(indexed, SampleSpec(seq_length=32, seed=11), split="train", sequence_range=(0, len(indexed)),
                      num_samples=5000, cache=IndexCache(cache_dir))


def test_locked_race_builds_once_and_both_get_the_same_indices(prefix, tmp_path):
    cache_dir = str(tmp_path / "cache")
    results = _race("lock", cache_dir, prefix)
    assert sorted(r["built"] for r in results) == [False, True]  # one built, the other waited and loaded
    assert results[0]["digest"] == results[1]["digest"]
    reloaded = _reference(prefix, cache_dir)
    assert not reloaded.built and _digest(reloaded) == results[0]["digest"]


def test_unlocked_race_both_build_and_files_stay_valid(prefix, tmp_path):
    cache_dir = str(tmp_path / "cache")
    results = _race("nolock", cache_dir, prefix)
    assert [r["built"] for r in results] == [True, True]
    assert results[0]["digest"] == results[1]["digest"]
    reloaded = _reference(prefix, cache_dir)  # the files left by the racing renames verify and load
    assert not reloaded.built and _digest(reloaded) == results[0]["digest"]
    assert not [f for f in os.listdir(cache_dir) if f.endswith(".tmp")]
