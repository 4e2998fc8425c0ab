"""Checks run inside spawned gloo ranks for the sequence split (tests/distributed/test_long_context.py).

Each check builds the unsplit model (TP=1, whole sequence) from the same seed on every rank, gives the
split model the same weights (TP-sharded) and this rank's tokens (megaclm.parallel.context.shard_sequence,
as the data loader cuts them), and returns the largest differences of logits, per-token loss and every
gradient (summed over the seq axis, gathered over TP) against the unsplit run.
"""
import dataclasses

import torch
import torch.distributed as dist

from megaclm.config.kernels import KernelsConfig
from megaclm.model.gpt import GPTModel
from megaclm.model.sharding import shard_state_dict, unshard_state_dicts
from megaclm.parallel.context import gather_sequence, shard_sequence
from megaclm.parallel.mappings import gather_from_tp
from megaclm.parallel.random import model_parallel_seed
from megaclm.parallel.state import ParallelState
from megaclm.training.loss import normalise_loss_masks

from parallel_checks import (B, T, VOCAB, GradRecorder, batch, family_config, forward_backward, gather_shards,
                             grads, max_diff, reference)

# Llama shape with GQA (query heads per kv head: 2) whose heads still split over TP=2 x Ulysses=2.
WIDE_GQA = dict(hidden_size=64, num_attention_heads=8, num_query_groups=4)
CASES = {  # name: (family, overrides, documents, attention backend)
    "llama": ("llama", {}, False, "sdpa"),
    "llama-docs": ("llama", {}, True, "sdpa"),
    "mistral-window": ("mistral", {}, True, "unfused"),
    "alibi-docs": ("alibi", {}, True, "sdpa"),  # Ulysses only: ring attention refuses ALiBi
    "llama-recompute-full": ("llama", {"recompute_granularity": "full"}, True, "sdpa"),
    "llama-recompute-selective": ("llama", {"recompute_granularity": "selective"}, False, "sdpa"),
}


def _state(world_size, rank, kind, n, tp, sequence_parallel=False, pp=1):
    import deepspeed

    if not deepspeed.comm.is_initialized():  # DeepSpeed's DistributedAttention talks through deepspeed.comm
        deepspeed.init_distributed(dist_backend="gloo")
    sizes = {"ulysses_size": n} if kind == "ulysses" else {"context_parallel_size": n}
    pstate = ParallelState(world_size, rank, tensor_parallel_size=tp, pipeline_parallel_size=pp,
                           sequence_parallel=sequence_parallel, **sizes)
    pstate.init_process_groups()
    return pstate


def _local(pstate, ids, labels, weights, pos, doc):
    ring = pstate.cp_kind == "ring"
    pos = torch.arange(T).expand(B, T) if pos is None else pos  # the loader always carries global positions

    def cut(x):
        return None if x is None else shard_sequence(x, pstate.cp_size, pstate.cp_rank, ring)

    return cut(ids), cut(labels), cut(weights), cut(pos), cut(doc)


def check_split(world_size: int, rank: int, kind: str, n: int, tp: int, case: str,
                sequence_parallel: bool = False) -> dict:
    family, overrides, documents, backend = CASES[case]
    config = family_config(family, **(WIDE_GQA if tp > 1 else {}), **overrides)
    kernels = KernelsConfig(attention_backend=backend)
    inputs = batch(seed=11, documents=documents)
    ref = reference(config, kernels=kernels)
    ref_logits, ref_loss = forward_backward(ref, *inputs)
    ref_grads = grads(ref)

    pstate = _state(world_size, rank, kind, n, tp, sequence_parallel)
    model_parallel_seed(1234, pstate.tp_rank, 0, pstate.cp_rank)
    torch.manual_seed(1234)
    model = GPTModel(config, VOCAB, pstate, kernels)
    shards = shard_state_dict(ref.state_dict(), config, tp, pstate.tp_rank)
    init_diff = max_diff(model.state_dict(), shards)
    model.load_state_dict(shards)
    logits, loss = forward_backward(model, *_local(pstate, *inputs))
    local_grads = grads(model)
    for g in local_grads.values():  # each seq rank's gradient covers its tokens only
        dist.all_reduce(g, group=pstate.cp_group)
    full_grads = unshard_state_dicts(gather_shards(local_grads, pstate), config) if tp > 1 else local_grads
    ring = kind == "ring"
    logits = gather_from_tp(gather_sequence(logits, pstate.cp_group, ring), pstate.tp_group if tp > 1 else None)
    return {"init": init_diff, "local_tokens": loss.shape[1],
            "logits": (logits - ref_logits).abs().max().item(),
            "loss": (gather_sequence(loss, pstate.cp_group, ring) - ref_loss).abs().max().item(),
            "grads": max_diff(full_grads, ref_grads),
            "grad_scale": max(g.abs().max().item() for g in ref_grads.values())}


