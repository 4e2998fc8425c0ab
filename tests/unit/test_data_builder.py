"""build_train_valid_test: blends (1,000 datasets), splits, data-path files, mixing phases, bad input."""
import os

import numpy as np
import pytest

from data_testutils import EOD, make_random_dataset, write_dataset
from megaclm.config.data import DataConfig
from megaclm.data.blended_dataset import BlendedDataset
from megaclm.data.builder import build_train_valid_test, read_data_path_file, train_valid_test_num_samples
from megaclm.data.curriculum import Curriculum
from megaclm.data.gpt_dataset import GPTDataset
from megaclm.utils.errors import UserError


@pytest.fixture(scope="module")
def many(tmp_path_factory):
    """1,000 small datasets and a --data-path-file with Zipf weights."""
    d = tmp_path_factory.mktemp("many")
    prefixes = [make_random_dataset(d, f"ds{i:04d}", 6, seed=i, max_len=12) for i in range(1000)]
    weights = 1.0 / np.arange(1, 1001)
    path = d / "blend.txt"
    path.write_text("# zipf blend\n" + "\n".join(f"{float(w)!r} {p}  # dataset {i}" for i, (w, p) in
                                                 enumerate(zip(weights, prefixes))))
    return prefixes, weights / weights.sum(), str(path)


@pytest.fixture(scope="module")
def two(tmp_path_factory):
    d = tmp_path_factory.mktemp("two")
    return [make_random_dataset(d, "web", 400, seed=1), make_random_dataset(d, "code", 300, seed=2)]


def test_blend_of_1000_datasets_follows_weights_and_samples(many, tmp_path):
    prefixes, weights, blend_file = many
    cfg = DataConfig(seq_length=8, data_path_file=blend_file, split="1", data_cache_path=str(tmp_path))
    train, valid, test = build_train_valid_test(cfg, seed=5, train_samples=20000, eod_id=EOD)
    assert isinstance(train, BlendedDataset) and len(train) == 20000 and valid is None and test is None
    ds_index = np.asarray(train.index.dataset_index)
    assert len(np.unique(ds_index)) == 1000  # every dataset contributes: no 255 cap
    n = np.arange(1, 20001)
    worst = max(np.abs(np.cumsum(ds_index == d) - weights[d] * n).max() for d in range(1000))
    assert worst <= 2.0  # the bound stated in megaclm.data.helpers
    for i in range(0, 20000, 97):
        d, s = train.source(i)
        np.testing.assert_array_equal(train[i]["tokens"], train.datasets[d][s]["tokens"])
        assert os.path.abspath(train.datasets[d].indexed.prefix) == os.path.abspath(prefixes[d])
    # Second build (another rank, or the run after tools/build_data_indices.py) only loads.
    again = build_train_valid_test(cfg, seed=5, train_samples=20000, eod_id=EOD)[0]
    assert not any(ds.built for ds in again.datasets if ds is not None)
    np.testing.assert_array_equal(again.index.dataset_sample_index, train.index.dataset_sample_index)


def test_data_path_file_formats_agree(tmp_path, two):
    web, code = two
    text = tmp_path / "b.txt"
    text.write_text(f"0.3 {web}\n0.7 {code} # comment\n")
    as_list = tmp_path / "b.yaml"
    as_list.write_text(f"- [0.3, {web}]\n- [0.7, {code}]\n")
    as_map = tmp_path / "c.yml"
    as_map.write_text(f"{web}: 0.3\n{code}: 0.7\n")
    expected = ["0.3", web, "0.7", code]
    for path in (text, as_list, as_map):
        assert read_data_path_file(str(path)) == expected
    bad = tmp_path / "bad.yaml"
    bad.write_text("a: [1, 2]\nb: {c: d}\n- x")
    with pytest.raises(UserError, match="bad.yaml"):
        read_data_path_file(str(bad))
    with pytest.raises(UserError, match="does not exist"):
        read_data_path_file(str(tmp_path / "none.txt"))


