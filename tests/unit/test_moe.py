"""megaclm.model.moe in one process: routing against direct computations (top-k orders, aux and z losses,
capacity dropping), the layer against a per-token reference, the router loss in GPTModel's loss (also
through full recomputation), config and layout errors, expert-parallel rank math."""
import math
import types

import pytest
import torch

from megaclm.config.model import ModelConfig, check_parallel_shapes
from megaclm.config.parallel import ParallelConfig
from megaclm.model.gpt import GPTModel
from megaclm.model.moe import MoE, route
from megaclm.model.pipe import GPTPipelineModule, _RouterGradient, stages_without_moe
from megaclm.ops import build_ops
from megaclm.config.kernels import KernelsConfig
from megaclm.parallel.state import ParallelState
from megaclm.utils.errors import UserError

MOE = dict(num_layers=2, hidden_size=32, num_attention_heads=4, max_position_embeddings=32, hidden_dropout=0.0,
           attention_dropout=0.0, position_embedding_type="rope", normalization="RMSNorm", swiglu=True,
           ffn_hidden_size=48, add_bias_linear=False, untie_embeddings_and_output_weights=True, num_experts=4,
           moe_router_topk=2, moe_ffn_hidden_size=24)


def test_aux_and_z_loss_equal_a_direct_computation():
    torch.manual_seed(0)
    N, E, k = 10, 4, 2
    logits = torch.randn(N, E)
    r = route(logits, k)
    probs = torch.softmax(logits, dim=-1)
    chosen = [set(torch.topk(logits[t], k).indices.tolist()) for t in range(N)]
    aux = 0.0
    for e in range(E):
        f_e = sum(e in c for c in chosen) / (N * k)  # fraction of the N*k assignments
        p_e = sum(probs[t, e].item() for t in range(N)) / N
        aux += f_e * p_e
    assert r.aux_loss.item() == pytest.approx(E * aux, rel=1e-6)
    z = sum(math.log(sum(math.exp(v) for v in logits[t].tolist())) ** 2 for t in range(N)) / N
    assert r.z_loss.item() == pytest.approx(z, rel=1e-6)
    # Perfectly balanced routing with uniform probabilities gives exactly 1.
    assert route(torch.zeros(8, 4), 1).aux_loss.item() == pytest.approx(1.0)


@pytest.mark.parametrize("k", [1, 2, 3])
def test_topk_orders(k):
    torch.manual_seed(1)
    logits = torch.randn(6, 5)
    probs = torch.softmax(logits, dim=-1)
    for pre_softmax in (False, True):
        r = route(logits, k, pre_softmax=pre_softmax)
        assert r.counts.tolist() == torch.zeros(5, dtype=torch.long).scatter_add(
            0, logits.topk(k).indices.flatten(), torch.ones(6 * k, dtype=torch.long)).tolist()
        for t in range(6):
            top = logits[t].topk(k).indices
            mine = r.weight[r.token == t]
            want = probs[t, top] / probs[t, top].sum() if not pre_softmax else probs[t, top]  # Mixtral / Qwen
            assert sorted(mine.tolist()) == pytest.approx(sorted(want.tolist()), rel=1e-6)


def test_capacity_drops_exactly_the_expected_tokens():
    # 6 tokens, 2 experts, top-1, factor 1: capacity ceil(6 * 1 / 2) = 3. Tokens 0-4 choose expert 0.
    logits = torch.tensor([[2.0, 0], [5, 0], [1, 0], [4, 0], [3, 0], [0, 1]])
    by_probs = route(logits, 1, pre_softmax=True, capacity_factor=1.0, drop_policy="probs")
    kept0 = by_probs.token[:by_probs.counts[0]].tolist()
    assert kept0 == [1, 3, 4]  # the three highest router weights; 0 and 2 are dropped
    assert by_probs.token[by_probs.counts[0]:].tolist() == [5]
    by_position = route(logits, 1, pre_softmax=True, capacity_factor=1.0, drop_policy="position")
    assert by_position.token[:by_position.counts[0]].tolist() == [0, 1, 2]  # the earliest; 3 and 4 dropped
    # The load-balancing loss counts assignments before dropping.
    assert by_probs.aux_loss.item() == pytest.approx(route(logits, 1, pre_softmax=True).aux_loss.item())


