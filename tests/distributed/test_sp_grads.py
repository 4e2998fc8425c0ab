"""2 gloo ranks, TP=2 + sequence parallel through build_engine: the SP-replicated gradients (norm weights and
biases, row-parallel biases) summed once per optimizer step in one all-reduce give the same clipped step as the
per-parameter, per-micro-batch hooks, on the plain engine (ZeRO 0/1, fp32 and bf16) and on the pipeline engine
in bf16 (BF16_Optimizer's fp32 buffers); ZeRO-2 (gradients partitioned during backward) and ZeRO-1 with
overlap_comm (--overlap-grad-reduce: reduced during the last backward) keep the hooks."""
import os

import pytest

from mp_harness import run_ranks
import sp_grad_checks as checks

os.environ.setdefault("TORCH_EXTENSIONS_DIR", os.path.join(os.path.dirname(__file__), "..", "..", ".cache",
                                                           "torch_extensions"))
SP_PARAMS = 2 * 2 * 2 + 2 + 2 * 2  # gpt2 family, 2 layers: 2 LayerNorms (weight, bias) each + final + proj/fc2 biases


@pytest.fixture(scope="module")
def ranks():
    return run_ranks(2, checks.sp_grad_checks, timeout=400)


# bf16: measured 1.7e-4 relative on the norm and 2.4e-4 on the parameters (the sums round differently)
@pytest.mark.parametrize("zero_stage,precision,pipeline,tol", [
    (0, "fp32", False, 1e-6), (1, "fp32", False, 1e-6), (1, "bf16", False, 2e-3), (0, "bf16", True, 2e-3)],
    ids=["zero0", "zero1", "zero1-bf16", "pipeline-bf16"])
def test_once_per_step_equals_per_micro_batch(ranks, zero_stage, precision, pipeline, tol):
    for rank, result in enumerate(ranks):
        r = result[(zero_stage, precision, pipeline)]
        assert r["deferred"] == SP_PARAMS, r["deferred"]
        per_micro, per_step = r["all_reduces"]
        # the hooks: one all-reduce per SP parameter per micro-batch; deferred: one per step, all of them
        assert len(per_micro) - len(per_step) == 2 * SP_PARAMS - 1, (per_micro, per_step)
        norm_micro, norm_step = r["norm"]
        assert norm_step == pytest.approx(norm_micro, rel=max(tol, 1e-5))
        assert norm_step > 0.05, "clipping at 0.05 must bind for the norm to matter"
        assert r["params"] < tol, (rank, r["params"])


def test_zero2_keeps_the_per_micro_batch_hooks(ranks):
    for result in ranks:
        r = result[(2, "fp32", False)]
        assert r["deferred"] == 0
        assert r["norm"][0] == r["norm"][1] and r["params"] == 0.0


def test_zero1_overlap_comm_keeps_the_hooks_and_matches_zero1(ranks):
    """--overlap-grad-reduce at ZeRO-1: DeepSpeed reduces the gradients in the last micro-batch's backward hooks,
    before a once-per-step sum could run, so the SP gradients keep their per-micro-batch hooks; the step equals
    ZeRO-1's without overlap (deferred sum)."""
    for result in ranks:
        r = result["overlap_comm"]
        assert r["deferred"] == 0
        assert r["norm"][1] == pytest.approx(r["norm"][0], rel=1e-6) and r["params"] < 1e-6, r
