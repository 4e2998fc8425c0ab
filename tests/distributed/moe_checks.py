"""Mixture-of-Experts checks run inside spawned gloo ranks (tests/distributed/test_expert_parallel.py).

Each compares a parallel MoE model with the same weights in a simpler layout: EP=2 against EP=1 (each
rank its own batch; gradients summed over the ranks, as data parallelism does), TP=2 with SP against
the unsharded model, and DeepSpeed engines (ZeRO 0/1/2, built by megaclm's build_engine) trained for a
few steps at EP=2 and EP=1. At EP=2 each rank holds only its half of the experts.
"""
import dataclasses
import os
import shutil
import tempfile
from types import SimpleNamespace

import torch
import torch.distributed as dist
from deepspeed.moe.utils import is_moe_param

from megaclm.config.lora import LoraConfig
from megaclm.config.model import ModelConfig
from megaclm.model.gpt import GPTModel
from megaclm.model.moe import SeqSplit, route
from megaclm.model.sharding import (expert_id, globalize_experts, localize_experts, shard_state_dict,
                                    unshard_state_dicts)
from megaclm.parallel.context import sequence_index
from megaclm.parallel.state import ParallelState
from parallel_checks import B, T, VOCAB, batch, gather_shards, grads, max_diff

# Dropless, both router losses on, a gated shared expert, and MoE in every other layer.
MOE = ModelConfig(num_layers=3, hidden_size=32, num_attention_heads=4, max_position_embeddings=32,
                  hidden_dropout=0.0, attention_dropout=0.0, position_embedding_type="rope",
                  normalization="RMSNorm", swiglu=True, ffn_hidden_size=48, add_bias_linear=False,
                  untie_embeddings_and_output_weights=True, num_experts=4, moe_router_topk=2,
                  moe_ffn_hidden_size=24, moe_layer_freq=2, moe_aux_loss_coeff=0.1, moe_z_loss_coeff=0.01,
                  moe_shared_expert_intermediate_size=40, moe_shared_expert_gate=True)


def _model(pstate, config: ModelConfig = MOE, lora: LoraConfig | None = None):
    torch.manual_seed(1234)  # the same weights at any EP size: experts are drawn per expert id
    return GPTModel(config, VOCAB, pstate, lora=lora)


def _state(world_size: int, rank: int, **sizes) -> ParallelState:
    pstate = ParallelState(world_size, rank, experts=True, **sizes)
    pstate.init_process_groups()
    return pstate


def _summed(g: dict) -> dict:
    for t in g.values():
        dist.all_reduce(t)
    return g


def _global(tensors: dict, pstate: ParallelState) -> dict:
    return globalize_experts(tensors, MOE.num_experts, pstate.ep_size, pstate.ep_rank)


def check_ep2_equals_ep1(world_size: int, rank: int, recompute: bool = False) -> dict:
    """`recompute`: the EP model recomputes every layer in backward (its all-to-alls run again)."""
    ids, labels, weights, _, _ = batch(seed=10 + rank)  # data parallel: every rank its own tokens
    ref = _model(ParallelState.single())
    ref_loss = (ref(ids, labels=labels) * weights).sum()
    ref_loss.backward()
    want = _summed(grads(ref))  # what data parallelism reduces to: the sum over both ranks' tokens
    pstate = _state(world_size, rank, expert_parallel_size=world_size)
    model = _model(pstate, dataclasses.replace(MOE, recompute_granularity="full") if recompute else MOE)
    loss = (model(ids, labels=labels) * weights).sum()
    loss.backward()
    mine = grads(model)
    # Expert gradients are complete on their own rank (the all-to-all brought every rank's tokens to it);
    # the rest is summed over the ranks as DeepSpeed's data-parallel reduction does.
    dense = _summed({k: g for k, g in mine.items() if expert_id(k) is None})
    experts = _global({k: g for k, g in mine.items() if expert_id(k) is not None}, pstate)
    got = {**dense, **experts}
    return {"loss": loss.item(), "ref_loss": ref_loss.item(), "grads": max_diff(got, {k: want[k] for k in got}),
            "keys": len(mine), "ref_keys": len(want), "held_experts": sorted({expert_id(k) for k in experts}),
            "expert_params": sum(p.numel() for p in model.parameters() if is_moe_param(p)),
            "ref_expert_params": sum(p.numel() for p in ref.parameters() if is_moe_param(p))}