def _moe_layer(**overrides):
    config = ModelConfig(**{**MOE, **overrides})
    torch.manual_seed(3)
    return config, MoE(config, ParallelState.single(), build_ops(KernelsConfig()), shared=None)


@pytest.mark.parametrize("k,pre_softmax,capacity", [(1, True, None), (2, False, None), (2, False, 0.5)])
def test_layer_equals_a_per_token_reference(k, pre_softmax, capacity):
    config, moe = _moe_layer(moe_router_topk=k, moe_router_pre_softmax=pre_softmax,
                             moe_expert_capacity_factor=capacity)
    x = torch.randn(2, 5, config.hidden_size)
    y, _ = moe(x)
    flat = x.reshape(-1, config.hidden_size)
    w1 = [e.fc1 for e in moe.deepspeed_moe.experts.deepspeed_experts]
    w2 = [e.fc2 for e in moe.deepspeed_moe.experts.deepspeed_experts]
    r = route(flat @ moe.router.weight.t(), k, pre_softmax, capacity)
    want = torch.zeros_like(flat)
    for token, weight, e in zip(r.token.tolist(), r.weight,
                                torch.repeat_interleave(torch.arange(config.num_experts), r.counts).tolist()):
        gate, up = (w1[e] @ flat[token]).chunk(2)
        want[token] += weight * (w2[e] @ (torch.nn.functional.silu(gate) * up))
    torch.testing.assert_close(y.reshape(-1, config.hidden_size), want, rtol=1e-5, atol=1e-6)
    if capacity is not None:
        assert r.counts.sum() < flat.shape[0] * k  # something was dropped


def test_router_losses_enter_the_training_loss_only():
    ids = torch.randint(0, 100, (2, 8), generator=torch.Generator().manual_seed(0))
    losses = {}
    for coeff in (0.0, 0.5):
        torch.manual_seed(0)
        model = GPTModel(ModelConfig(**MOE, moe_aux_loss_coeff=coeff, moe_z_loss_coeff=coeff / 10), 128)
        losses[coeff] = model(ids, labels=ids)
        stats = model.moe_stats
        model.eval()
        losses[coeff, "eval"] = model(ids, labels=ids)
    added = 0.5 * stats["moe_aux_loss"] * 2 + 0.05 * stats["moe_z_loss"] * 2  # two MoE layers, stats averaged
    assert stats["router_loss"].item() == pytest.approx(added.item(), rel=1e-5)
    torch.testing.assert_close(losses[0.5] - losses[0.0], stats["router_loss"].expand(2, 8))
    torch.testing.assert_close(losses[0.5, "eval"], losses[0.0, "eval"])


def test_router_loss_gradient_survives_full_recomputation():
    ids = torch.randint(0, 100, (2, 8), generator=torch.Generator().manual_seed(1))
    grads = []
    for recompute in (None, "full"):
        torch.manual_seed(0)
        model = GPTModel(ModelConfig(**MOE, moe_aux_loss_coeff=1.0, moe_z_loss_coeff=0.1, moe_layer_freq=2,
                                     recompute_granularity=recompute), 128)
        model(ids, labels=ids).mean().backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    assert "layers.1.mlp.fc1.weight" in grads[0] and "layers.0.mlp.router.weight" in grads[0]  # freq 2
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], rtol=0, atol=0)


@pytest.mark.parametrize("overrides,msg", [
    (dict(moe_router_topk=5), "moe_router_topk"),
    (dict(moe_expert_capacity_factor=0.0), "moe_expert_capacity_factor"),
    (dict(moe_shared_expert_gate=True), "needs model.moe_shared_expert_intermediate_size"),
    (dict(moe_token_drop_policy="random"), "moe_token_drop_policy"),
    (dict(moe_aux_loss_coeff=-1.0), "moe_aux_loss_coeff"),
])
def test_config_errors(overrides, msg):
    with pytest.raises(UserError, match=msg):
        ModelConfig(**{**MOE, **overrides})