def test_split_blend_valid_test_and_unweighted_blend_by_tokens(two, tmp_path):
    web, code = two
    cfg = DataConfig(seq_length=16, data_path=[web, code], split="80,15,5", data_cache_path=str(tmp_path))
    train, valid, test = build_train_valid_test(cfg, seed=1, train_samples=3000, valid_samples=200,
                                                test_samples=50, eod_id=EOD)
    assert len(train) == 3000 and len(valid) == 200 and len(test) == 50
    # Documents of different splits never mix: train uses documents [0, 320) of web, [0, 240) of code.
    for ds, split in ((train, (0, 320, 0, 240)), (valid, (320, 380, 240, 285)), (test, (380, 400, 285, 300))):
        web_docs, code_docs = set(ds.datasets[0].document_index.tolist()), set(ds.datasets[1].document_index.tolist())
        assert web_docs == set(range(split[0], split[1])) and code_docs == set(range(split[2], split[3]))
    # No weights: blend by tokens in the split, like a concatenation.
    tokens = [int(d.indexed.sizes[a:b].sum()) for d, (a, b) in zip(train.datasets, [(0, 320), (0, 240)])]
    share = np.bincount(train.index.dataset_index) / 3000
    np.testing.assert_allclose(share, np.array(tokens) / sum(tokens), atol=1e-3)


def test_separate_train_valid_test_paths(two, tmp_path):
    web, code = two
    cfg = DataConfig(seq_length=16, train_data_path=[web], valid_data_path=[code], data_cache_path=str(tmp_path))
    train, valid, test = build_train_valid_test(cfg, seed=1, train_samples=100, valid_samples=10, test_samples=10,
                                                eod_id=EOD)
    assert isinstance(train, GPTDataset) and train.indexed.prefix == web and train.document_index.max() == 399
    assert valid.indexed.prefix == code and test is None


def test_numpy_backend_builds_the_same_datasets(two, tmp_path):
    cfg = DataConfig(seq_length=16, data_path=["0.6", two[0], "0.4", two[1]], split="1")
    a = build_train_valid_test(DataConfig(**{**cfg.__dict__, "data_cache_path": str(tmp_path / "a")}), seed=3,
                               train_samples=2000, eod_id=EOD, impl="numpy")[0]
    b = build_train_valid_test(DataConfig(**{**cfg.__dict__, "data_cache_path": str(tmp_path / "b")}), seed=3,
                               train_samples=2000, eod_id=EOD, impl="python")[0]
    for i in range(0, 2000, 37):
        np.testing.assert_array_equal(a[i]["tokens"], b[i]["tokens"])


def test_mixing_phases_switch_in_run_at_the_scheduled_tokens(two, tmp_path):
    web, code = two
    gbs = 4
    cfg = DataConfig(seq_length=32, data_path=["0.5", web, "0.5", code], split="1", data_cache_path=str(tmp_path),
                     data_mixing_schedule=["0:1,0", "3000:0.25,0.75"], curriculum_seqlen_start=8,
                     curriculum_seqlen_steps=20)
    cur = Curriculum.from_config(cfg, gbs)
    switch_step = next(s for s in range(1000) if cur.tokens_before(s) >= 3000)
    train = build_train_valid_test(cfg, seed=1, train_samples=800, eod_id=EOD, global_batch_size=gbs)[0]
    ds_index = np.asarray(train.index.dataset_index)
    first = switch_step * gbs
    assert first > 0 and np.all(ds_index[:first] == 0)
    tail = ds_index[first:]
    n = np.arange(1, len(tail) + 1)
    assert np.abs(np.cumsum(tail == 1) - 0.75 * n).max() <= 2.0
    # Each dataset's samples continue across the switch: 0, 1, 2, ... with no repeat or gap.
    for d in (0, 1):
        np.testing.assert_array_equal(train.index.dataset_sample_index[ds_index == d], np.arange((ds_index == d).sum()))
    assert cur.phase_at(switch_step - 1) == 0 and cur.phase_at(switch_step) == 1


def test_sample_counts_follow_megatron():
    assert train_valid_test_num_samples(1000, 8, 100, 10) == (8000, 11 * 10 * 8, 80)