def check_tp2_sp(world_size: int, rank: int) -> dict:
    ids, labels, weights, _, _ = batch(seed=3)
    ref = _model(ParallelState.single())
    ref_loss = (ref(ids, labels=labels) * weights).sum()
    ref_loss.backward()
    pstate = _state(world_size, rank, tensor_parallel_size=world_size, sequence_parallel=True)
    model = _model(pstate)
    model.load_state_dict(shard_state_dict(ref.state_dict(), MOE, pstate.tp_size, pstate.tp_rank))
    loss = (model(ids, labels=labels) * weights).sum()
    loss.backward()
    full = unshard_state_dicts(gather_shards(grads(model), pstate), MOE)
    return {"loss": abs(loss.item() - ref_loss.item()), "grads": max_diff(full, grads(ref))}


def _engine(pstate, zero_stage: int, precision: str = "fp32", lora: LoraConfig | None = None):
    from megaclm.training.engine import build_engine

    model = _model(pstate, lora=lora)
    cfg = SimpleNamespace(optimizer=SimpleNamespace(weight_decay=0.01, decoupled_lr=None),
                          zero=SimpleNamespace(zero_stage=zero_stage), precision=SimpleNamespace(name=precision))
    # Clipping at 0.5 binds (the norms are ~1): the norm must count every expert once, on every rank.
    config = {"train_micro_batch_size_per_gpu": B, "gradient_accumulation_steps": 2,
              "train_batch_size": B * 2 * pstate.dp_size, "steps_per_print": 10**9, "gradient_clipping": 0.5,
              "zero_optimization": {"stage": zero_stage}, "bf16": {"enabled": precision == "bf16"},
              "optimizer": {"type": "AdamW", "params": {"lr": 1e-2, "betas": [0.9, 0.95], "eps": 1e-8,
                                                        "weight_decay": 0.01, "torch_adam": True}}}
    return build_engine(cfg, model, pstate, config)


def _train(pstate, zero_stage: int, steps: int, rank: int, precision: str = "fp32"):
    """-> (micro-batch losses, grad norm per step, parameters by global name) of a few steps."""
    engine = _engine(pstate, zero_stage, precision)
    losses, norms = [], []
    for step in range(steps):
        for micro in range(2):
            ids, labels, weights, _, _ = batch(seed=10 * micro + rank)  # the same batches: the loss must fall
            loss = (engine(ids, labels=labels) * weights).mean()
            engine.backward(loss)
            engine.step()
            losses.append(loss.item())
        norms.append(float(engine.get_global_grad_norm()))
    return losses, norms, _global({k: p.detach().clone() for k, p in engine.module.named_parameters()}, pstate)


def check_engines(world_size: int, rank: int) -> dict:
    import deepspeed

    if not deepspeed.comm.is_initialized():
        deepspeed.init_distributed(dist_backend="gloo")
    out = {}
    # bf16: ZeRO-0 is DeepSpeed's unfused 16-bit optimizer on CPU (with megaclm's norm), ZeRO-1 its
    # BF16_Optimizer, ZeRO-2 its ZeRO optimizer in bf16 (each with its own norm).
    for stage, precision in ((0, "fp32"), (1, "fp32"), (2, "fp32"), (0, "bf16"), (1, "bf16"), (2, "bf16")):
        results = {ep: _train(_state(world_size, rank, expert_parallel_size=ep), stage, 3, rank, precision)
                   for ep in (1, world_size)}
        (loss1, norm1, p1), (loss2, norm2, p2) = results[1], results[world_size]
        out[stage, precision] = {"losses_ep1": loss1, "losses_ep2": loss2, "norms_ep1": norm1, "norms_ep2": norm2,
                                 "params": max_diff({k: p1[k].float() for k in p2},
                                                    {k: v.float() for k, v in p2.items()}),
                                 "held": len(p2), "all": len(p1)}
    return out


