"""megaclm.planner: hardware profiles, the cost model's rules, the search over megaclm's own validation, and
validation 2 (the published Megatron-LM runs of Narayanan et al. 2021, on paper)."""
import dataclasses
import json

import pytest

from megaclm.config import parse_args
from megaclm.config.kernels import KernelsConfig
from megaclm.config.model import ModelConfig
from megaclm.config.presets import model_preset
from megaclm.model.flops import GiB, estimate_memory
from megaclm.planner.cost import OPS_PER_LAYER, Layout, Workload, link_for, memory_setup, predict
from megaclm.planner.hardware import load_profile, profile_from_dict, shipped_profiles
from megaclm.planner.published import (BIGSCIENCE_SWEEP, PUBLISHED, fit_op_overhead, hidden_comm_mfu,
                                       jean_zay_a100, plan_published, plan_sweep_run, spearman, sweep_spearman)
from megaclm.planner.search import MEMORY_MARGIN, SearchSpace, refusal, search, shape_rank
from megaclm.utils.errors import UserError

A100 = load_profile("a100-80gb")
SMALL = ModelConfig(num_layers=4, hidden_size=256, num_attention_heads=8, num_query_groups=4, ffn_hidden_size=512,
                    swiglu=True, normalization="RMSNorm", position_embedding_type="rope", add_bias_linear=False,
                    max_position_embeddings=512)


def small_work(**kw) -> Workload:
    return Workload(**{"model": SMALL, "padded_vocab": 1024, "seq_length": 512, "global_batch": 16,
                       "gpus_per_node": 8, **kw})


# ---------------------------------------------------------------------------------------------
# Validation 2: the published layouts on paper (README "Choosing a layout")

# Published layouts the planner ranks below 3rd, and how much slower than its best it predicts them (README).
NEAR_MISSES = {"GPT 18.4B": 0.12, "GPT 39.1B": 0.12, "GPT-3 174.6B": 0.1}
NARAYANAN, MEGATRON_H100 = PUBLISHED


@pytest.mark.parametrize("run", NARAYANAN.runs, ids=lambda r: r.name)
def test_published_layout_ranks_near_the_top_with_its_mfu(run):
    result, published, rank = plan_published(NARAYANAN, run)
    assert published.mfu == pytest.approx(run.published_mfu, rel=0.25)
    if run.name in NEAR_MISSES:
        assert rank > 3 and published.step_s <= (1 + NEAR_MISSES[run.name]) * result.ranked[0].step_s
    else:
        assert rank <= 3


# Megatron-LM's H100 runs whose published layout the planner ranks 4th: GPT 70B's tp8 pp2 dp48 is predicted
# 0.04% slower than the 3rd shape and 0.4% slower than the 2nd; megaclm's best there, pp1 with the gradient
# reduction overlapped (DeepSpeed turns overlap_comm off in a pipeline), 14% faster (README).
H100_NEAR_MISSES = {"GPT 70B": 0.16}


@pytest.mark.parametrize("run", MEGATRON_H100.runs, ids=lambda r: r.name)
def test_megatron_h100_layout_near_the_top_with_its_mfu(run):
    """Megatron hides its TP traffic (--tp-comm-overlap) and, in pipelines too, its DP traffic; megaclm overlaps
    the DP gradient reduction outside pipelines only (--overlap-grad-reduce). Within 25% all the same, and the
    published MFU stays below the same step with TP and DP traffic hidden."""
    result, published, rank = plan_published(MEGATRON_H100, run)
    if run.name in H100_NEAR_MISSES:
        assert rank == 4 and published.step_s <= (1 + H100_NEAR_MISSES[run.name]) * result.ranked[0].step_s
    else:
        assert rank <= 3
    assert published.mfu == pytest.approx(run.published_mfu, rel=0.25)
    assert run.published_mfu < hidden_comm_mfu(published)
    assert published.layout.overlap_grad == (run.pp == 1)  # Megatron's recipe overlaps; DeepSpeed's pipeline not


