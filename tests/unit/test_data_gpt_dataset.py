"""GPTDataset: samples against an independent token-stream reference, epochs, masks, determinism, errors."""
import os

import numpy as np
import pytest

from data_testutils import EOD, make_random_dataset, random_docs, write_dataset
from megaclm.data.cache import IndexCache
from megaclm.data.gpt_dataset import GPTDataset, SampleSpec, build_gpt_indices, make_sample, num_epochs_for
from megaclm.data.indexed_dataset import IndexedDataset
from megaclm.utils.errors import UserError


@pytest.fixture(scope="module")
def prefix(tmp_path_factory):
    return make_random_dataset(tmp_path_factory.mktemp("gpt"), "corpus", 300, seed=3)


def _dataset(prefix, cache_dir, seq=16, num_samples=500, seed=7, rng=(0, 300), **spec):
    return GPTDataset(IndexedDataset(prefix), SampleSpec(seq_length=seq, seed=seed, eod_id=EOD, **spec),
                      split="train", sequence_range=rng, num_samples=num_samples, cache=IndexCache(str(cache_dir)))


def test_samples_are_windows_of_the_epoch_stream(prefix, tmp_path):
    ds = _dataset(prefix, tmp_path, seq=16, num_samples=500)
    indexed = IndexedDataset(prefix)
    # Independent reference: concatenate the documents in document_index order, cut windows.
    stream = np.concatenate([indexed[int(d)] for d in ds.document_index]).astype(np.int64)
    assert len(ds) >= 500
    for item in range(len(ds)):
        i = int(ds.shuffle_index[item])
        window = stream[i * 16: i * 16 + 17]
        sample = ds[item]
        np.testing.assert_array_equal(sample["tokens"], window[:-1])
        np.testing.assert_array_equal(sample["labels"], window[1:])
        assert sample["tokens"].dtype == np.int64 and sample["loss_mask"].dtype == np.float32
        assert sample["position_ids"].dtype == np.int64 and "document_ids" not in sample


def test_every_epoch_is_a_permutation_and_shuffle_covers_all_samples(prefix, tmp_path):
    ds = _dataset(prefix, tmp_path, seq=16, num_samples=2000, rng=(10, 250))
    tokens = int(IndexedDataset(prefix).sizes[10:250].sum())
    epochs = num_epochs_for(tokens, 16, 2000)
    assert epochs > 1 and len(ds.document_index) == epochs * 240
    for e in range(epochs):
        assert sorted(ds.document_index[e * 240:(e + 1) * 240].tolist()) == list(range(10, 250))
    assert len(ds) == (epochs * tokens - 1) // 16 >= 2000
    assert sorted(ds.shuffle_index.tolist()) == list(range(len(ds)))


def test_small_last_epoch_is_shuffled_separately():
    sizes = np.full(100, 10, np.int32)  # 1000 tokens per epoch, seq 10 -> 99 samples per epoch
    arrays = build_gpt_indices(sizes, np.arange(100), 10, 99 + 10, seed=1)  # the 2nd epoch gives 10 < 80%
    first = (1000 - 1) // 10
    shuffle = arrays["shuffle_index"]
    assert sorted(shuffle[:first].tolist()) == list(range(first))
    assert sorted(shuffle[first:].tolist()) == list(range(first, len(shuffle)))
    mostly = build_gpt_indices(sizes, np.arange(100), 10, 99 + 90, seed=1)["shuffle_index"]  # 90 >= 80%
    assert sorted(mostly[:first].tolist()) != list(range(first))


def test_deterministic_and_seed_dependent(prefix, tmp_path):
    a = _dataset(prefix, tmp_path / "a", seed=7)
    b = _dataset(prefix, tmp_path / "b", seed=7)
    c = _dataset(prefix, tmp_path / "c", seed=8)
    for key in ("document_index", "sample_index", "shuffle_index"):
        np.testing.assert_array_equal(getattr(a, key), getattr(b, key))
    assert not np.array_equal(a.shuffle_index, c.shuffle_index)
    assert a.built and b.built


