"""Checkpoint manifests, the choice of the tag to load (fallback, pinned, no `latest`, partial saves), and the
token-id range check of datasets, without processes (the launcher runs are in tests/integration/test_integrity.py)."""
import json
import os

import numpy as np
import pytest
import torch

from megaclm.checkpoint.async_save import write_files
from megaclm.checkpoint.deepspeed_ckpt import prune, remove_partial_tags
from megaclm.checkpoint.layout import MANIFEST, META, tag_for
from megaclm.checkpoint.manifest import (DamagedCheckpoint, check_checksums, check_sizes, choose_tag, file_entry,
                                         read_manifest, share_of, write_manifest)
from megaclm.config.data import DataConfig
from megaclm.data.indexed_dataset import IndexedDatasetBuilder
from megaclm.data.token_range import check_token_ids, scan_token_range, token_range
from megaclm.utils.errors import UserError


def make_tag(root, iteration: int, manifest: bool = True, complete: bool = True) -> str:
    """A tag with two torch files written (and hashed) the way a save writes them, then manifest + meta.json."""
    ckpt = root / tag_for(iteration)
    entries = write_files([(str(ckpt / "mp_rank_00_model_states.pt"), {"w": torch.full((64,), float(iteration))}),
                           (str(ckpt / "megaclm" / "rng" / "rank_00000.pt"), {"seed": iteration})])
    meta = json.dumps({"iteration": iteration}).encode()
    if manifest:
        write_manifest(str(ckpt), {os.path.relpath(p, ckpt): e for p, e in entries.items()}, {META: meta})
    if complete:
        (ckpt / META).write_bytes(meta)
    return str(ckpt)


@pytest.fixture
def three(tmp_path):
    """iter 2, 4, 6 complete with manifests; `latest` = iter 6."""
    for it in (2, 4, 6):
        make_tag(tmp_path, it)
    (tmp_path / "latest").write_text(tag_for(6))
    return tmp_path


def test_manifest_lists_every_file_with_the_checksums_of_the_bytes_written(three):
    ckpt = str(three / tag_for(6))
    (three / tag_for(6) / "zero_to_fp32.py").write_text("# written behind megaclm's back")
    write_manifest(ckpt, {}, {META: (three / tag_for(6) / META).read_bytes()})  # everything hashed from disk
    from_disk = read_manifest(ckpt)
    assert sorted(from_disk) == [META, "megaclm/rng/rank_00000.pt", "mp_rank_00_model_states.pt", "zero_to_fp32.py"]
    for rel, entry in from_disk.items():
        assert entry == file_entry(os.path.join(ckpt, rel))
    make_tag(three, 8)  # hashed while written: the same entries as hashing the files afterwards
    written = read_manifest(str(three / tag_for(8)))
    assert all(e == file_entry(str(three / tag_for(8) / rel)) for rel, e in written.items())
    assert check_checksums(ckpt, list(from_disk), from_disk) is None
    shares = [share_of(from_disk, r, 3) for r in range(3)]
    assert sorted(sum(shares, [])) == sorted(from_disk) and all(shares)