# BigScience's measured sweep (README "Choosing a layout"): 17 layouts of a 181B GPT on 384 A100s that ran, 3 that
# ran out of memory, under DeepSpeed's pipeline engine and ZeRO-1, almost certainly with CUDA_LAUNCH_BLOCKING=1.


def test_bigscience_sweep_fits_what_ran_and_refuses_what_ran_out_of_memory():
    hw = jean_zay_a100()
    budget = hw.hbm_gib * (1 - MEMORY_MARGIN)
    fits = {(r.tp, r.pp, r.dp, r.micro_batch): plan_sweep_run(r, hw).memory_gib <= budget for r in BIGSCIENCE_SWEEP}
    assert fits == {(r.tp, r.pp, r.dp, r.micro_batch): r.seconds is not None for r in BIGSCIENCE_SWEEP}


def test_bigscience_sweep_ranks_once_the_blocking_launches_are_counted():
    """As shipped (asynchronous launches) the planner does not rank the sweep; with the host's time per operation
    on the critical path, as CUDA_LAUNCH_BLOCKING=1 puts it (one fitted constant), it does, and its fastest layout
    is a TP 4 one measured within 2% of the fastest (TP 4 PP 12: BLOOM's layout), ahead of every TP 8 layout."""
    hw = jean_zay_a100()
    blocking = dataclasses.replace(hw, op_overhead_us=fit_op_overhead(hw))
    assert sweep_spearman(hw) < 0.2 and sweep_spearman(blocking) >= 0.6
    assert 100 <= blocking.op_overhead_us <= 400  # tens of times an asynchronous launch's ~5 us
    ran = [r for r in BIGSCIENCE_SWEEP if r.seconds]
    tokens = {r: r.tokens_per_s_per_gpu for r in ran}
    best = max(ran, key=lambda r: plan_sweep_run(r, blocking).tokens_per_s_per_gpu)
    assert best.tp == 4 and tokens[best] >= 0.98 * max(tokens.values())
    assert max(t for r, t in tokens.items() if r.tp == 4) > max(t for r, t in tokens.items() if r.tp == 8)


def test_spearman():
    assert spearman([1, 2, 3, 4], [10, 20, 30, 40]) == 1
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == -1
    assert spearman([1, 2, 3], [1, 3, 2]) == pytest.approx(0.5)


# ---------------------------------------------------------------------------------------------
# The cost model's rules


def test_memory_is_megaclms_estimate():
    layout = Layout(tp=2, sp=True, pp=2, dp=2, zero=1, recompute="selective", micro_batch=2)
    work = small_work()
    expected = estimate_memory(layout.model(SMALL), 1024, memory_setup(layout, work)).gpu_total / GiB
    assert predict(layout, work, A100).memory_gib == pytest.approx(expected)


def test_links_follow_megaclms_rank_order():
    # tp fastest: 8 ranks at stride 1 fill an 8-GPU node; 6 do not divide it (a group straddles two nodes).
    assert link_for(1, 8, 8, A100) is A100.intra_node and link_for(1, 6, 8, A100) is A100.inter_node
    assert link_for(4, 2, 8, A100) is A100.intra_node and link_for(4, 4, 8, A100) is A100.inter_node
    assert link_for(64, 1, 8, A100) is A100.intra_node  # a group of one rank sends nothing


def test_pipeline_bubble_is_p_minus_1_over_m_plus_p_minus_1():
    work = small_work()
    for pp, mb in ((2, 1), (4, 1), (4, 4)):
        pred = predict(Layout(pp=pp, dp=1, zero=0, micro_batch=mb), work, A100)
        m = work.global_batch // mb
        pipeline = sum(v for k, v in pred.breakdown.items() if k not in ("data comm", "optimizer"))
        assert pred.breakdown["pipeline bubble"] / pipeline == pytest.approx((pp - 1) / (m + pp - 1))