def check_engine(world_size: int, rank: int, kind: str, n: int, zero_stage: int = 0) -> dict:
    """Through deepspeed.initialize(mpu=pstate) (ZeRO-3: built under zero.Init over seq x dp, every parameter
    partitioned): the trainer's loss (its tokens' share of the micro-batch mean) and DeepSpeed's reduction
    over seq x dp give the unsplit mean-loss gradient: one SGD step with lr 1 moves each weight by it."""
    import deepspeed

    config = family_config("llama")
    ids, labels, weights, pos, doc = batch(seed=12, documents=True)
    ref = reference(config)
    ref_loss = (ref(ids, pos, doc, labels=labels) * weights).sum() / weights.sum()
    ref_loss.backward()

    pstate = _state(world_size, rank, kind, n, 1)
    ds_config = {"train_micro_batch_size_per_gpu": B, "train_batch_size": B * pstate.dp_size,
                 "steps_per_print": 10**9, "gradient_clipping": 0.0, "zero_allow_untested_optimizer": True,
                 "zero_optimization": {"stage": zero_stage, "stage3_param_persistence_threshold": 0,
                                       # as megaclm.config.deepspeed_json sets it under a sequence split
                                       **({"reduce_scatter": False} if zero_stage == 3 else {})}}
    with deepspeed.zero.Init(config_dict_or_path=ds_config, enabled=zero_stage == 3, mpu=pstate,
                             data_parallel_group=pstate.cp_dp_group):
        torch.manual_seed(1234)
        model = GPTModel(config, VOCAB, pstate)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=1.0),
                                           config=ds_config, mpu=pstate)
    l_ids, l_labels, l_weights, l_pos, l_doc = _local(pstate, ids, labels, weights, pos, doc)
    count = l_weights.sum()
    dist.all_reduce(count, group=pstate.cp_group)
    loss = (engine(l_ids, l_pos, l_doc, labels=l_labels) * l_weights).sum() / count
    engine.backward(loss)
    engine.step()
    total = loss.detach().clone()
    dist.all_reduce(total, group=pstate.cp_group)
    params = dict(engine.module.named_parameters())
    with deepspeed.zero.GatheredParameters(list(params.values()), enabled=zero_stage == 3):
        steps = {k: ref.state_dict()[k] - p.detach() for k, p in params.items()}
    return {"loss": abs(total.item() - ref_loss.item()), "grads": max_diff(steps, grads(ref)), "keys": len(steps)}


def check_pipeline_split(world_size: int, rank: int, kind: str, n: int) -> dict:
    """PP=2 x (Ulysses | ring)=2 through DeepSpeed's pipeline engine, two micro-batches: loss and every gradient
    against the unsplit plain model (mean over micro-batches of each one's mean loss)."""
    import deepspeed

    from megaclm.model.pipe import GPTPipelineModule, load_plain_state_dict, pipe_to_plain_key

    config = family_config("llama", num_layers=4)
    pstate_pp = _state(world_size, rank, kind, n, 1, pp=2)
    micro = [batch(seed=20 + i, documents=True) for i in range(2)]
    ref = reference(config)
    ref_loss = (sum((ref(ids, pos, doc, labels=labels) * w).sum() for ids, labels, w, pos, doc in micro)
                / sum(m[2].sum() for m in micro))  # per token over the global batch (megaclm.training.loss)
    ref_loss.backward()
    ref_grads = grads(ref)

    model_parallel_seed(1, 0, pstate_pp.pp_rank, pstate_pp.cp_rank)
    module = GPTPipelineModule(config, VOCAB, pstate_pp)
    load_plain_state_dict(module, ref.state_dict())
    recorder = GradRecorder(module.named_parameters())
    ds_config = {"train_micro_batch_size_per_gpu": B, "gradient_accumulation_steps": 2,
                 "train_batch_size": B * 2 * pstate_pp.dp_size * n,  # as megaclm.training.engine sets it
                 "steps_per_print": 10**9, "gradient_clipping": 0.0, "zero_optimization": {"stage": 0}}
    engine, _, _, _ = deepspeed.initialize(model=module, optimizer=recorder, config=ds_config)
    data = []
    for m in micro:
        ids, labels, w, pos, doc = _local(pstate_pp, *m)
        data.append(((ids, pos, doc), (labels, w)))
    data, _ = normalise_loss_masks(data, pstate_pp, accum=2, pipeline=True)
    loss = engine.train_batch(data_iter=iter(data))
    recorded = {pipe_to_plain_key(k, config): g for k, g in recorder.recorded.items()}
    if not pstate_pp.is_first_stage:
        recorded.pop("embedding.position_embeddings.weight", None)
    return {"stage": pstate_pp.pp_rank, "loss": abs(loss.item() - ref_loss.item()),
            "grads": {k: (g - ref_grads[k]).abs().max().item() for k, g in recorded.items()},
            "all_keys": sorted(ref_grads), "layers": [type(f).__name__ for f in module.forward_funcs]}


def world2_checks(rank: int, world_size: int) -> dict:
    out = {}
    for case in CASES:
        out[("ulysses", case)] = check_split(world_size, rank, "ulysses", 2, 1, case)
        if case != "alibi-docs":
            out[("ring", case)] = check_split(world_size, rank, "ring", 2, 1, case)
    for stage in (0, 2, 3):
        out[("engine", "ulysses", stage)] = check_engine(world_size, rank, "ulysses", 2, stage)
    out[("engine", "ring", 3)] = check_engine(world_size, rank, "ring", 2, 3)
    return out


def world4_checks(rank: int, world_size: int) -> dict:
    """TP=2 x (Ulysses | ring)=2 (also with Megatron's sequence parallelism), and a 4-way split."""
    return {("ulysses-tp2", "llama-docs"): check_split(world_size, rank, "ulysses", 2, 2, "llama-docs"),
            ("ring-tp2", "llama-docs"): check_split(world_size, rank, "ring", 2, 2, "llama-docs"),
            ("ulysses-tp2-sp", "llama"): check_split(world_size, rank, "ulysses", 2, 2, "llama", True),
            ("ring-tp2-sp", "llama-recompute-full"): check_split(world_size, rank, "ring", 2, 2,
                                                                 "llama-recompute-full", True),
            ("ring4", "mistral-window"): check_split(world_size, rank, "ring", 4, 1, "mistral-window"),
            ("pipe", "ulysses"): check_pipeline_split(world_size, rank, "ulysses", 2),
            ("pipe", "ring"): check_pipeline_split(world_size, rank, "ring", 2)}