def test_layout_errors():
    config = ModelConfig(**MOE)
    with pytest.raises(UserError, match="num_experts=4 is not divisible by parallel.expert_model_parallel_size=3"):
        check_parallel_shapes(config, ParallelConfig(expert_model_parallel_size=3))
    check_parallel_shapes(config, ParallelConfig(pipeline_model_parallel_size=2))  # MoE pipelines (megaclm.model.pipe)
    with pytest.raises(UserError, match="needs a Mixture-of-Experts model"):
        check_parallel_shapes(ModelConfig(**{**MOE, "num_experts": None}), ParallelConfig(expert_model_parallel_size=2))
    with pytest.raises(UserError, match="divide the data-parallel size"):
        ParallelState(4, 0, tensor_parallel_size=2, expert_parallel_size=4)


def test_expert_parallel_groups_split_each_data_parallel_group():
    # world 8, tp 2, ep 2 (dp 4): dp groups [0,2,4,6] [1,3,5,7] -> ep groups [0,2] [4,6] [1,3] [5,7]
    groups = {r: ParallelState(8, r, tensor_parallel_size=2, expert_parallel_size=2).ep_group_ranks for r in range(8)}
    assert groups == {0: [0, 2], 2: [0, 2], 4: [4, 6], 6: [4, 6], 1: [1, 3], 3: [1, 3], 5: [5, 7], 7: [5, 7]}
    assert [ParallelState(8, r, 2, expert_parallel_size=2).ep_rank for r in range(8)] == [0, 0, 1, 1, 0, 0, 1, 1]
    # ...and the ranks holding the same experts: [0,4] [2,6] [1,5] [3,7]
    assert [ParallelState(8, r, 2, expert_parallel_size=2).edp_group_ranks for r in (0, 2, 1, 3)] == [
        [0, 4], [2, 6], [1, 5], [3, 7]]
    # pipeline stages: within each stage (world 4, pp 2, ep 2 -> dp 2)
    assert [ParallelState(4, r, pipeline_parallel_size=2, expert_parallel_size=2).ep_group_ranks for r in range(4)] == [
        [0, 1], [0, 1], [2, 3], [2, 3]]


def test_sequence_ranks_are_data_parallel_ranks_to_the_experts():
    # world 4, Ulysses 2, ep 2 (dp 2): seq groups [0,1] [2,3] exchange tokens; [0,2] [1,3] hold the same experts
    states = [ParallelState(4, r, ulysses_size=2, expert_parallel_size=2) for r in range(4)]
    assert [s.ep_group_ranks for s in states] == [s.cp_group_ranks for s in states] == [[0, 1], [0, 1], [2, 3], [2, 3]]
    assert [s.edp_group_ranks for s in states] == [[0, 2], [1, 3], [0, 2], [1, 3]]
    # ring 2, dp 1, ep 2 on 2 ranks: the experts split across the two halves of each sample
    assert [ParallelState(2, r, context_parallel_size=2, expert_parallel_size=2).ep_rank for r in (0, 1)] == [0, 1]
    with pytest.raises(UserError, match="divide the data-parallel size 1 x the sequence split 2"):
        ParallelState(4, 0, tensor_parallel_size=2, ulysses_size=2, expert_parallel_size=4)


@pytest.mark.parametrize("world,tp,pp,ep,seq", [(8, 2, 1, 2, 1), (8, 1, 1, 4, 1), (16, 2, 2, 2, 1), (16, 1, 2, 8, 1),
                                                (12, 3, 1, 2, 1), (32, 2, 2, 4, 1), (6, 1, 1, 1, 1), (24, 2, 3, 4, 1),
                                                (4, 1, 1, 2, 2), (8, 2, 1, 2, 2), (16, 2, 2, 4, 2), (16, 1, 1, 2, 4)])
def test_expert_groups_are_deepspeeds_layout(world, tp, pp, ep, seq):
    """DeepSpeed's engine reduces expert gradients over its own groups: megaclm's rank math must give them
    (its data axis is world / (tp x pp): sequence ranks included)."""
    from deepspeed.utils.groups import _get_expert_parallel_ranks

    ds_ep, ds_edp = _get_expert_parallel_ranks(world, tp, ep, pp)
    for r in range(world):
        state = ParallelState(world, r, tensor_parallel_size=tp, pipeline_parallel_size=pp, ulysses_size=seq,
                              expert_parallel_size=ep)
        assert state.ep_group_ranks == next(g for g in ds_ep if r in g), r
        assert state.edp_group_ranks == next(g for g in ds_edp if r in g), r
        assert state.ep_group_ranks.index(r) == state.ep_rank and state.edp_group_ranks.index(r) == state.edp_rank


