"""Index builders: C++ == numpy == Megatron's Python loop, element for element; blend deviation bound."""
import numpy as np
import pytest

from megaclm.data import helpers

needs_cpp = pytest.mark.skipif(helpers._cpp is None, reason="C++ helpers not built (pip install -e .)")


def test_extension_is_built_by_the_install():
    # `make install` (pip install -e .) compiles csrc/helpers.cpp; CI must exercise the C++ path.
    assert helpers.backend() == "cpp"


def _random_case(rng):
    n = int(rng.integers(1, 25))
    sizes = rng.integers(0, 12, n).astype(np.int32)  # empty documents included
    sizes[rng.integers(0, n)] = max(1, sizes.max())
    doc = np.concatenate([rng.permutation(n) for _ in range(int(rng.integers(1, 4)))]).astype(np.int32)
    seq = int(rng.integers(1, 10))
    total = int(sizes[doc].sum())
    return sizes, doc, seq, max(0, (total - 1) // seq)


@needs_cpp
def test_sample_index_backends_identical_on_random_inputs():
    rng = np.random.default_rng(0)
    for _ in range(300):
        sizes, doc, seq, n = _random_case(rng)
        ref = helpers.build_sample_index(sizes, doc, seq, n, impl="python")
        for impl in ("cpp", "numpy"):
            got = helpers.build_sample_index(sizes, doc, seq, n, impl=impl)
            assert got.dtype == ref.dtype == np.int32
            np.testing.assert_array_equal(got, ref, err_msg=f"{impl}: sizes={sizes} doc={doc} seq={seq}")


@needs_cpp
def test_sample_index_int64_variant_matches_numpy():
    rng = np.random.default_rng(1)
    sizes = rng.integers(0, 5000, 20000).astype(np.int32)
    doc = np.concatenate([rng.permutation(20000), rng.permutation(20000)]).astype(np.int32)
    n = (int(sizes[doc].sum()) - 1) // 1024
    got = helpers._cpp.build_sample_idx_int64(sizes, doc, 1024, n)
    assert got.dtype == np.int64
    np.testing.assert_array_equal(got, helpers._sample_index_numpy(sizes, doc, 1024, n, np.int64))
    np.testing.assert_array_equal(got, helpers.build_sample_index(sizes, doc, 1024, n, impl="cpp"))
    assert helpers.sample_index_dtype(2**31, 10) == np.int64 and helpers.sample_index_dtype(10, 10) == np.int32


def test_sample_index_matches_the_gpt_dataset_docstring_example():
    sizes = np.array([4, 2, 5], np.int32)
    doc = np.array([2, 0, 1, 1, 2, 0], np.int32)
    for impl in ("numpy", "python") + (("cpp",) if helpers._cpp else ()):
        got = helpers.build_sample_index(sizes, doc, 4, 5, impl=impl)
        np.testing.assert_array_equal(got, [[0, 0], [0, 4], [1, 3], [3, 1], [4, 3], [5, 2]])


@pytest.mark.parametrize("impl", ["numpy", "python"] + (["cpp"] if helpers._cpp else []))
def test_sample_index_refuses_too_many_samples(impl):
    with pytest.raises(ValueError):
        helpers.build_sample_index(np.array([3, 3], np.int32), np.array([0, 1], np.int32), 2, 3, impl=impl)


def _running_deviation(dataset_index, weights):
    """max over n of |count_d(first n samples) - w_d * n| for every dataset d.

    Between two samples of d the deviation is linear in n, so its extremes sit right after each of
    d's samples (most over-represented), right before each (most under-represented) and at the end.
    """
    weights = np.asarray(weights, np.float64)
    size = len(dataset_index)
    order = np.argsort(dataset_index, kind="stable")  # positions of each dataset's samples, increasing
    d = dataset_index[order]
    counts = np.bincount(dataset_index, minlength=len(weights))
    k = np.arange(size) - (np.cumsum(counts) - counts)[d] + 1  # k-th sample of its dataset
    dev = np.abs(weights * size - counts)
    np.maximum.at(dev, d, k - weights[d] * (order + 1))
    np.maximum.at(dev, d, weights[d] * order - (k - 1))
    return dev


def test_running_deviation_helper_matches_brute_force():
    rng = np.random.default_rng(5)
    ds = rng.integers(0, 4, 500).astype(np.int32)
    w = np.array([0.1, 0.2, 0.3, 0.4])
    n = np.arange(1, 501)
    brute = np.array([np.abs(np.cumsum(ds == i) - w[i] * n).max() for i in range(4)])
    np.testing.assert_allclose(_running_deviation(ds, w), brute)


@needs_cpp
@pytest.mark.parametrize("num", [1, 2, 3, 17, 1000])
def test_blending_backends_identical_and_within_bound(num):
    rng = np.random.default_rng(num)
    weights = rng.random(num) ** 4  # skewed
    if num > 3:
        weights[rng.choice(num, 3, replace=False)] = 0.0  # zero-weight datasets never appear
    tree = helpers.blending_tree(weights)
    size = 30000
    ds, ds_sample = helpers.build_blending_index(tree, size, impl="cpp")
    for impl in ("numpy", "python"):
        other = helpers.build_blending_index(tree, size, impl=impl)
        np.testing.assert_array_equal(ds, other[0])
        np.testing.assert_array_equal(ds_sample, other[1])
    assert ds.dtype == np.int32 and ds_sample.dtype == np.int64
    # Each dataset's samples are used in order 0, 1, 2, ...
    for d in np.unique(ds)[:50]:
        np.testing.assert_array_equal(ds_sample[ds == d], np.arange((ds == d).sum()))
    assert not np.isin(np.flatnonzero(weights == 0), ds).any()
    # The stated bound: |count_d(n) - w_d n| <= B_d <= 2 for every prefix n, every dataset.
    dev = _running_deviation(ds, tree.weights)
    assert np.all(dev <= tree.bounds + 1e-9), (dev - tree.bounds).max()
    assert tree.bounds.max() <= 2.0


def test_blend_of_1000_datasets_uniform_and_zipf_stays_within_two_samples():
    for weights in (np.ones(1000), 1.0 / np.arange(1, 1001)):
        tree = helpers.blending_tree(weights)
        ds, _ = helpers.build_blending_index(tree, 200_000)
        assert len(np.unique(ds)) == 1000  # no 255-dataset cap
        dev = _running_deviation(ds, tree.weights)
        assert dev.max() <= 2.0 and np.all(dev <= tree.bounds + 1e-9)


def test_blend_is_a_prefix_of_any_longer_blend():
    tree = helpers.blending_tree([0.5, 0.25, 0.125, 0.125])
    short = helpers.build_blending_index(tree, 1000)
    long = helpers.build_blending_index(tree, 5000)
    np.testing.assert_array_equal(short[0], long[0][:1000])
    np.testing.assert_array_equal(short[1], long[1][:1000])


def test_blending_tree_rejects_bad_weights():
    for bad in ([], [0.0, 0.0], [1.0, -0.5], [np.nan, 1.0]):
        with pytest.raises(ValueError):
            helpers.blending_tree(bad)


def test_numpy_fallback_without_extension_warns_once(monkeypatch, caplog):
    monkeypatch.setattr(helpers, "_cpp", None)
    monkeypatch.setattr("megaclm.logging._warned", set())
    records = []
    monkeypatch.setattr(helpers, "warn_once", lambda key, msg, logger=None: records.append(key))
    assert helpers.backend() == "numpy"
    sizes, doc = np.array([5, 7], np.int32), np.array([1, 0], np.int32)
    np.testing.assert_array_equal(helpers.build_sample_index(sizes, doc, 3, 3),
                                  helpers.build_sample_index(sizes, doc, 3, 3, impl="python"))
    assert records and set(records) == {"data-helpers-missing"}
    with pytest.raises(RuntimeError):
        helpers.build_sample_index(sizes, doc, 3, 3, impl="cpp")