def test_recompute_adds_a_forward():
    work = small_work()
    base = predict(Layout(dp=8, zero=0), work, A100).breakdown
    full = predict(Layout(dp=8, zero=0, recompute="full"), work, A100).breakdown
    sel = predict(Layout(dp=8, zero=0, recompute="selective"), work, A100).breakdown
    assert full["recompute"] == pytest.approx((base["matmul"] + base["memory-bound"]) / 3 + base["attention"] / 3)
    assert sel["recompute"] == pytest.approx(base["attention"] / 3)


def test_full_recompute_repeats_the_forwards_collectives_and_ops():
    """Megatron's full recomputation reruns each layer's forward in backward, its TP all-reduces and kernels too:
    no SP, 2 + 2 all-reduces per layer become 3 x 2; each forward launches OPS_PER_LAYER, backward twice that."""
    work = small_work()
    base = predict(Layout(tp=2, dp=4, zero=0), work, A100).breakdown
    full = predict(Layout(tp=2, dp=4, zero=0, recompute="full"), work, A100).breakdown
    X = 512 * SMALL.hidden_size * 2  # one micro-batch's activation, bf16
    per_call = A100.intra_node.seconds(2 * (2 - 1) / 2 * X, 1)  # an all-reduce of X over tp 2
    m = work.global_batch // 4  # micro-batches per rank (dp 4, micro batch 1)
    layers_calls = 4 * SMALL.num_layers * m
    ends = 2 * m * per_call + m * A100.intra_node.seconds(3 * 512 * 4, 3)  # embedding, head; the cross-entropy's
    assert base["tensor comm"] == pytest.approx(layers_calls * per_call + ends)
    assert full["tensor comm"] == pytest.approx(1.5 * layers_calls * per_call + ends)  # the 2 forward ones again
    assert full["op overhead"] == pytest.approx(4 / 3 * base["op overhead"])
    assert base["op overhead"] == pytest.approx(
        3 * OPS_PER_LAYER * SMALL.num_layers * 4 * A100.op_overhead_us * 1e-6)


def test_op_overhead_favours_fewer_larger_micro_batches():
    """A fixed cost per kernel is paid per micro-batch: the same batch in fewer micro-batches pays it less often
    (Narayanan et al. 2021 section 3.4's trade-off against the pipeline bubble)."""
    work = small_work()
    small, large = (predict(Layout(dp=2, zero=0, micro_batch=mb), work, A100).breakdown for mb in (1, 8))
    assert small["op overhead"] == pytest.approx(8 * large["op overhead"]) and large["op overhead"] > 0
    assert small["matmul"] == pytest.approx(large["matmul"])


def test_overlap_rules_per_zero_stage():
    """Below ZeRO-3 the gradient reduction is exposed (DeepSpeed's overlap_comm default); ZeRO-3's is hidden
    under the compute when shorter; --overlap-grad-reduce hides ZeRO-1/2's reduce-scatter the same way, not the
    all-gather of the updated parameters."""
    slow = dataclasses.replace(A100, intra_node=dataclasses.replace(A100.intra_node, gbps=0.001))
    work = small_work(gpus_per_node=8)  # dp 8, micro batch 1: 2 micro-batches per rank
    zero0, zero1, zero3 = (predict(Layout(dp=8, zero=z), work, A100).breakdown["data comm"] for z in (0, 1, 3))
    # ZeRO-1's reduce-scatter + all-gather move the all-reduce's bytes in one more call.
    assert zero0 > 0 and zero1 == pytest.approx(zero0 + A100.intra_node.latency_us * 1e-6) and zero3 == 0.0
    assert predict(Layout(dp=8, zero=3), work, slow).breakdown["zero-3 gathers"] > 0  # longer than the compute
    zero2 = predict(Layout(dp=8, zero=2), work, A100).breakdown["data comm"]
    assert zero2 == pytest.approx(3 / 2 * zero1)  # a reduce-scatter in each of 2 backwards, one all-gather
    for z in (1, 2):
        hidden = predict(Layout(dp=8, zero=z, overlap_grad=True), work, A100).breakdown["data comm"]
        assert hidden == pytest.approx(zero1 / 2)  # the all-gather alone
        cpu_like = dataclasses.replace(A100, overlap=0.25)
        exposed = predict(Layout(dp=8, zero=z, overlap_grad=True), work, cpu_like).breakdown["data comm"]
        assert exposed == pytest.approx(zero1 / 2 + (z if z == 1 else 2) * 0.75 * zero1 / 2)