def test_expert_ids_renumber_per_expert_parallel_rank():
    from megaclm.model.sharding import globalize_experts, localize_experts, shard_state_dict

    config = ModelConfig(**MOE)
    torch.manual_seed(0)
    full = GPTModel(config, 128).state_dict()
    for ep in (2, 4):
        merged = {}
        for rank in range(ep):
            local = shard_state_dict(full, config, 1, 0, ep, rank)
            torch.manual_seed(0)
            module = GPTModel(config, 128, ParallelState(ep, rank, expert_parallel_size=ep))
            assert local.keys() == module.state_dict().keys()  # what that rank's module loads
            assert localize_experts(full, 4, ep, rank).keys() == local.keys()
            merged.update(globalize_experts(local, 4, ep, rank))
            # Initialised per expert, whatever the EP size: the rank's module already holds these weights.
            for key, value in module.state_dict().items():
                torch.testing.assert_close(value, local[key], rtol=0, atol=0)
        assert merged.keys() == full.keys()
        for key in full:
            torch.testing.assert_close(merged[key], full[key], rtol=0, atol=0)


# Published: Mixtral-8x7B 46.7B total / 12.9B active; Qwen1.5-MoE-A2.7B 14.3B total / 2.7B active (model cards).
MOE_PUBLISHED = {"mixtral-8x7b": (46_702_792_704, 12.9e9), "qwen2-moe-a2.7b": (14_315_784_192, 2.7e9)}


@pytest.mark.parametrize("name", sorted(MOE_PUBLISHED))
def test_moe_presets_give_published_parameter_counts(name):
    from megaclm.config.presets import PRESET_VOCAB_SIZE, model_preset
    from megaclm.model.flops import count_parameters, flops_per_token

    config, vocab = model_preset(name), PRESET_VOCAB_SIZE[name]
    with torch.device("meta"):
        model = GPTModel(config, vocab)
    total, active = MOE_PUBLISHED[name]
    count = count_parameters(config, vocab)
    assert sum(p.numel() for p in model.parameters()) == count.total == total
    assert round(count.active / 1e8) * 1e8 == pytest.approx(active)
    experts = sum(p.numel() for n, p in model.named_parameters() if ".experts." in n)
    assert count.experts == experts
    # FLOPs count the active parameters: k of the E experts per token.
    k, E = config.moe_router_topk, config.num_experts
    assert count.active == count.total - experts * (E - k) // E
    assert count.flops_params == count.active - count.position_embeddings - count.output_layer  # no input lookup
    assert flops_per_token(config, vocab, 1) == pytest.approx(6 * count.flops_params + 12 * config.num_layers
                                                              * config.num_attention_heads * config.head_dim)


def test_moe_counts_equal_the_built_model_with_layer_freq_and_tp():
    from megaclm.model.flops import count_parameters, stage_parameters

    config = ModelConfig(**{**MOE, "num_layers": 3, "moe_layer_freq": 2, "moe_shared_expert_intermediate_size": 40,
                            "moe_shared_expert_gate": True})
    model = GPTModel(config, 128)
    count = count_parameters(config, 128)
    assert sum(p.numel() for p in model.parameters()) == count.total
    assert count.num_moe_layers == 2 and isinstance(model.layers[1].mlp, type(GPTModel(
        ModelConfig(**{**MOE, "num_experts": None}), 128).layers[0].mlp))
    # Under TP=2 the routed experts and router stay whole on each rank, the shared expert is split.
    state = ParallelState(2, 0, tensor_parallel_size=2)
    sharded = GPTModel(config, 128, state)
    assert stage_parameters(config, 128, tensor_parallel=2)[0].params == sum(p.numel() for p in sharded.parameters())


