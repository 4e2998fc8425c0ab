"""4 gloo ranks, one spawn: DeepSpeed pipeline engine with TP x PP x DP = 2x2x1 (with and without
sequence parallel + activation checkpointing) and 1x2x2, loss and gradients against the plain model."""
import os

import pytest

from mp_harness import run_ranks
import parallel_checks as checks

os.environ.setdefault("TORCH_EXTENSIONS_DIR", os.path.join(os.path.dirname(__file__), "..", "..", ".cache",
                                                           "torch_extensions"))


@pytest.fixture(scope="module")
def ranks():
    return run_ranks(4, checks.world4_checks, timeout=500)


@pytest.mark.parametrize("layout", ["2x2x1", "2x2x1-sp", "1x2x2"])
def test_tp_pp_dp_layout_matches_plain_model(ranks, layout):
    checks.assert_pipeline_matches([result[layout] for result in ranks], tol=2e-5)