def test_overlap_grad_is_searched_where_deepspeed_runs_it_and_costs_a_bucket():
    """--overlap-grad-reduce takes effect at ZeRO-1/2 without a pipeline, so only there is it a choice; it
    double-buffers the 5e8-element reduce bucket (953 MiB in bf16)."""
    work = small_work(global_batch=8)
    result = search(8, work, A100, SearchSpace(), KernelsConfig())
    overlapped = [p.layout for p in result.ranked if p.layout.overlap_grad]
    assert overlapped and all(x.zero in (1, 2) and x.pp == 1 and x.dp * x.seq > 1 for x in overlapped)
    plain = next(p for p in result.ranked if p.layout.zero == 1 and not p.layout.overlap_grad and p.layout.pp == 1)
    twin = predict(dataclasses.replace(plain.layout, overlap_grad=True), work, A100)
    assert twin.memory_gib - plain.memory_gib == pytest.approx(500_000_000 * 2 / GiB)
    assert twin.step_s < plain.step_s


def test_zero3_shows_what_the_hardware_cannot_overlap_and_its_hooks():
    """A CPU's gloo shares the cores with the compute (overlap 0): ZeRO-3's reduce-scatter and gathers then all
    show, each micro-batch; its module hooks cost zero3_layer_us per layer and micro-batch."""
    work = small_work(gpus_per_node=8)  # dp 8, micro batch 1: 2 micro-batches per rank
    layout = Layout(dp=8, zero=3)
    hidden = predict(layout, work, A100).breakdown
    cpu_like = dataclasses.replace(A100, overlap=0.0, zero3_layer_us=500.0)
    shown = predict(layout, work, cpu_like).breakdown
    assert hidden["data comm"] == 0.0 and hidden["zero-3 hooks"] == 0.0
    assert shown["data comm"] > 0 and shown["zero-3 gathers"] > 2 * shown["data comm"]  # more calls, same bytes
    # On the A100 the gathers' latencies outlast this tiny model's compute; the compute's length hides under it.
    assert shown["zero-3 gathers"] - hidden["zero-3 gathers"] == pytest.approx(
        hidden["matmul"] + hidden["attention"] + hidden["memory-bound"] + hidden["recompute"], rel=1e-6)
    assert shown["zero-3 hooks"] == pytest.approx(2 * SMALL.num_layers * 500e-6)
    half = predict(layout, work, dataclasses.replace(cpu_like, overlap=0.5)).breakdown
    assert half["data comm"] == pytest.approx(shown["data comm"] / 2)  # all shorter than the compute: half hidden


def test_measured_size_curves_time_each_call_by_its_size():
    """gloo's mid-size messages cost more than bandwidth + empty-call latency: a profile's measured curve is read
    per call (interpolated, flat below its first point, its last segment extended above its last)."""
    link = dataclasses.replace(A100.intra_node, sizes={"all_reduce": ((1e3, 1e-3), (1e6, 2e-3), (2e6, 4e-3)),
                                                       "gather": ((1e3, 5e-3), (1e6, 6e-3))})
    assert link.seconds(3 * 10, 3) == pytest.approx(3e-3)  # 10 bytes per call: the first point's time
    assert link.seconds(2 * 0.5005e6, 2) == pytest.approx(2 * 1.5e-3)  # halfway between the first two points
    assert link.seconds(3e6, 1) == pytest.approx(6e-3)  # beyond the last: its segment's 1 ms per MB
    assert link.seconds(1e6, 1, gather=True) == pytest.approx(6e-3)
    tree = json.loads(json.dumps(dataclasses.replace(A100, intra_node=link).to_dict()))
    assert profile_from_dict(tree, "round trip").intra_node.sizes == link.sizes
    no_curve = dataclasses.replace(A100.intra_node, sizes={"gather": ((1e3, 5e-3), (1e6, 6e-3))})
    assert no_curve.seconds(1e6, 2) == pytest.approx(A100.intra_node.seconds(1e6, 2))  # all-reduce: gbps + latency