def test_memory_estimate_splits_experts_by_expert_parallel():
    from megaclm.model.flops import MemorySetup, estimate_memory, stage_parameters

    config = ModelConfig(**{**MOE, "num_layers": 3, "moe_layer_freq": 2})
    experts = sum(p.numel() for n, p in GPTModel(config, 128).named_parameters() if "deepspeed_experts" in n)
    for ep in (1, 2, 4):
        held = sum(p.numel() for p in GPTModel(config, 128, ParallelState(4, 0, expert_parallel_size=ep)).parameters())
        stage = stage_parameters(config, 128, expert_parallel=ep)[0]
        assert stage.params == held and stage.experts == experts // ep
    # fp32 ZeRO-1 over dp 4: weights and gradients are what a GPU holds; ZeRO shards the dense states over
    # the 4 dp ranks, the experts' over the 4/ep ranks holding them: the same 12 bytes per parameter / 4.
    one, two = (estimate_memory(config, 128, MemorySetup(seq_length=16, data_parallel=4, zero_stage=1,
                                                         precision="fp32", expert_parallel=ep)) for ep in (1, 2))
    assert one.gpu["weights"] - two.gpu["weights"] == 4 * experts // 2
    assert one.gpu["Adam moments"] == two.gpu["Adam moments"] == 8 * stage_parameters(config, 128)[0].params / 4
    # dp 2 x Ulysses 2: the same 4 replicas of the dense weights, 2 of each expert (EP over seq x dp ranks)
    split = estimate_memory(config, 128, MemorySetup(seq_length=16, data_parallel=2, seq_split=2, zero_stage=1,
                                                     precision="fp32", expert_parallel=2))
    assert split.gpu["Adam moments"] == two.gpu["Adam moments"] and split.gpu["weights"] == two.gpu["weights"]
    with pytest.raises(UserError, match="zero_stage 0-2"):
        estimate_memory(config, 128, MemorySetup(seq_length=16, zero_stage=3))
    with pytest.raises(UserError, match="must divide data_parallel=2 x seq_split=1"):
        MemorySetup(seq_length=16, data_parallel=2, expert_parallel=4)


def test_moe_with_zero3_is_refused_before_start():
    from megaclm.config import parse_args

    with pytest.raises(UserError, match="does not partition MoE layers' parameters under ZeRO-3"):
        parse_args(["--num-layers", "2", "--hidden-size", "32", "--num-attention-heads", "4", "--seq-length", "16",
                    "--max-position-embeddings", "16", "--num-experts", "4", "--zero-stage", "3", "--mock-data",
                    "--tokenizer-type", "NullTokenizer", "--vocab-size", "128", "--train-iters", "1",
                    "--micro-batch-size", "1"], world_size=1)


def test_checkpoints_with_stacked_experts_still_load(tmp_path):
    """megaclm before expert-parallel sharding saved each MoE layer's experts stacked (mlp.experts.fc1 (E, 2F, H))
    and no EP size: its files read as today's per-expert keys, and a resume takes megaclm's files."""
    import dataclasses
    import json

    from megaclm.checkpoint.deepspeed_ckpt import saved_layout
    from megaclm.checkpoint.offline import write_checkpoint
    from megaclm.checkpoint.shards import load_full_state_dict
    from megaclm.checkpoint.weights import shard_for
    from megaclm.model.sharding import expert_id

    config = ModelConfig(**MOE)
    torch.manual_seed(0)
    full = GPTModel(config, 128).state_dict()
    out = tmp_path / "old"
    tag = write_checkpoint(str(out), {"model": dataclasses.asdict(config)}, full, tp=1, pp=1)
    path = out / tag / "megaclm" / "model" / "tp00_pp000.pt"
    shard = torch.load(path, weights_only=False)
    legacy = {k: v for k, v in shard["tensors"].items() if expert_id(k) is None}
    for layer in range(config.num_layers):
        for w in ("fc1", "fc2"):
            legacy[f"layers.{layer}.mlp.experts.{w}"] = torch.stack(
                [full[f"layers.{layer}.mlp.deepspeed_moe.experts.deepspeed_experts.{e}.{w}"] for e in range(4)])
    torch.save({k: v for k, v in {**shard, "tensors": legacy}.items() if k not in ("ep_rank", "ep_size")}, path)
    meta = json.loads((out / tag / "megaclm" / "meta.json").read_text())
    assert "expert_model_parallel_size" not in meta
    back = load_full_state_dict(str(out)).state_dict
    assert back.keys() == full.keys() and all(torch.equal(back[k], full[k]) for k in full)
    module = GPTModel(config, 128, ParallelState(2, 1, expert_parallel_size=2))
    local = shard_for(module, str(out), tag)
    assert local.keys() == module.state_dict().keys()
    assert torch.equal(local["layers.0.mlp.deepspeed_moe.experts.deepspeed_experts.0.fc2"],
                       full["layers.0.mlp.deepspeed_moe.experts.deepspeed_experts.2.fc2"])
    # Its EP size is unknown, so it never passes for the run's own layout (whose DeepSpeed files it lacks).
    assert saved_layout(str(out), tag, meta)[4] is None
    dense = dataclasses.replace(config, num_experts=None)
    dense_dir = tmp_path / "dense"
    tag = write_checkpoint(str(dense_dir), {"model": dataclasses.asdict(dense)}, GPTModel(dense, 128).state_dict(),
                           tp=1, pp=1)
    assert saved_layout(str(dense_dir), tag, {})[4] == 1


