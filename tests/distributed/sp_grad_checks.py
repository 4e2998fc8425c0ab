"""Workers for test_sp_grads.py: the SP-replicated gradients summed once per optimizer step (one coalesced
all-reduce, megaclm.training.engine.defer_sequence_parallel_grads) against the per-micro-batch hooks, through
megaclm's build_engine on TP=2 + SP, 2 micro-batches per step, clipping that binds; the plain engine at ZeRO 0/1/2
and the pipeline engine (one stage) in bf16, whose BF16_Optimizer accumulates in fp32 buffers; ZeRO-1 with
overlap_comm (--overlap-grad-reduce), which reduces in the last micro-batch's backward and so keeps the hooks,
against ZeRO-1 without it."""
from types import SimpleNamespace

import deepspeed
import torch
import torch.distributed as dist

from megaclm.model.gpt import GPTModel
from megaclm.model.pipe import GPTPipelineModule
from megaclm.parallel.random import model_parallel_seed
from megaclm.parallel.state import ParallelState
from parallel_checks import VOCAB, family_config

B, T = 2, 16


def _step(pstate, zero_stage: int, precision: str, defer: bool, pipeline: bool = False,
          overlap: bool = False) -> dict:
    import megaclm.training.engine as engine_module

    model_parallel_seed(1, pstate.tp_rank, 0)
    torch.manual_seed(1)
    # gpt2: LayerNorms with weight and bias, biased linears (the row-parallel biases are SP-replicated)
    config = family_config("gpt2", hidden_dropout=0.0, attention_dropout=0.0)
    model = GPTPipelineModule(config, VOCAB, pstate) if pipeline else GPTModel(config, VOCAB, pstate)
    cfg = SimpleNamespace(optimizer=SimpleNamespace(weight_decay=0.01, decoupled_lr=None),
                          zero=SimpleNamespace(zero_stage=zero_stage), precision=SimpleNamespace(name=precision))
    config = {"train_micro_batch_size_per_gpu": B, "gradient_accumulation_steps": 2, "train_batch_size": B * 2,
              "steps_per_print": 10**9, "gradient_clipping": 0.05,
              "zero_optimization": {"stage": zero_stage, "overlap_comm": overlap},
              "bf16": {"enabled": precision == "bf16"},
              "optimizer": {"type": "AdamW", "params": {"lr": 1e-2, "betas": [0.9, 0.95], "eps": 1e-8,
                                                        "weight_decay": 0.01, "torch_adam": True}},
              "pipeline": {"pipe_partitioned": False, "grad_partitioned": False}}
    defer_fn = engine_module.defer_sequence_parallel_grads
    if not defer:  # the per-micro-batch hooks alone
        engine_module.defer_sequence_parallel_grads = lambda *a, **k: False
    try:
        if pipeline:  # one stage: build_engine takes the pipeline path for pp > 1 only
            engine = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=config)[0]
            engine_module.defer_sequence_parallel_grads(engine, pstate, zero_stage)
        else:
            engine = engine_module.build_engine(cfg, model, pstate, config)
    finally:
        engine_module.defer_sequence_parallel_grads = defer_fn
    calls = []
    all_reduce = dist.all_reduce

    def counted(tensor, *a, **k):
        calls.append(tensor.numel())
        return all_reduce(tensor, *a, **k)

    dist.all_reduce = counted
    try:
        batches = [torch.randint(0, VOCAB, (B, T), generator=torch.Generator().manual_seed(100 + i))
                   for i in range(2)]  # the same tokens on both TP ranks
        if pipeline:
            pos, mask = torch.arange(T).expand(B, T), torch.full((B, T), 1.0 / (B * T))
            engine.train_batch(data_iter=iter([((ids, pos), (ids, mask)) for ids in batches]))
        for ids in batches if not pipeline else ():
            engine.backward(engine(ids, labels=ids).mean())
            engine.step()
    finally:
        dist.all_reduce = all_reduce
    norm = engine.get_global_grad_norm()
    deferred = [p for p in engine.module.parameters() if getattr(p, "sequence_parallel_deferred", False)]
    return {"norm": float(norm), "deferred": len(deferred), "all_reduces": calls,
            "params": {n: p.detach().float().clone() for n, p in engine.module.named_parameters()}}


def sp_grad_checks(rank: int, world_size: int) -> dict:
    pstate = ParallelState(world_size, rank, tensor_parallel_size=2, sequence_parallel=True)
    pstate.init_process_groups()
    out = {}
    for zero_stage, precision, pipeline in ((0, "fp32", False), (1, "fp32", False), (1, "bf16", False),
                                            (2, "fp32", False), (0, "bf16", True)):
        per_micro = _step(pstate, zero_stage, precision, defer=False, pipeline=pipeline)
        per_step = _step(pstate, zero_stage, precision, defer=True, pipeline=pipeline)
        out[(zero_stage, precision, pipeline)] = {
            "norm": (per_micro["norm"], per_step["norm"]), "deferred": per_step["deferred"],
            "all_reduces": (per_micro["all_reduces"], per_step["all_reduces"]),
            "params": max((per_micro["params"][k] - v).abs().max().item() for k, v in per_step["params"].items())}
    deferred = _step(pstate, 1, "fp32", defer=True)
    overlapped = _step(pstate, 1, "fp32", defer=True, overlap=True)
    out["overlap_comm"] = {
        "norm": (deferred["norm"], overlapped["norm"]), "deferred": overlapped["deferred"],
        "params": max((deferred["params"][k] - v).abs().max().item() for k, v in overlapped["params"].items())}
    return out
