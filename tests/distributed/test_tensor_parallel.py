"""2 gloo ranks, one spawn: tensor/sequence parallel, vocab-parallel CE, activation checkpointing, ZeRO-3
and a 2-stage DeepSpeed pipeline, each compared with the unsharded single-process model (parallel_checks.py)."""
import os

import pytest

from mp_harness import run_ranks
import parallel_checks as checks

os.environ.setdefault("TORCH_EXTENSIONS_DIR", os.path.join(os.path.dirname(__file__), "..", "..", ".cache",
                                                           "torch_extensions"))
FAMILIES = sorted(checks.FAMILIES)
TOL = 2e-5  # fp32; observed differences are ~1e-6 against gradients of order 1


@pytest.fixture(scope="module")
def ranks():
    return run_ranks(2, checks.world2_checks, timeout=400)


@pytest.mark.parametrize("sequence_parallel", [False, True], ids=["tp2", "tp2-sp"])
@pytest.mark.parametrize("family", FAMILIES)
def test_tp2_logits_loss_and_grads_equal_unsharded(ranks, family, sequence_parallel):
    for rank, result in enumerate(ranks):
        r = result[("tp", family, sequence_parallel)]
        assert r["logits_shape"] == (checks.B, checks.T, checks.VOCAB // 2), f"rank {rank}: logits are not vocab-split"
        assert r["init"] == 0.0, f"rank {rank}: same seed, different initial weights than the TP=1 model's shards"
        assert r["logits"] < TOL and r["loss"] < TOL, (rank, r)
        assert r["grads"] < TOL * max(1.0, r["grad_scale"]), (rank, r)


@pytest.mark.parametrize("sequence_parallel", [False, True], ids=["tp2", "tp2-sp"])
@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_tp2_lora_equals_unsharded_lora(ranks, family, sequence_parallel):
    for rank, result in enumerate(ranks):
        r = result[("lora", family, sequence_parallel)]
        assert r["adapter_effect"] > 1e-2, "the adapters do not change the output: the comparison is vacuous"
        assert r["logits"] < TOL and r["loss"] < TOL, (rank, r)
        assert r["grads"] < TOL * max(1.0, r["grad_scale"]), (rank, r)
        # Only the adapters train: the base has no gradient (so no optimizer state) on either side.
        assert r["trainable"] == r["ref_trainable"] and all("lora_" in k for k in r["trainable"]), r["trainable"]
        assert len(r["trainable"]) == 2 * 4 * checks.FAMILIES[family]["num_layers"]


def test_mappings_forward_and_backward_contracts(ranks):
    for rank, result in enumerate(ranks):
        assert len(result["mappings"]) == 8
        for name, (forward_ok, backward_ok) in result["mappings"].items():
            assert forward_ok and backward_ok, f"rank {rank}: {name} forward ok={forward_ok} backward ok={backward_ok}"


def test_rng_streams_match_and_differ_across_tp_ranks(ranks):
    for r in (result["rng"] for result in ranks):
        assert r == {"default_same": True, "tp_differs": True, "reproducible": True}


def test_vocab_parallel_cross_entropy_equals_torch(ranks):
    for r in (result["vocab_ce"] for result in ranks):
        assert r["dtype"] == "torch.float32"
        assert r["loss"] < 1e-5 and r["grad"] < 1e-6, r


def test_activation_checkpointing_keeps_grads_with_dropout(ranks):
    for r in (result["checkpointing"] for result in ranks):
        assert r["dropout_effect"] > 1e-3, "dropout was not active, the comparison would be vacuous"
        for name, *_ in checks.RECOMPUTE_VARIANTS[1:]:
            assert r[f"{name}_loss"] == 0.0 and r[f"{name}_grads"] == 0.0, (name, r)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_zero3_partitioned_model_equals_plain_model(ranks, family):
    for r in (result[("zero3", family)] for result in ranks):
        assert r["loss"] < TOL and r["grads"] < TOL, r


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_two_stage_pipeline_equals_plain_model(ranks, family):
    results = [result[("pipe", family)] for result in ranks]
    checks.assert_pipeline_matches(results, TOL)
    layers = [r["layers"] for r in sorted(results, key=lambda r: r["stage"])]
    assert layers[0][0] == "Embedding" and "Norm" in layers[-1]
    if family == "llama":  # uniform partition: 2 transformer layers per stage
        assert [ls.count("TransformerLayer") for ls in layers] == [2, 2]
