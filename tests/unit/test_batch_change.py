"""Which global-batch changes a resume allows (megaclm.training.batch_change), and the samples it then reads."""
import numpy as np
import pytest

from megaclm.config import parse_config
from megaclm.data.indexed_dataset import IndexedDatasetBuilder
from megaclm.training.batch_change import check_batch_change, samples_needed
from megaclm.utils.errors import UserError


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    prefix = str(tmp_path_factory.mktemp("data") / "text_document")
    b = IndexedDatasetBuilder(prefix, np.uint16)
    b.add_document(np.arange(500) % 100)
    b.finalize()
    return ["--num-layers", "2", "--hidden-size", "64", "--num-attention-heads", "4", "--seq-length", "64",
            "--max-position-embeddings", "64", "--micro-batch-size", "2", "--global-batch-size", "32",
            "--tokenizer-type", "NullTokenizer", "--vocab-size", "100", "--data-path", prefix]


def note(base, extra, saved=16):
    cfg, derived = parse_config(base + extra, world_size=2)
    return check_batch_change(cfg, derived, saved, 40, "--load ckpt/iter_0000040")


def test_unchanged_batch_says_nothing(base):
    assert note(base, ["--train-iters", "100"], saved=32) is None


@pytest.mark.parametrize("extra, lr", [
    (["--train-iters", "100"], "iterations: it continues from iteration 40 on the same curve"),
    (["--train-samples", "3200", "--lr-decay-iters", "100"], "iterations: it continues from iteration 40"),
    (["--train-tokens", "204800", "--lr-warmup-tokens", "6400"], "tokens: it continues exactly"),
])
def test_allowed_when_the_lr_lengths_do_not_depend_on_the_batch(base, extra, lr):
    text = note(base, extra)
    assert text.startswith("resuming with global batch size 32 (the checkpoint's: 16, --load ckpt/iter_0000040)")
    assert f"the lr schedule counts {lr}" in text


@pytest.mark.parametrize("extra, moved", [
    (["--train-samples", "3200"], "decay 200 -> 100 iterations"),  # the decay defaults to the run: iterations of G
    (["--train-iters", "100", "--lr-warmup-samples", "320"], "warmup 20 -> 10 iterations"),
    (["--train-iters", "100", "--lr-warmup-tokens", "6400"], "decay 102400 -> 204800 tokens"),
])
def test_refused_when_the_lr_would_jump(base, extra, moved):
    with pytest.raises(UserError, match=rf"\({moved}\), so the lr would jump"):
        note(base, extra)


def test_samples_needed_follows_the_first_limit(base):
    cfg, _ = parse_config(base + ["--train-iters", "100", "--train-tokens", str(2000 * 64)], world_size=2)
    # 40 steps of 16 = 640 samples consumed; at 32: 43 more steps by --train-tokens, 60 by --train-iters
    assert samples_needed(cfg.training, 32, 64, 40, 640, 640 * 64) == 640 + 43 * 32


def test_refused_with_train_epochs(base):
    """The epoch's end is a count of the checkpoint's global batches: another batch would move it."""
    with pytest.raises(UserError, match=r"--train-epochs fixed the run's end and its lr schedule in iterations of 16 "
                                        r"samples; resume with --global-batch-size 16"):
        note(base, ["--train-epochs", "2"])