def test_cpp_and_numpy_builds_give_the_same_indices(prefix):
    sizes = IndexedDataset(prefix).sizes
    a = build_gpt_indices(sizes, np.arange(300), 8, 3000, seed=2, impl="numpy")
    b = build_gpt_indices(sizes, np.arange(300), 8, 3000, seed=2, impl="python")
    for key in a:
        np.testing.assert_array_equal(a[key], b[key])


def _megatron_masks(tokens, eod, reset_position_ids, reset_attention_mask, eod_mask_loss):
    """Megatron's get_ltor_masks_and_position_ids, as the loop it is (True = may attend)."""
    s = len(tokens)
    mask = np.tril(np.ones((s, s), bool))
    loss_mask = np.ones(s, np.float32)
    if eod_mask_loss:
        loss_mask[tokens == eod] = 0.0
    position_ids = np.arange(s)
    prev = 0
    for i in np.flatnonzero(tokens == eod):
        if reset_attention_mask:
            mask[i + 1:, :i + 1] = False
        if reset_position_ids:
            position_ids[i + 1:] -= i + 1 - prev
            prev = i + 1
    return mask, position_ids, loss_mask


@pytest.mark.parametrize("flags", [(True, True, True), (True, False, False), (False, True, False), (False, False, True)])
def test_document_masks_match_megatron(flags):
    rpi, ram, eml = flags
    spec = SampleSpec(seq_length=40, seed=0, eod_id=EOD, reset_position_ids=rpi, reset_attention_mask=ram,
                      eod_mask_loss=eml)
    rng = np.random.default_rng(4)
    for _ in range(20):
        text = rng.integers(0, 4, 41)  # many eods, also at the first and last input positions
        sample = make_sample(text, spec)
        mask, pos, loss = _megatron_masks(text[:-1], EOD, rpi, ram, eml)
        np.testing.assert_array_equal(sample["position_ids"], pos)
        np.testing.assert_array_equal(sample["loss_mask"], loss)
        if ram:  # the document ids, turned into a causal same-document mask, give Megatron's dense mask
            doc = sample["document_ids"]
            np.testing.assert_array_equal(np.tril(doc[:, None] == doc[None, :]), mask)
        else:
            assert "document_ids" not in sample


def test_multi_sequence_documents_are_streamed_by_sequence(tmp_path):
    prefix = str(tmp_path / "multi")
    from megaclm.data.indexed_dataset import IndexedDatasetBuilder
    with IndexedDatasetBuilder(prefix, np.uint16) as b:
        for d in range(20):
            b.add_document(np.arange(1, 13) + 100 * d, lengths=[5, 7])
        b.finalize()
    indexed = IndexedDataset(prefix)
    ds = GPTDataset(indexed, SampleSpec(seq_length=6, seed=0), split="train", sequence_range=(0, 40),
                    num_samples=None, cache=IndexCache(str(tmp_path / "c")))
    assert sorted(ds.document_index.tolist()) == list(range(40))
    assert len(ds) == (240 - 1) // 6


def test_errors_name_the_dataset(prefix, tmp_path):
    spec = SampleSpec(seq_length=16, seed=0)
    cache = IndexCache(str(tmp_path))
    with pytest.raises(UserError, match="does not exist"):
        IndexedDataset(str(tmp_path / "missing"))
    only_idx = write_dataset(str(tmp_path / "half"), random_docs(np.random.default_rng(0), 3))
    os.remove(only_idx + ".bin")
    with pytest.raises(UserError, match=r"half\.bin does not exist"):
        IndexedDataset(only_idx)
    with pytest.raises(UserError, match=f"{prefix}.*fewer than one sample of --seq-length 5000"):
        GPTDataset(IndexedDataset(prefix), SampleSpec(seq_length=5000, seed=0), split="train",
                   sequence_range=(0, 300), num_samples=1, cache=cache)
    with pytest.raises(UserError, match=f"{prefix}.*valid split.*no documents"):
        GPTDataset(IndexedDataset(prefix), spec, split="valid", sequence_range=(5, 5), num_samples=1, cache=cache)
    with pytest.raises(UserError, match="end-of-document id"):
        SampleSpec(seq_length=8, seed=0, eod_id=None, eod_mask_loss=True)
    with pytest.raises(IndexError):
        _dataset(prefix, tmp_path, num_samples=10).tokens(10 ** 6)