def test_bad_inputs_raise_one_clear_error(two, tmp_path):
    web, code = two
    cache = str(tmp_path / "c")
    cases = [
        (dict(data_path=["0.3", web, "0.7"]), "3 entries"),
        (dict(data_path=["-0.3", web, "0.7", code]), "negative weight"),
        (dict(data_path=["0", web, "0.0", code]), "all weights are zero"),
        (dict(data_path=[web], split="0,10,0"), "leaves the training split empty"),
        (dict(data_path=[web], split="a,b"), "data.split"),
        (dict(data_path=[web], data_mixing_schedule=["0:1,0"]), "2 weights per phase but 1"),
        (dict(data_path=[web], data_mixing_schedule=["5:1"]), "first phase must start at 0"),
        (dict(data_path=[web], train_data_path=[code]), "exclusive"),
        (dict(data_path=[web], curriculum_seqlen_start=4), "exactly one of"),
    ]
    for kwargs, message in cases:
        with pytest.raises(UserError, match=message):
            DataConfig(seq_length=16, data_cache_path=cache, **kwargs)
    missing = str(tmp_path / "nothing")
    with pytest.raises(UserError, match=f"{missing}.idx does not exist"):
        build_train_valid_test(DataConfig(seq_length=16, data_path=[missing]), seed=1, train_samples=10)
    empty = write_dataset(str(tmp_path / "empty"), [])
    with pytest.raises(UserError, match=f"dataset {empty} is empty"):
        build_train_valid_test(DataConfig(seq_length=16, data_path=[empty], data_cache_path=cache), seed=1,
                               train_samples=10)
    with pytest.raises(UserError, match=f"{web}.*fewer than one sample of --seq-length 100000"):
        build_train_valid_test(DataConfig(seq_length=100000, data_path=[web], data_cache_path=cache), seed=1,
                               train_samples=10)
    few = write_dataset(str(tmp_path / "few"), [[1, 2, 3]])  # 1 document: train split keeps it, valid gets none
    with pytest.raises(UserError, match=f"{few}.*train split.*no documents"):
        build_train_valid_test(DataConfig(seq_length=2, data_path=[few], split="0.01,0.99", data_cache_path=cache),
                               seed=1, train_samples=1)
    blend_file = tmp_path / "blend.txt"
    blend_file.write_text(f"1 {web}\n1 {code}\n")
    with pytest.raises(UserError, match="3 weights per phase but 2 training datasets"):
        build_train_valid_test(DataConfig(seq_length=16, data_path_file=str(blend_file), data_cache_path=cache,
                                          data_mixing_schedule=["0:1,1,1"]), seed=1, train_samples=10,
                               global_batch_size=2)


def test_datasets_pickle_by_reference_and_feed_a_dataloader(two, tmp_path):
    import pickle

    import torch

    cfg = DataConfig(seq_length=16, data_path=["0.6", two[0], "0.4", two[1]], split="1", data_cache_path=str(tmp_path))
    train = build_train_valid_test(cfg, seed=3, train_samples=64, eod_id=EOD)[0]
    blob = pickle.dumps(train)
    assert len(blob) < 20_000  # file names, not the memory-mapped indices or token files
    copy = pickle.loads(blob)
    for i in range(64):
        np.testing.assert_array_equal(copy[i]["tokens"], train[i]["tokens"])
    from megaclm.data.sampler import PretrainingSampler

    # The sampler is a DataLoader batch_sampler; default collation stacks the sample dicts.
    loader = torch.utils.data.DataLoader(copy, batch_sampler=PretrainingSampler(64, 16, 4, 1, 2, 16))
    batches = list(loader)
    assert len(batches) == 6 and batches[0]["tokens"].shape == (4, 16)
    expected = np.stack([train[i]["tokens"] for i in range(20, 24)])
    np.testing.assert_array_equal(batches[0]["tokens"].numpy(), expected)


def test_mock_data_is_deterministic_learnable_and_bounded():
    from megaclm.data.gpt_dataset import SampleSpec
    from megaclm.data.mock_dataset import MockGPTDataset

    cfg = DataConfig(seq_length=64, mock_data=True, reset_position_ids=True)
    train, valid, test = build_train_valid_test(cfg, seed=3, train_samples=20, valid_samples=4, eod_id=99,
                                                vocab_size=100)
    assert (len(train), len(valid), test) == (20, 4, None)
    assert np.array_equal(train[5]["tokens"], build_train_valid_test(cfg, seed=3, train_samples=20, eod_id=99,
                                                                     vocab_size=100)[0][5]["tokens"])
    assert not np.array_equal(train[3]["tokens"], valid[3]["tokens"])  # the splits differ
    text = MockGPTDataset(SampleSpec(seq_length=64, seed=3, eod_id=99), "train", 20, 100).tokens(5)
    assert text.min() >= 0 and text.max() < 100 and len(text) == 65
    # inside a document the next id is the current one + 1 (mod the vocabulary, skipping eod)
    nxt = [(b - a) % 100 for a, b in zip(text[:-1], text[1:]) if a != 99 and b != 99]
    assert nxt and all(d in (1, 2) for d in nxt)
    sample = train[5]  # masks and positions are GPTDataset's: positions restart after each eod
    eods = np.flatnonzero(sample["tokens"] == 99)
    if len(eods) and eods[0] + 1 < 64:
        assert sample["position_ids"][eods[0] + 1] == 0
    with pytest.raises(UserError, match="mock_data and data.data_path"):
        DataConfig(mock_data=True, data_path=["x"])