# ---------------------------------------------------------------------------------------------
# The search: megaclm's own checks decide what is a layout


def test_refusals_are_megaclms_own_messages():
    work = small_work()
    assert "needs zero.zero_stage 0 or 1" in refusal(Layout(pp=2, dp=4, zero=2), work, KernelsConfig())
    assert "not divisible by parallel.ds_sequence_parallel_size" in refusal(
        Layout(tp=2, seq=4, dp=1, zero=0), work, KernelsConfig())  # 4 kv heads / tp 2 = 2 per rank
    assert refusal(Layout(tp=2, pp=2, dp=2, zero=1), work, KernelsConfig()) is None


def test_every_ranked_layout_parses_as_pretrain_gpt_would_and_fits():
    work = small_work(global_batch=8)
    result = search(8, work, A100, SearchSpace(), KernelsConfig())
    assert result.considered == len(result.ranked) + sum(result.refused.values()) + result.too_big
    assert result.ranked and sum(result.refused.values()) > 0
    steps = [p.step_s for p in result.ranked]
    assert steps == sorted(steps) and all(p.memory_gib <= 0.9 * A100.hbm_gib for p in result.ranked)
    kinds = {(p.layout.tp > 1, p.layout.pp > 1, p.layout.seq > 1, p.layout.zero) for p in result.ranked}
    assert len(kinds) > 8  # every axis was explored
    for p in result.ranked[::7]:
        x = p.layout
        argv = ["--num-layers", "4", "--hidden-size", "256", "--num-attention-heads", "8", "--num-query-groups",
                "4", "--ffn-hidden-size", "512", "--max-position-embeddings", "512", "--seq-length", "512",
                "--tensor-model-parallel-size", str(x.tp), "--pipeline-model-parallel-size", str(x.pp),
                "--ds-sequence-parallel-size" if not x.ring else "--context-parallel-size", str(x.seq),
                "--zero-stage", str(x.zero), "--micro-batch-size", str(x.micro_batch), "--global-batch-size", "8",
                "--mock-data", "--tokenizer-type", "NullTokenizer", "--vocab-size", "1000", "--train-iters", "1"]
        cfg, derived, _ = parse_args(argv + (["--sequence-parallel"] if x.sp else []), world_size=8)
        assert derived.data_parallel_size == x.dp


def test_memory_margin_drops_what_does_not_fit():
    tight = dataclasses.replace(A100, hbm_gib=0.05)
    result = search(8, small_work(global_batch=8), tight, SearchSpace(zero=(0, 3), recompute=("none", "full")),
                    KernelsConfig())
    assert result.too_big > 0 and all(p.memory_gib <= 0.9 * 0.05 for p in result.ranked)
    with pytest.raises(UserError, match="--memory-margin 1.5"):
        search(8, small_work(), A100, SearchSpace(), KernelsConfig(), margin=1.5)


# ---------------------------------------------------------------------------------------------
# Hardware profiles


def test_shipped_profiles_load_and_cite_their_sources():
    assert shipped_profiles() == ["a100-80gb", "h100-80gb", "h200-141gb"]
    for name in shipped_profiles():
        p = load_profile(name)
        assert p.peak_flops("bf16") > 0 and p.intra_node.gbps > p.inter_node.gbps
    assert load_profile("h200-141gb").hbm_gib == 141 and load_profile("h100-80gb").peak_tflops["bf16"] == 989.4


