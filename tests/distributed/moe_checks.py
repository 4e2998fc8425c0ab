"""Mixture-of-Experts checks run inside spawned gloo ranks (tests/distributed/test_expert_parallel.py).

Each compares a parallel MoE model with the same weights in a simpler layout: EP=2 against EP=1 (each
rank its own batch; gradients summed over the ranks, as data parallelism does), TP=2 with SP against
the unsharded model, and DeepSpeed engines (ZeRO 0/1/2) trained for a few steps at EP=2 and EP=1.
"""
import torch
import torch.distributed as dist

from megaclm.config.model import ModelConfig
from megaclm.model.gpt import GPTModel
from megaclm.model.sharding import shard_state_dict, unshard_state_dicts
from megaclm.parallel.state import ParallelState
from parallel_checks import B, T, VOCAB, batch, gather_shards, grads, max_diff

# Dropless, both router losses on, a gated shared expert, and MoE in every other layer.
MOE = ModelConfig(num_layers=3, hidden_size=32, num_attention_heads=4, max_position_embeddings=32,
                  hidden_dropout=0.0, attention_dropout=0.0, position_embedding_type="rope",
                  normalization="RMSNorm", swiglu=True, ffn_hidden_size=48, add_bias_linear=False,
                  untie_embeddings_and_output_weights=True, num_experts=4, moe_router_topk=2,
                  moe_ffn_hidden_size=24, moe_layer_freq=2, moe_aux_loss_coeff=0.1, moe_z_loss_coeff=0.01,
                  moe_shared_expert_intermediate_size=40, moe_shared_expert_gate=True)


def _model(pstate):
    torch.manual_seed(1234)
    return GPTModel(MOE, VOCAB, pstate)


def _summed(g: dict) -> dict:
    for t in g.values():
        dist.all_reduce(t)
    return g


def check_ep2_equals_ep1(world_size: int, rank: int) -> dict:
    ids, labels, weights, _, _ = batch(seed=10 + rank)  # data parallel: every rank its own tokens
    ref = _model(None)
    ref_loss = (ref(ids, labels=labels) * weights).sum()
    ref_loss.backward()
    pstate = ParallelState(world_size, rank, expert_parallel_size=world_size)
    pstate.init_process_groups()
    model = _model(pstate)
    loss = (model(ids, labels=labels) * weights).sum()
    loss.backward()
    mine = grads(model)
    # This rank ran only its own experts (on both ranks' tokens): its gradient for the others is 0.
    local = MOE.num_experts // world_size
    others = [e for e in range(MOE.num_experts) if e // local != pstate.ep_rank]
    foreign = max(mine[f"layers.0.mlp.experts.{w}"][others].abs().max().item() for w in ("fc1", "fc2"))
    own = min(mine[f"layers.0.mlp.experts.{w}"][pstate.ep_rank * local:].abs().max().item() for w in ("fc1", "fc2"))
    return {"loss": loss.item(), "ref_loss": ref_loss.item(), "grads": max_diff(_summed(mine), _summed(grads(ref))),
            "foreign_grad": foreign, "own_grad": own, "keys": len(mine)}


def check_tp2_sp(world_size: int, rank: int) -> dict:
    ids, labels, weights, _, _ = batch(seed=3)
    ref = _model(None)
    ref_loss = (ref(ids, labels=labels) * weights).sum()
    ref_loss.backward()
    pstate = ParallelState(world_size, rank, tensor_parallel_size=world_size, sequence_parallel=True)
    pstate.init_process_groups()
    model = _model(pstate)
    model.load_state_dict(shard_state_dict(ref.state_dict(), MOE, pstate.tp_size, pstate.tp_rank))
    loss = (model(ids, labels=labels) * weights).sum()
    loss.backward()
    full = unshard_state_dicts(gather_shards(grads(model), pstate), MOE)
    return {"loss": abs(loss.item() - ref_loss.item()), "grads": max_diff(full, grads(ref))}


def _train(pstate, zero_stage: int, steps: int, rank: int) -> tuple[list[float], dict]:
    import deepspeed

    model = _model(pstate)
    config = {"train_micro_batch_size_per_gpu": B, "gradient_accumulation_steps": 2,
              "train_batch_size": B * 2 * pstate.dp_size, "steps_per_print": 10**9, "gradient_clipping": 1.0,
              "zero_allow_untested_optimizer": True, "zero_optimization": {"stage": zero_stage}}
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=torch.optim.AdamW(model.parameters(), lr=1e-2),
                                           config=config, mpu=pstate)
    losses = []
    for step in range(steps):
        for micro in range(2):
            ids, labels, weights, _, _ = batch(seed=10 * micro + rank)  # the same batches: the loss must fall
            loss = (engine(ids, labels=labels) * weights).mean()
            engine.backward(loss)
            engine.step()
            losses.append(loss.item())
    return losses, {k: p.detach().clone() for k, p in engine.module.named_parameters()}


def check_engines(world_size: int, rank: int) -> dict:
    import deepspeed

    if not deepspeed.comm.is_initialized():
        deepspeed.init_distributed(dist_backend="gloo")
    out = {}
    for stage in (0, 1, 2):
        results = {}
        for ep in (1, world_size):
            pstate = ParallelState(world_size, rank, expert_parallel_size=ep)
            pstate.init_process_groups()
            results[ep] = _train(pstate, stage, steps=3, rank=rank)
        (loss1, p1), (loss2, p2) = results[1], results[world_size]
        out[stage] = {"losses_ep1": loss1, "losses_ep2": loss2, "params": max_diff(p1, p2)}
    return out


def moe_world2_checks(rank: int, world_size: int) -> dict:
    return {"ep": check_ep2_equals_ep1(world_size, rank), "tp_sp": check_tp2_sp(world_size, rank),
            "engines": check_engines(world_size, rank)}
