"""Process groups, the model, the optimizer and `deepspeed.initialize` (the only call site in megaclm).

    init_distributed(cfg)                      -> ParallelState (groups created, seeds set)
    build_model(cfg, padded_vocab, pstate, ds) -> GPTModel, or GPTPipelineModule when pp > 1
    build_engine(cfg, model, pstate, ds)       -> DeepSpeed engine (PipelineEngine when pp > 1)

Optimizer: AdamW with two parameter groups, weight decay on matrices and embeddings, none on norms
and biases (any parameter with fewer than 2 dims), as Megatron does. DeepSpeed builds it from the
JSON (FusedAdam on GPU, torch AdamW on CPU via "torch_adam") and wraps it in its ZeRO / bf16 / fp16
optimizer, each of which skips a step whose gradients are not finite. The one path without such a
wrapper - ZeRO-0 in fp32 - gets `SkipNonFiniteAdamW`, which skips the same way and reports it through
the `overflow` attribute DeepSpeed's engine reads (engine.was_step_applied()).
"""
from __future__ import annotations

import datetime
import os
from typing import Any

import deepspeed
import torch
import torch.distributed as dist

from megaclm.logging import get_logger
from megaclm.model.gpt import GPTModel
from megaclm.model.pipe import GPTPipelineModule
from megaclm.parallel.random import model_parallel_seed
from megaclm.parallel.state import ParallelState

log = get_logger("megaclm.train")


def init_distributed(cfg: Any) -> ParallelState:
    """torch.distributed from the launcher's environment (deepspeed, torchrun, srun + env://)."""
    backend = cfg.training.distributed_backend or ("nccl" if torch.cuda.is_available() else "gloo")
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False,
                               timeout=datetime.timedelta(minutes=cfg.training.distributed_timeout_minutes))
    pstate = ParallelState.from_env(cfg.parallel)
    model_parallel_seed(cfg.training.seed, pstate.tp_rank, pstate.pp_rank)
    return pstate


def build_model(cfg: Any, padded_vocab_size: int, pstate: ParallelState, ds_config: dict) -> torch.nn.Module:
    # ZeRO-3 partitions each parameter as soon as its module is built, so a model larger than one
    # device's memory never exists whole (every data-parallel replica builds the same init: same seed).
    with deepspeed.zero.Init(config_dict_or_path=ds_config, enabled=cfg.training.zero_stage == 3, mpu=pstate):
        if pstate.pp_size > 1:
            return GPTPipelineModule(cfg.model, padded_vocab_size, pstate, cfg.kernels,
                                     partition_method=cfg.parallel.pipeline_partition_method)
        return GPTModel(cfg.model, padded_vocab_size, pstate, cfg.kernels)


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    decay, no_decay = [], []
    for p in model.parameters():
        if not p.requires_grad:
            continue
        # ZeRO-3 partitions parameters into 1-d shards; ds_shape keeps the real one.
        ndim = len(getattr(p, "ds_shape", p.shape))
        (decay if ndim >= 2 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


class SkipNonFiniteAdamW(torch.optim.AdamW):
    """AdamW that skips (and flags via `.overflow`) a step whose gradients hold NaN/inf.

    Used only for ZeRO-0 fp32, where DeepSpeed calls the optimizer directly. The check is reduced over
    the model-parallel group (each rank holds different parameters; data-parallel ranks already agree).
    """

    def __init__(self, params, mp_group=None, **kwargs):
        super().__init__(params, **kwargs)
        self.mp_group, self.overflow = mp_group, False

    @torch.no_grad()
    def step(self, closure=None):
        grads = [p.grad for g in self.param_groups for p in g["params"] if p.grad is not None]
        bad = torch.zeros((), dtype=torch.float32, device=grads[0].device if grads else "cpu")
        for g in grads:
            bad = torch.maximum(bad, (~torch.isfinite(g)).any().float())
        if self.mp_group is not None and dist.is_initialized():
            dist.all_reduce(bad, op=dist.ReduceOp.MAX, group=self.mp_group)
        self.overflow = bool(bad.item())
        if self.overflow:
            self.zero_grad(set_to_none=True)
            return None
        return super().step(closure)


def build_engine(cfg: Any, model: torch.nn.Module, pstate: ParallelState, ds_config: dict) -> Any:
    groups = param_groups(model, cfg.optimizer.weight_decay)
    optimizer = None
    ds_config = dict(ds_config)
    if cfg.training.zero_stage == 0 and cfg.training.precision == "fp32":
        params = ds_config.pop("optimizer")["params"]
        mp_group = pstate.get_model_parallel_group() if pstate.tp_size * pstate.pp_size > 1 else None
        optimizer = SkipNonFiniteAdamW(groups, mp_group=mp_group, lr=params["lr"], betas=tuple(params["betas"]),
                                       eps=params["eps"], weight_decay=params["weight_decay"],
                                       fused=torch.cuda.is_available() or None)
    if pstate.pp_size > 1:
        if pstate.sequence_parallel:  # activations differ across TP ranks: send them whole
            ds_config.setdefault("pipeline", {}).update({"pipe_partitioned": False, "grad_partitioned": False})
        engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=groups, optimizer=optimizer,
                                               config=ds_config)
    else:
        engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=groups, optimizer=optimizer,
                                               config=ds_config, mpu=pstate)
    return engine