def test_fp32_plans_use_the_fp32_rate_because_megaclm_leaves_tf32_off():
    """An fp32 run's matmuls run at the datasheets' FP32 rate, not TF32's 8x: megaclm never enables TF32
    (PyTorch's default, float32 matmul precision 'highest', survives importing the trainer)."""
    import torch
    import megaclm.training.pretrain  # noqa: F401  (whatever it imports must leave the precision alone)
    assert torch.get_float32_matmul_precision() == "highest"
    assert {n: load_profile(n).peak_tflops["fp32"] for n in shipped_profiles()} == {
        "a100-80gb": 19.5, "h100-80gb": 66.9, "h200-141gb": 66.9}


@pytest.mark.parametrize("change,message", [
    (lambda t: t.pop("links"), "missing links"),
    (lambda t: t["achievable"].update(matmul=1.5), "achievable.matmul=1.5 must be a fraction"),
    (lambda t: t["links"]["inter_node"].update(gbps=0), "links.inter_node: gbps must be a number > 0"),
    (lambda t: t.update(peak_tflops={}), "peak_tflops must map a dtype"),
    (lambda t: t.update(op_overhead_us=-1), "op_overhead_us must be a number >= 0, got -1"),
    (lambda t: t.update(overlap=1.5), "overlap=1.5 must be a fraction in \\[0, 1\\]"),
    (lambda t: t.update(zero3_layer_us="x"), "zero3_layer_us must be a number >= 0"),
    (lambda t: t["links"]["intra_node"].update(sizes={"all_reduce": [[1, 2e-3], [2, 1e-3]]}),
     "links.intra_node: sizes.all_reduce must be >= 2 .* seconds non-decreasing"),
    (lambda t: t["links"]["intra_node"].update(sizes={"all_reduce": [[2, 1e-3], [1, 2e-3]]}), "bytes increasing"),
    (lambda t: t["links"]["intra_node"].update(sizes={"p2p": [[1, 1e-3], [2, 2e-3]]}),
     "sizes must map all_reduce / gather"),
])
def test_bad_profiles_are_one_clear_error(tmp_path, change, message):
    tree = json.loads(json.dumps(load_profile("h100-80gb").to_dict()))
    change(tree)
    path = tmp_path / "p.json"
    path.write_text(json.dumps(tree))
    with pytest.raises(UserError, match=message):
        load_profile(str(path))


def test_profile_without_the_newer_fields_models_none(tmp_path):
    tree = load_profile("a100-80gb").to_dict()
    assert tree.pop("op_overhead_us") > 0
    del tree["overlap"], tree["zero3_layer_us"]
    older = profile_from_dict(tree, "older profile")
    assert older.op_overhead_us == 0.0 and older.overlap == 1.0 and older.zero3_layer_us == 0.0


def test_unknown_or_unreadable_profile(tmp_path):
    with pytest.raises(UserError, match="unknown GPU; choose one of a100-80gb, h100-80gb, h200-141gb"):
        load_profile("v100")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(UserError, match="cannot read it as JSON"):
        load_profile(str(tmp_path / "bad.json"))
    with pytest.raises(UserError, match="no peak_tflops for 'fp8'"):
        profile_from_dict(load_profile("a100-80gb").to_dict(), "x").peak_flops("fp8")


def test_preset_model_plans():
    work = Workload(model=model_preset("llama-7b"), padded_vocab=32000, seq_length=4096, global_batch=64,
                    gpus_per_node=8)
    result = search(8, work, load_profile("h100-80gb"), SearchSpace(recompute=("full",), micro_batch=(1,)),
                    KernelsConfig())
    best = result.ranked[0]
    assert 0.2 < best.mfu < 0.8 and best.bottleneck == "matmul"