def check_lora_engine(world_size: int, rank: int) -> dict:
    """LoRA on an MoE model at EP=2 (ZeRO-1 and 2): only the attention adapters train; each rank keeps its own
    frozen experts (the engine broadcasts them within the ranks holding the same ones)."""
    lora = LoraConfig(lora_rank=4, lora_target="qkv,proj")
    out = {}
    for stage in (1, 2):
        pstate = _state(world_size, rank, expert_parallel_size=world_size)
        engine = _engine(pstate, stage, lora=lora)
        before = {k: p.detach().clone() for k, p in engine.module.named_parameters()}
        for micro in range(4):
            ids, labels, weights, _, _ = batch(seed=10 * micro + rank)
            engine.backward((engine(ids, labels=labels) * weights).mean())
            engine.step()
        after = dict(engine.module.named_parameters())
        init = _global(_model(pstate, lora=lora).state_dict(), pstate)  # this rank's module, before the engine
        changed = sorted(k for k in before if not torch.equal(before[k], after[k].detach()))
        experts = _global({k: p.detach() for k, p in after.items() if expert_id(k) is not None}, pstate)
        out[stage] = {"changed": changed, "moe_layers": engine.has_moe_layers,
                      "experts_are_own": all(torch.equal(v, init[k]) for k, v in experts.items()) and len(experts) > 0}
    return out


def check_offline_checkpoint_loads_in_deepspeed(world_size: int, rank: int) -> dict:
    """megaclm.checkpoint.offline writes an MoE model in DeepSpeed's MoE layout: DeepSpeed's own loader reads
    it into an EP=2 engine, each rank getting its experts."""
    from megaclm.checkpoint.offline import write_checkpoint

    torch.manual_seed(99)  # other weights than the engine's own init
    full = GPTModel(MOE, VOCAB).state_dict()
    box = [tempfile.mkdtemp() if rank == 0 else None]
    dist.broadcast_object_list(box)
    out = os.path.join(box[0], "ckpt")
    if rank == 0:
        write_checkpoint(out, {"model": dataclasses.asdict(MOE)}, full, tp=1, pp=1)
    dist.barrier()
    pstate = _state(world_size, rank, expert_parallel_size=world_size)
    engine = _engine(pstate, zero_stage=1)
    path, _ = engine.load_checkpoint(out, tag="iter_0000000", load_module_only=True, load_optimizer_states=False)
    want = localize_experts(full, MOE.num_experts, pstate.ep_size, pstate.ep_rank)
    got = engine.module.state_dict()
    dist.barrier()
    if rank == 0:
        shutil.rmtree(box[0])
    return {"loaded": path is not None, "keys_equal": got.keys() == want.keys(),
            "max_diff": max((got[k] - want[k]).abs().max().item() for k in want)}