def test_damage_is_named_by_file(three):
    ckpt = three / tag_for(6)
    model = ckpt / "mp_rank_00_model_states.pt"
    data = bytearray(model.read_bytes())
    data[len(data) // 2] ^= 0xFF
    model.write_bytes(bytes(data))
    entries = read_manifest(str(ckpt))
    check_sizes(str(ckpt))  # same size: only the checksum sees it
    assert check_checksums(str(ckpt), list(entries), entries).startswith(f"{model} has checksum ")
    model.write_bytes(bytes(data[:100]))
    with pytest.raises(DamagedCheckpoint, match=f"{model} has 100 bytes, the manifest says {len(data)}"):
        check_sizes(str(ckpt))
    model.unlink()
    with pytest.raises(DamagedCheckpoint, match=f"{model} is missing"):
        check_sizes(str(ckpt))
    (ckpt / MANIFEST).write_text("{not json")
    with pytest.raises(DamagedCheckpoint, match="manifest.json cannot be read"):
        check_sizes(str(ckpt))


def test_choose_falls_back_past_a_damaged_newest_and_refuses_it_pinned(three):
    d = str(three)
    assert choose_tag(d, None).tag == tag_for(6) and choose_tag(d, None).report(d) == []
    (three / tag_for(6) / "megaclm" / "rng" / "rank_00000.pt").write_bytes(b"short")
    choice = choose_tag(d, None)
    assert choice.tag == tag_for(4) and list(choice.rejected) == [tag_for(6)]
    [(level, line)] = choice.report(d)
    assert level == "warning" and f"checkpoint {three / tag_for(6)} is damaged" in line
    assert "rank_00000.pt has 5 bytes" in line and line.endswith(f"falling back to {tag_for(4)}")
    with pytest.raises(UserError, match=r"--ckpt-step 6: checkpoint .*iter_0000006 cannot be loaded: .*has 5 bytes"):
        choose_tag(d, 6)
    assert choose_tag(d, 2).tag == tag_for(2)
    # a checksum mismatch found later (verify_checksums) rejects a tag the same way
    assert choose_tag(d, None, {tag_for(4): "checksum differs"}).tag == tag_for(2)
    with pytest.raises(UserError, match="no intact checkpoint to resume from .*never starts from scratch"):
        choose_tag(d, None, {tag_for(4): "x", tag_for(2): "y"})


def test_no_latest_resumes_newest_complete_and_partial_saves_are_ignored(three):
    d = str(three)
    (three / "latest").unlink()
    (three / tag_for(8) / "megaclm").mkdir(parents=True)  # a save that died before meta.json
    choice = choose_tag(d, None)
    assert choice.tag == tag_for(6) and choice.partial == [tag_for(8)]
    assert choice.report(d) == [
        ("info", f"--load {d}: ignoring {tag_for(8)} (no {META}: a save that did not finish)"),
        ("warning", f"--load {d} has no `latest` file; resuming from the newest complete checkpoint there, {tag_for(6)}")]
    assert remove_partial_tags(d) == [tag_for(8)] and not (three / tag_for(8)).exists()
    assert sorted(p.name for p in three.iterdir()) == [tag_for(2), tag_for(4), tag_for(6)]


def test_fresh_start_only_without_complete_checkpoints(tmp_path):
    assert choose_tag(str(tmp_path / "missing"), None).tag is None
    make_tag(tmp_path, 3, complete=False)
    choice = choose_tag(str(tmp_path), None)
    assert choice.tag is None and choice.partial == [tag_for(3)]


def test_checkpoint_without_manifest_loads_with_one_info_line(tmp_path):
    make_tag(tmp_path, 5, manifest=False)
    (tmp_path / "latest").write_text(tag_for(5))
    choice = choose_tag(str(tmp_path), None)
    assert choice.tag == tag_for(5)
    [(level, line)] = choice.report(str(tmp_path))
    assert level == "info" and "has no manifest" in line and "unverified" in line


def test_prune_counts_complete_tags_and_keeps_latest(three):
    make_tag(three, 8, complete=False)
    assert prune(str(three), keep=1) == [tag_for(2), tag_for(4)]
    assert sorted(p.name for p in three.iterdir() if p.name.startswith("iter_")) == [tag_for(6), tag_for(8)]


# ---- token ids against the vocabulary ----------------------------------------------------------------------


def dataset(path, docs, dtype=np.uint16) -> str:
    prefix = str(path)
    builder = IndexedDatasetBuilder(prefix, dtype)
    for doc in docs:
        builder.add_document(np.array(doc))
    builder.finalize()
    return prefix


def test_token_range_is_scanned_once_and_cached(tmp_path, monkeypatch):
    prefix = dataset(tmp_path / "a", [[5, 7, 3], [900, 2]])
    assert scan_token_range(prefix) == (2, 900)
    cache = str(tmp_path / "cache")
    assert token_range(prefix, cache) == (2, 900)
    real_scan = scan_token_range

    def no_scan(prefix):
        raise AssertionError("scanned again")

    monkeypatch.setattr("megaclm.data.token_range.scan_token_range", no_scan)
    assert token_range(prefix, cache) == (2, 900)  # from the cache
    dataset(tmp_path / "a", [[5, 7, 3], [1200, 2]])  # rewritten: another fingerprint, scanned again
    with pytest.raises(AssertionError, match="scanned again"):
        token_range(prefix, cache)
    monkeypatch.setattr("megaclm.data.token_range.scan_token_range", real_scan)
    assert token_range(prefix, cache) == (2, 1200)
    blocked = tmp_path / "a_file"
    blocked.write_text("")  # a cache directory that cannot be created (as under a read-only dataset directory)
    assert token_range(prefix, str(blocked / "cache")) == (2, 1200)  # node-local fallback (megaclm.data.cache)


def test_ids_past_the_vocabulary_are_refused_naming_dataset_split_and_tokenizer(tmp_path):
    good = dataset(tmp_path / "good", [[1, 2, 999]])
    padding = dataset(tmp_path / "padding", [[1, 1010]])
    past = dataset(tmp_path / "past", [[1, 50000]])
    cfg = DataConfig(train_data_path=[good], valid_data_path=[good], test_data_path=[padding])
    check_token_ids(DataConfig(data_path=[good]), 1000, 1024, "--tokenizer-type X", "padded")
    with pytest.raises(UserError, match=(rf"dataset {padding} \(test data\) holds token ids 1..1010, but this run's "
                                         r"tokenizer \(--tokenizer-type X\) has 1000 ids and the model's embedding 1024 "
                                         r"rows \(padded\): id 1010 is in the embedding's padding rows.*another "
                                         r"tokenizer")):
        check_token_ids(cfg, 1000, 1024, "--tokenizer-type X", "padded")
    with pytest.raises(UserError, match=rf"dataset {past} \(train data\).*id 50000 is past the model's embedding"):
        check_token_ids(DataConfig(data_path=["1", good, "1", past]), 1000, 1024, "--tokenizer-type X", "padded")
    check_token_ids(DataConfig(mock_data=True), 10, 16, "x", "y")  # mock data: nothing to check
