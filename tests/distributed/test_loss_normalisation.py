"""The loss is per token over the whole global batch (megaclm.training.loss): the same global batch, with loss
masks that keep very different shares of each sample, gives the same loss and gradients at micro-batch x
accumulation 1x8, 2x4, 4x2, 8x1 on one rank and 1x4, 2x2, 4x1 on two data-parallel ranks (ZeRO-0 and
ZeRO-1), equal to the plain model's sum(loss x mask) / sum(mask) (loss_checks.py)."""
import os

import pytest

import loss_checks
from mp_harness import run_ranks

os.environ.setdefault("TORCH_EXTENSIONS_DIR", os.path.join(os.path.dirname(__file__), "..", "..", ".cache",
                                                           "torch_extensions"))
TOL = 1e-6  # fp32


@pytest.fixture(scope="module")
def results():
    one = run_ranks(1, loss_checks.layouts, [(1, 0), (2, 0), (4, 0), (8, 0), (2, 1)], timeout=400)[0]
    two = run_ranks(2, loss_checks.layouts, [(1, 0), (2, 0), (4, 0), (1, 1)], timeout=400)
    return one, two


def test_the_masks_make_per_token_differ_from_a_mean_of_means(results):
    ref = results[0]["reference"]  # else the test below could not tell the two normalisations apart
    assert abs(ref["loss"] - ref["mean_of_means"]) > 1e-3, ref


def test_every_layout_gives_the_per_token_loss_and_gradients(results):
    one, two = results
    ref = one["reference"]
    runs = {k: v for k, v in one.items() if k != "reference"}
    runs.update({(k, rank): v for rank, r in enumerate(two) for k, v in r.items()})
    assert len(runs) == 5 + 2 * 4
    for key, run in runs.items():
        assert abs(run["loss"] - ref["loss"]) < TOL, (key, run["loss"], ref["loss"])
        assert sorted(run["grads"]) == sorted(ref["grads"]), key
        for name, g in run["grads"].items():
            diff = (g - ref["grads"][name]).abs().max().item()
            assert diff < TOL, (key, name, diff)
    assert {key: run["accum"] for key, run in one.items() if key != "reference"} == {
        (1, 1, 0): 8, (1, 2, 0): 4, (1, 4, 0): 2, (1, 8, 0): 1, (1, 2, 1): 4}