def test_stages_without_moe_follow_deepspeeds_partition():
    # LayerSpec list: 0 embedding, 1..4 transformer layers 0..3, 5 final norm, 6 head
    config = ModelConfig(**{**MOE, "num_layers": 4, "moe_layer_freq": 2})  # MoE layers 0 and 2
    assert stages_without_moe(config, [0, 3, 7]) == []  # layers 0,1 | 2,3
    assert stages_without_moe(config, [0, 2, 7]) == []  # layer 0 | 1,2,3
    assert stages_without_moe(config, [0, 4, 7]) == [1]  # layers 0,1,2 | 3
    config = ModelConfig(**{**MOE, "num_layers": 4, "moe_layer_freq": 4})
    assert stages_without_moe(config, [0, 3, 7]) == [1]


def test_router_gradient_arrives_in_the_hidden_states_one_backward():
    """A pipeline stage as DeepSpeed's engine backpropagates it: one backward per float output, in tuple order
    (router leaf first), gives the stage's weights the gradient of one backward through (hidden, router)."""
    torch.manual_seed(0)
    w, x, a = torch.randn(4, requires_grad=True), torch.randn(2, 4), torch.randn(2, 4)
    coeff = torch.tensor([0.5, 0.0, 0.0])  # d loss / d router: router[0] joins the loss, [1:] are statistics

    def stage():
        h = torch.tanh(x * w)  # (2, 4) hidden
        router = torch.stack([(w ** 2).sum(), w.sum().detach(), w.mean().detach()])  # (3,)
        return h, router

    h, router = stage()
    ((h * a).sum() + (router * coeff).sum()).backward()
    expected, w.grad = w.grad.clone(), None

    h, router = stage()
    sent = router.detach().requires_grad_()
    out = _RouterGradient.apply(h, router, sent)
    sent.backward(coeff)  # DeepSpeed: the received gradient of each float output, in order
    out.backward(a)
    torch.testing.assert_close(w.grad, expected, rtol=0, atol=0)

    h, router = stage()
    sent = router.detach().requires_grad_()
    with pytest.raises(RuntimeError, match="had not arrived"):
        _RouterGradient.apply(h, router, sent).backward(a)


def test_pipe_loss_adds_the_router_loss_to_every_token():
    """The last stage's loss_fn on its (router, logits) output: GPTModel's cross-entropy, the router loss on
    every token, summed with the mask; the router statistics kept for DeepSpeed."""
    config = ModelConfig(**{**MOE, "num_layers": 4, "moe_layer_freq": 2})  # 2 MoE layers
    logits, labels = torch.randn(2, 3, 11), torch.randint(0, 11, (2, 3))
    mask = torch.tensor([[1.0, 0.0, 2.0], [0.5, 1.0, 1.0]])
    router = torch.tensor([0.25, 2.0, 3.0])
    stage = types.SimpleNamespace(config=config, pstate=ParallelState.single(), moe_stats=None)
    got = GPTPipelineModule.loss(stage, (router, logits), (labels, mask))
    ce = torch.nn.functional.cross_entropy(logits.view(-1, 11), labels.view(-1), reduction="none").view(2, 3)
    torch.testing.assert_close(got, ((ce + 0.25) * mask).sum())
    assert {k: v.item() for k, v in stage.moe_stats.items()} == {
        "router_loss": 0.25 * 5.5, "moe_aux_loss": 1.0, "moe_z_loss": 1.5}
