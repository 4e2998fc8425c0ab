"""--train-epochs: the epoch's size read from the datasets (megaclm.data.epochs), the run length it gives
(megaclm.config.derived.epoch_iters, ceil in exact arithmetic), the config errors, and what the start-up
line says about a blend."""
import numpy as np
import pytest

from megaclm.config import parse_args
from megaclm.config.data import DataConfig
from megaclm.config.derived import epoch_iters
from megaclm.data.blended_dataset import BlendedDataset, BlendIndex
from megaclm.data.builder import build_train_valid_test
from megaclm.data.epochs import drawn_per_dataset, passes_line, train_split
from megaclm.utils.errors import UserError
from data_testutils import write_dataset

VOCAB, MERGES = "tests/data/gpt2-vocab.json", "tests/data/gpt2-merges.txt"


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """A: 10 documents of 100 tokens; B: 4 documents of 50."""
    root = tmp_path_factory.mktemp("epochs")
    a = write_dataset(str(root / "a"), [np.arange(100) % 900 + 1] * 10)
    b = write_dataset(str(root / "b"), [np.arange(50) % 900 + 1] * 4)
    return a, b


@pytest.mark.parametrize("epochs, per_epoch, gbs, iters", [
    (2, 728, 16, 91),  # exact: 1456 samples
    (2, 730, 16, 92),  # 1460 samples -> the global batch that completes them (1472 samples, 2.016 epochs)
    (0.5, 100, 8, 7),  # 50 samples -> 7 x 8 = 56
    (1.1, 50, 5, 11),  # 55 samples = 11 batches; in floats 1.1 x 50 / 5 = 11.000000000000002 -> 12
    (3, 5, 64, 1),     # less than one batch: one step
])
def test_epoch_iters_rounds_up_to_a_whole_global_batch(epochs, per_epoch, gbs, iters):
    assert epoch_iters(epochs, per_epoch, gbs) == iters


def test_an_empty_epoch_is_an_error():
    with pytest.raises(UserError, match="an epoch is empty"):
        epoch_iters(1, 0, 8)


def test_train_split_counts_one_pass_per_dataset(pair):
    a, b = pair
    # --split 80,20,0: A's train split is 8 documents (800 tokens), B's 3 (150 tokens, rounding 3.2)
    split = train_split(DataConfig(seq_length=64, data_path=[a, b], split="80,20,0"))
    assert split.prefixes == [a, b] and split.samples_per_pass == [799 // 64, 149 // 64] == [12, 2]
    assert split.samples_per_epoch == 14 and split.weights == pytest.approx([800 / 950, 150 / 950])
    assert split.epoch(28) == 2.0
    weighted = train_split(DataConfig(seq_length=64, data_path=["1", a, "3", b], split="80,20,0"))
    assert weighted.weights == [0.25, 0.75] and weighted.samples_per_epoch == 14
    # separate training paths: all their documents
    alone = train_split(DataConfig(seq_length=64, train_data_path=[a]))
    assert alone.samples_per_pass == [999 // 64]
    assert train_split(DataConfig(seq_length=64, mock_data=True)) is None


def test_two_epochs_of_one_dataset_index_two_passes(pair, tmp_path):
    """The samples of --train-epochs 2 are exactly what a 2-epoch document index holds: every document twice."""
    a, _ = pair
    cfg = DataConfig(seq_length=64, data_path=[a], split="100,0,0", data_cache_path=str(tmp_path))
    k = train_split(cfg).samples_per_epoch
    train, _, _ = build_train_valid_test(cfg, seed=1, train_samples=2 * k)
    assert train.description["num_epochs"] == 2 and train.description["samples_per_epoch"] == k
    assert np.bincount(train.document_index).tolist() == [2] * 10


def test_passes_line_per_dataset_of_a_blend(pair):
    a, b = pair
    split = train_split(DataConfig(seq_length=64, data_path=[a, b], split="80,20,0"))
    index = np.array([0, 1] * 14, np.int32)  # 28 samples, half from each
    blend = BlendedDataset([None, None], BlendIndex(index, np.zeros(28, np.int64), np.zeros(2, np.int64)))
    assert drawn_per_dataset(blend, 20) == [10, 10]
    assert passes_line(split, [10, 10]) == (f"data: 2 datasets, 14 samples per epoch; the run trains 20 samples = "
                                            f"1.429 epochs: 0.83 passes over {a} (12 samples per pass), 5.00 over {b} (2)")


@pytest.fixture
def flags(pair):
    return ["--num-layers", "2", "--hidden-size", "64", "--num-attention-heads", "4", "--seq-length", "64",
            "--max-position-embeddings", "64", "--micro-batch-size", "2", "--global-batch-size", "8",
            "--tokenizer-type", "GPT2BPETokenizer", "--vocab-file", VOCAB, "--merge-file", MERGES]


@pytest.mark.parametrize("extra, message", [
    (["--train-epochs", "2", "--train-samples", "100"], "training.train_epochs and training.train_samples are exclusive"),
    (["--train-epochs", "2", "--train-tokens", "1000"], "training.train_epochs and training.train_tokens are exclusive"),
    (["--train-epochs", "0"], "training.train_epochs=0.0 must be > 0"),
    (["--train-epochs", "1", "--mock-data"], "training.train_epochs needs a training dataset"),
])
def test_train_epochs_errors(flags, pair, extra, message):
    data = [] if "--mock-data" in extra else ["--data-path", pair[0]]
    with pytest.raises(UserError, match=message):
        parse_args(flags + data + extra, world_size=1)


def test_length_is_unknown_until_the_data_is_read(flags, pair):
    """parse_args knows no dataset sizes: the trainer (megaclm.training.pretrain.derive) fills them in."""
    derived = parse_args(flags + ["--data-path", pair[0], "--train-epochs", "2"], world_size=1).derived
    assert derived.train_iters is None and derived.samples_per_epoch is None