def check_route_over_seq_split(world_size: int, rank: int) -> dict:
    """`route` on this rank's part of each sample (Ulysses slice or ring chunks) against `route` on the whole
    micro-batch: the same router losses, kept assignments and logits gradient. The objective is training's:
    sum_t w_t (sum of t's kept combine weights x v_t + the router losses), w_t unequal across the ranks (as
    under a loss mask), each rank differentiating its own tokens' part."""
    group = dist.new_group(list(range(world_size)))
    out = {}
    g = torch.Generator().manual_seed(3)
    Bs, Ts, E = 2, 16, 4
    for ring in (False, True):
        for k, pre_softmax, capacity, policy in ((2, False, None, "probs"), (2, True, 1.0, "probs"),
                                                 (1, False, 0.5, "position"), (1, False, 0.5, "probs")):
            logits = torch.randn(Bs, Ts, E, generator=g)
            w, v = torch.rand(Bs, Ts, generator=g), torch.randn(Bs, Ts, generator=g)

            def objective(lg, w, v, split=None):
                r = route(lg.reshape(-1, E), k, pre_softmax, capacity, policy, split)
                mixed = torch.zeros(lg.shape[0] * lg.shape[1]).index_add(0, r.token, r.weight)
                return (w.flatten() * (mixed * v.flatten() + r.aux_loss + r.z_loss)).sum(), r

            full = logits.clone().requires_grad_()
            ref, ref_r = objective(full, w, v)
            ref.backward()
            mine = sequence_index(Ts, world_size, rank, ring)
            local = logits[:, mine].clone().requires_grad_()
            split = SeqSplit.of(group, rank, ring, Bs, Ts // world_size)
            loss, r = objective(local, w[:, mine], v[:, mine], split)
            loss.backward()
            global_token = (torch.arange(Bs)[:, None] * Ts + mine).flatten()  # my flat token -> the whole one's
            kept = sorted(zip(global_token[r.token].tolist(), r.weight.tolist()))
            ref_kept = [(t, wt) for t, wt in sorted(zip(ref_r.token.tolist(), ref_r.weight.tolist()))
                        if t in set(global_token.tolist())]
            out[ring, k, pre_softmax, capacity, policy] = {
                "aux": abs(r.aux_loss.item() - ref_r.aux_loss.item()), "z": abs(r.z_loss.item() - ref_r.z_loss.item()),
                "kept_same": [t for t, _ in kept] == [t for t, _ in ref_kept],
                "dropped": int(ref_r.token.numel() < Bs * Ts * k),
                "grad": (local.grad - full.grad[:, mine]).abs().max().item()}
    return out


def moe_world2_checks(rank: int, world_size: int) -> dict:
    return {"route_seq": check_route_over_seq_split(world_size, rank),
            "ep": check_ep2_equals_ep1(world_size, rank), "tp_sp": check_tp2_sp(world_size, rank),
            "ep_recompute": check_ep2_equals_ep1(world_size, rank, recompute=True),
            "engines": check_engines(world_size, rank), "lora": check_lora_engine(world_size, rank),
            "offline": check_offline_checkpoint_loads_in_deepspeed(world_size, rank)}


def check_tp2_ep2(world_size: int, rank: int) -> dict:
    """4 ranks, TP=2 with SP x EP=2 (dp 2): each dp rank its own batch; against the unsharded model."""
    pstate = _state(world_size, rank, tensor_parallel_size=2, sequence_parallel=True, expert_parallel_size=2)
    ids, labels, weights, _, _ = batch(seed=10 + pstate.dp_rank)
    ref = _model(ParallelState.single())
    ref_loss = (ref(ids, labels=labels) * weights).sum()
    ref_loss.backward()
    want = grads(ref)
    for g in want.values():
        dist.all_reduce(g, group=pstate.dp_group)
    model = _model(pstate)
    model.load_state_dict(shard_state_dict(ref.state_dict(), MOE, 2, pstate.tp_rank, 2, pstate.ep_rank))
    loss = (model(ids, labels=labels) * weights).sum()
    loss.backward()
    mine = grads(model)
    dense = {k: g for k, g in mine.items() if expert_id(k) is None}
    for g in dense.values():
        dist.all_reduce(g, group=pstate.dp_group)
    full = unshard_state_dicts(gather_shards(dense, pstate), MOE)
    experts = _global({k: g for k, g in mine.items() if expert_id(k) is not None}, pstate)
    # DeepSpeed's norm of MoE gradients (its bf16/fp16 optimizers clip by it): every expert once, although each
    # is on both TP ranks of its EP rank.
    from deepspeed.runtime.utils import get_global_norm_of_tensors

    ds_norm = get_global_norm_of_tensors(list(experts.values()), mpu=pstate, moe_ep_group=pstate.ep_group)
    true_norm = sum(g.pow(2).sum() for k, g in want.items() if expert_id(k) is not None).sqrt()
    got = {**full, **experts}
    return {"loss": abs(loss.item() - ref_loss.item()), "grads": max_diff(got, {k: want[k] for k in got}),
            "expert_norm": float(ds_norm), "true_expert_norm": float(true_norm),
            "held_experts": sorted({expert_id(k) for k in experts}), "ep_rank": pstate.ep_rank,
            "ep_group": pstate.ep_group_ranks, "edp_group": pstate.edp_group_ranks}


def moe_world4_checks(rank: int, world_size: int) -> dict:
    return {"tp_ep": check_tp2_ep2(world_size, rank)}
