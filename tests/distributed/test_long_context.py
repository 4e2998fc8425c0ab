"""Sequence split across real gloo ranks (long_context_checks.py): DeepSpeed-Ulysses and ring attention
give the unsplit model's logits, per-token loss and every gradient, alone, under TP=2, 4-way, and through
DeepSpeed's engine (its reduction over the sequence-data-parallel group)."""
import os

import pytest

from mp_harness import run_ranks
import long_context_checks as checks
from parallel_checks import assert_pipeline_matches

os.environ.setdefault("TORCH_EXTENSIONS_DIR", os.path.join(os.path.dirname(__file__), "..", "..", ".cache",
                                                           "torch_extensions"))
TOL = 1e-5


@pytest.fixture(scope="module")
def world2():
    return run_ranks(2, checks.world2_checks, timeout=500)


@pytest.fixture(scope="module")
def world4():
    return run_ranks(4, checks.world4_checks, timeout=500)


def _assert_equal(result, local_tokens):
    assert result["init"] == 0.0, "same seed, different initial weights than the unsplit model's"
    assert result["local_tokens"] == local_tokens, "each rank must hold only its share of the tokens"
    assert result["logits"] < TOL and result["loss"] < TOL, result
    assert result["grads"] < TOL * max(1.0, result["grad_scale"]), result


@pytest.mark.parametrize("kind,case", [(k, c) for k in ("ulysses", "ring") for c in checks.CASES
                                       if not (k == "ring" and c == "alibi-docs")])
def test_split_of_two_equals_unsplit(world2, kind, case):
    for result in world2:
        _assert_equal(result[(kind, case)], checks.T // 2)


@pytest.mark.parametrize("kind,stage", [("ulysses", 0), ("ulysses", 2), ("ulysses", 3), ("ring", 3)])
def test_deepspeed_engine_sums_gradients_over_the_sequence_ranks(world2, kind, stage):
    for result in world2:
        r = result[("engine", kind, stage)]
        assert r["keys"] == 15 and r["loss"] < TOL and r["grads"] < TOL, r


@pytest.mark.parametrize("name", ["ulysses-tp2", "ring-tp2", "ulysses-tp2-sp", "ring-tp2-sp", "ring4"])
def test_split_with_tp2_and_four_way_equals_unsplit(world4, name):
    n = 4 if name == "ring4" else 2
    for result in world4:
        key = next(k for k in result if k[0] == name)
        _assert_equal(result[key], checks.T // n)


@pytest.mark.parametrize("kind", ["ulysses", "ring"])
def test_pipeline_with_a_split_equals_plain_model(world4, kind):
    results = [result[("pipe", kind)] for result in world4]
    assert_pipeline_matches(results, TOL)
    assert sorted(r["stage"] for r in results) == [0, 0, 1, 1]  # two seq ranks per stage
